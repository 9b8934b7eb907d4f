// SPDX-License-Identifier: Apache-2.0
//! piccolo-tpm against a real swtpm: the EK identity equals tpm2-tools + openssl, PCR reads
//! equal tpm2_pcrread, sealing round trips and fails with a PCR policy mismatch after
//! tpm2_pcrextend, reseal to expected values, corrupt and foreign blobs, the device-token
//! key's stability across TPM power cycles and its JWTs verified with jsonwebtoken.

use std::process::{Command, Stdio};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use piccolo_testkit::swtpm::Swtpm;
use piccolo_tpm::{Bank, Error, TokenRequest, Tpm};

fn ok(o: std::process::Output, what: &str) -> Vec<u8> {
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

#[test]
fn device_id_equals_tpm2_createek_and_openssl() {
    let sw = Swtpm::start();
    let tpm = Tpm::new(sw.tcti());
    let id = tpm.identity().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ek.pem");
    let ctx = dir.path().join("ek.ctx");
    ok(
        sw.tool(&["tpm2_createek", "-G", "rsa", "-c", ctx.to_str().unwrap(), "-u", pem.to_str().unwrap(), "-f", "pem"]),
        "tpm2_createek",
    );
    sw.flush_all();
    let der = ok(
        Command::new("openssl")
            .args(["pkey", "-pubin", "-in", pem.to_str().unwrap(), "-outform", "DER"])
            .stderr(Stdio::piped())
            .output()
            .unwrap(),
        "openssl pkey",
    );
    let mut sum = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut sum.stdin.take().unwrap(), &der).unwrap();
    let hex = String::from_utf8(sum.wait_with_output().unwrap().stdout).unwrap();
    let expected = format!("tpm-ek-{}", hex.split_whitespace().next().unwrap());
    assert_eq!(id.device_id, expected);
    // Same key, same encoding: our PEM is byte-for-byte what openssl normalises to.
    let norm = ok(
        Command::new("openssl").args(["pkey", "-pubin", "-in", pem.to_str().unwrap()]).output().unwrap(),
        "openssl pkey pem",
    );
    assert_eq!(id.ek_public_pem, String::from_utf8(norm).unwrap());
    // A second read (cached) and a fresh backend agree; another TPM has another identity.
    assert_eq!(tpm.identity().unwrap(), id);
    assert_eq!(Tpm::new(sw.tcti()).identity().unwrap(), id);
    let other = Swtpm::start();
    assert_ne!(Tpm::new(other.tcti()).identity().unwrap().device_id, id.device_id);
}

#[test]
fn pcrs_equal_tpm2_pcrread_and_bad_indices_are_refused() {
    let sw = Swtpm::start();
    sw.extend_pcr(7);
    let tpm = Tpm::new(sw.tcti());
    let all = tpm.read_pcrs(Bank::Sha256, &[]).unwrap();
    assert_eq!(all.len(), 24);
    assert_eq!(all.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..24).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pcr7.bin");
    ok(sw.tool(&["tpm2_pcrread", "-Q", "sha256:7", "-o", out.to_str().unwrap()]), "tpm2_pcrread");
    assert_eq!(all[7].1, std::fs::read(&out).unwrap());
    assert_eq!(all[7].1, Swtpm::extended_value(&[0; 32]));
    assert_eq!(all[0].1, vec![0; 32]);
    let sha1 = tpm.read_pcrs(Bank::Sha1, &[0, 7]).unwrap();
    assert_eq!(sha1.iter().map(|(i, v)| (*i, v.len())).collect::<Vec<_>>(), vec![(0, 20), (7, 20)]);
    for bad in [&[24u32][..], &[7, 7], &[u32::MAX]] {
        let e = tpm.read_pcrs(Bank::Sha256, bad).unwrap_err();
        assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument, "{bad:?}: {e}");
    }
    assert!(Bank::parse("md5").is_err());
}

#[test]
fn seal_unseal_and_pcr_policy_mismatch_after_extend() {
    let sw = Swtpm::start();
    let tpm = Tpm::new(sw.tcti());
    let secret = b"the key set's TPM auto-unlock key".to_vec();
    let blob = tpm.seal(&secret, &[]).unwrap();
    assert!(!blob.windows(secret.len()).any(|w| w == secret), "the blob does not hold the plaintext");
    assert_eq!(piccolo_tpm::seal::blob_pcrs(&blob).unwrap(), vec![7], "default PCR 7");
    assert_eq!(&tpm.unseal(&blob).unwrap()[..], &secret[..]);
    let multi = tpm.seal(&secret, &[0, 7, 11]).unwrap();
    assert_eq!(&tpm.unseal(&multi).unwrap()[..], &secret[..]);

    sw.extend_pcr(7);
    let e = tpm.unseal(&blob).unwrap_err();
    assert!(matches!(e, Error::PcrPolicyMismatch), "{e}");
    assert_eq!(e.to_string(), "PCR policy mismatch");
    assert_eq!(e.code(), piccolo_tpm::Code::FailedPrecondition);
    assert!(matches!(tpm.unseal(&multi).unwrap_err(), Error::PcrPolicyMismatch));
    // A PCR the blob is not bound to does not matter.
    let blob0 = tpm.seal(&secret, &[0]).unwrap();
    sw.extend_pcr(7);
    assert_eq!(&tpm.unseal(&blob0).unwrap()[..], &secret[..]);
    // Power cycle: PCRs are back to their reset values, the old blob opens again.
    let mut sw = sw;
    sw.restart();
    assert_eq!(&tpm.unseal(&blob).unwrap()[..], &secret[..]);
}

#[test]
fn reseal_to_expected_values_survives_the_planned_change() {
    let sw = Swtpm::start();
    let tpm = Tpm::new(sw.tcti());
    let secret = [0x5au8; 64];
    let blob = tpm.seal(&secret, &[7, 8]).unwrap();
    let now7 = tpm.read_pcrs(Bank::Sha256, &[7]).unwrap()[0].1.clone();
    let next7 = Swtpm::extended_value(&now7);
    let resealed = tpm.reseal(&blob, &[(7, next7.clone())]).unwrap();
    // Before the change the resealed blob does not open (it waits for the new value)...
    assert!(matches!(tpm.unseal(&resealed).unwrap_err(), Error::PcrPolicyMismatch));
    sw.extend_pcr(7);
    // ...after it, it does, and the old blob does not.
    assert_eq!(&tpm.unseal(&resealed).unwrap()[..], &secret[..]);
    assert!(matches!(tpm.unseal(&blob).unwrap_err(), Error::PcrPolicyMismatch));
    // Reseal needs today's PCRs to match the blob, refuses PCRs the blob is not bound to
    // and wrong digest sizes.
    assert!(matches!(tpm.reseal(&blob, &[(7, next7.clone())]).unwrap_err(), Error::PcrPolicyMismatch));
    for bad in [vec![(9u32, vec![0u8; 32])], vec![(7, vec![0u8; 20])], vec![(24, vec![0u8; 32])]] {
        let e = tpm.reseal(&resealed, &bad).unwrap_err();
        assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument, "{e}");
    }
}

#[test]
fn bad_secrets_and_corrupt_or_foreign_blobs_are_invalid_arguments() {
    let sw = Swtpm::start();
    let tpm = Tpm::new(sw.tcti());
    for bad in [vec![], vec![1u8; 129]] {
        let e = tpm.seal(&bad, &[]).unwrap_err();
        assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument, "{e}");
    }
    assert_eq!(tpm.seal(&[1], &[24]).unwrap_err().code(), piccolo_tpm::Code::InvalidArgument);
    assert!(tpm.seal(&[1u8; 128], &[]).is_ok(), "128 bytes is the limit, inclusive");

    let blob = tpm.seal(b"s", &[]).unwrap();
    for i in [0, 4, 12, blob.len() / 2, blob.len() - 1] {
        let mut b = blob.clone();
        b[i] ^= 0x01;
        let e = tpm.unseal(&b).unwrap_err();
        assert!(matches!(e, Error::CorruptBlob(_)), "byte {i}: {e}");
    }
    assert!(matches!(tpm.unseal(&blob[..blob.len() - 1]).unwrap_err(), Error::CorruptBlob(_)));
    assert!(matches!(tpm.unseal(&vec![0; 4096]).unwrap_err(), Error::InvalidArgument(_)));

    // Made by another TPM: well-formed, but this TPM's storage key cannot load it.
    let other = Swtpm::start();
    let foreign = Tpm::new(other.tcti()).seal(b"s", &[]).unwrap();
    let e = tpm.unseal(&foreign).unwrap_err();
    assert!(matches!(e, Error::ForeignBlob(_)), "{e}");
    assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument);
    assert_eq!(e.to_string(), "sealed blob was not made by this TPM");
}

fn verify(token: &str, key: &DecodingKey) -> jsonwebtoken::errors::Result<serde_json::Value> {
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&["piccolo-broker"]);
    v.set_required_spec_claims(&["exp", "iat", "iss"]);
    jsonwebtoken::decode::<serde_json::Value>(token, key, &v).map(|d| d.claims)
}

fn now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

#[test]
fn device_token_key_is_stable_and_tokens_verify() {
    let mut sw = Swtpm::start();
    let tpm = Tpm::new(sw.tcti());
    let key = tpm.token_key().unwrap();
    assert_eq!(Tpm::new(sw.tcti()).token_key().unwrap(), key, "a new backend (broker restart) gets the same key");
    sw.restart();
    assert_eq!(tpm.token_key().unwrap(), key, "and so does a TPM power cycle");
    let jwk: serde_json::Value = serde_json::from_str(&key.jwk_json).unwrap();
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str(), jwk["alg"].as_str()),
        (Some("EC"), Some("P-256"), Some("ES256"))
    );
    assert_eq!(jwk["kid"], key.kid.as_str());

    let req = TokenRequest {
        subscription_tier: "premium".into(),
        features: vec!["disk-encryption".into(), "priority-support".into()],
        ttl_seconds: 600,
    };
    let t = now();
    let signed = tpm.sign_token(&req, t).unwrap();
    assert_eq!(signed.expires_at, t + 600);
    let by_pem = DecodingKey::from_ec_pem(key.public_key_pem.as_bytes()).unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&key.jwk_json).unwrap();
    let by_jwk = DecodingKey::from_jwk(&jwk).unwrap();
    for k in [&by_pem, &by_jwk] {
        let claims = verify(&signed.token, k).unwrap();
        assert_eq!(claims["device_id"], tpm.identity().unwrap().device_id.as_str());
        assert_eq!(claims["subscription_tier"], "premium");
        assert_eq!(claims["features"], serde_json::json!(["disk-encryption", "priority-support"]));
        assert_eq!((claims["iat"].as_i64(), claims["exp"].as_i64()), (Some(t), Some(t + 600)));
        assert_eq!(claims["iss"], "piccolo-broker");
    }
    let header = jsonwebtoken::decode_header(&signed.token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));

    // A flipped byte in any part fails verification.
    let bytes = signed.token.as_bytes();
    for i in [5, bytes.len() / 2, bytes.len() - 5] {
        let mut b = bytes.to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(b).unwrap();
        assert!(verify(&tampered, &by_pem).is_err(), "flipped byte {i} verified");
    }
    // Another TPM's key does not verify this TPM's token.
    let other = Swtpm::start();
    let other_key = Tpm::new(other.tcti()).token_key().unwrap();
    assert_ne!(other_key.kid, key.kid);
    assert!(verify(&signed.token, &DecodingKey::from_ec_pem(other_key.public_key_pem.as_bytes()).unwrap()).is_err());

    for ttl in [0, 3601] {
        let e = tpm.sign_token(&TokenRequest { ttl_seconds: ttl, ..req.clone() }, t).unwrap_err();
        assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument, "{e}");
    }
    assert!(tpm.sign_token(&TokenRequest { ttl_seconds: 3600, ..req.clone() }, t).is_ok());
    let e = tpm.sign_token(&TokenRequest { subscription_tier: "a\"b c".into(), ..req.clone() }, t).unwrap_err();
    assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument);
}

#[test]
fn no_tpm_fails_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for tcti in [format!("swtpm:host=127.0.0.1,port={port}"), "device:/nonexistent/tpmrm0".into()] {
        let tpm = Tpm::new(tcti.clone());
        let t = std::time::Instant::now();
        let e = tpm.identity().unwrap_err();
        assert!(matches!(e, Error::NoTpm(_)), "{tcti}: {e}");
        assert!(e.to_string().starts_with("no TPM"), "{e}");
        assert_eq!(e.code(), piccolo_tpm::Code::FailedPrecondition);
        assert!(matches!(tpm.seal(b"x", &[]).unwrap_err(), Error::NoTpm(_)));
        assert!(t.elapsed() < piccolo_tpm::CONNECT_TIMEOUT * 2, "{tcti}: took {:?}", t.elapsed());
    }
}
