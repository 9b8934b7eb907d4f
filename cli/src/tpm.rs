// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl tpm identity|pcrs|seal|unseal|reseal|token-key|sign-token|enroll-disk|reseal-disk`:
//! the TPM as the broker sees it (each needs its RPC in the policy for the calling user).
//!
//! Secrets go in through a file or stdin and come out to a file (0600) or stdout; they are
//! never taken from argv (where `ps` would show them) and never printed in messages.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use piccolo_proto::v1::tpm_client::TpmClient;
use piccolo_proto::v1::{
    EnrollDiskTpmRequest, GetDeviceIdentityRequest, GetDeviceTokenKeyRequest, PcrValue, ReadPcrsRequest,
    ResealDiskTpmRequest, ResealSecretRequest, SealSecretRequest, SignDeviceTokenRequest, UnsealSecretRequest,
};

use crate::Failure;
use crate::broker::channel;
use crate::output::{status_failure, table};

/// Inputs larger than this are refused before they reach the broker.
const MAX_INPUT: u64 = 64 << 10;

/// `piccoloctl tpm ...`
#[derive(Subcommand)]
pub enum TpmCmd {
    /// The device id (tpm-ek-<sha256 of the EK>) and the EK public key.
    Identity {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// PCR values.
    Pcrs {
        /// Bank: sha256 or sha1.
        #[arg(long, default_value = "sha256")]
        bank: String,
        /// PCR index (repeat; default: all 24).
        #[arg(long = "index", value_name = "N")]
        indices: Vec<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Seal a secret (at most 128 bytes, from --in or stdin) to the current PCR values.
    Seal {
        /// PCR index to bind (repeat; default 7).
        #[arg(long = "pcr", value_name = "N")]
        pcrs: Vec<u32>,
        /// Read the secret from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the sealed blob to this file; default: base64 on stdout.
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Unseal a blob (raw or base64, from --in or stdin); fails if the PCRs changed.
    Unseal {
        /// Read the sealed blob from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the secret to this file (created 0600); default: stdout.
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Reseal a blob to the values PCRs will have after a planned change.
    Reseal {
        /// Expected value, INDEX=HEX (sha256; repeat).
        #[arg(long = "expected", value_name = "INDEX=HEX", required = true)]
        expected: Vec<String>,
        /// Read the sealed blob from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the new blob to this file; default: base64 on stdout.
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// The device-token public key (PEM, JWK, kid).
    TokenKey {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A TPM-signed device JWT (ES256) for the update server.
    SignToken {
        /// subscription_tier claim.
        #[arg(long)]
        tier: String,
        /// features claim (repeat).
        #[arg(long = "feature", value_name = "NAME")]
        features: Vec<String>,
        /// Lifetime in seconds (1..=3600).
        #[arg(long, default_value_t = 300)]
        ttl: u32,
        /// Print JSON (token and expires_at) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Enroll a TPM2 keyslot on a LUKS2 partition (unlock key from a file).
    EnrollDisk {
        /// Partition name, e.g. sda3 (must be allowed by the policy).
        #[arg(long)]
        partition: String,
        /// PCR index to bind (repeat; default 7).
        #[arg(long = "pcr", value_name = "N")]
        pcrs: Vec<u32>,
        /// File holding an existing LUKS key.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// Replace the partition's TPM2 keyslot by one bound to expected PCR values.
    ResealDisk {
        /// Partition name.
        #[arg(long)]
        partition: String,
        /// Expected value, INDEX=HEX (sha256; repeat).
        #[arg(long = "expected", value_name = "INDEX=HEX", required = true)]
        expected: Vec<String>,
        /// File holding an existing LUKS key.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
}

fn parse_expected(v: &[String]) -> Result<Vec<PcrValue>, Failure> {
    v.iter()
        .map(|e| {
            let bad = || Failure::new(2, format!("--expected {e:?}: want INDEX=HEX"));
            let (i, h) = e.split_once('=').ok_or_else(bad)?;
            let index = i.parse().map_err(|_| bad())?;
            if h.len() % 2 != 0 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let digest =
                (0..h.len()).step_by(2).map(|k| u8::from_str_radix(&h[k..k + 2], 16)).collect::<Result<_, _>>();
            Ok(PcrValue { index, digest: digest.map_err(|_| bad())? })
        })
        .collect()
}

fn print_blob(blob: &[u8], output: Option<PathBuf>) -> Result<(), Failure> {
    match output {
        Some(p) => {
            write_private(&p, blob)?;
            eprintln!("wrote {} ({} bytes)", p.display(), blob.len());
        }
        None => println!("{}", B64.encode(blob)),
    }
    Ok(())
}

fn read_input(path: &Option<PathBuf>) -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    let r = match path {
        Some(p) => std::fs::File::open(p).and_then(|f| f.take(MAX_INPUT + 1).read_to_end(&mut buf)),
        None => std::io::stdin().take(MAX_INPUT + 1).read_to_end(&mut buf),
    };
    r.map_err(|e| Failure::new(1, format!("cannot read input: {e}")))?;
    if buf.len() as u64 > MAX_INPUT {
        return Err(Failure::new(2, format!("input larger than {MAX_INPUT} bytes")));
    }
    Ok(buf)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), Failure> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| Failure::new(1, format!("cannot write {}: {e}", path.display())))
}

/// A blob file holds the raw blob (starts with "PCSB") or its base64 text.
fn decode_blob(raw: Vec<u8>) -> Vec<u8> {
    if raw.starts_with(b"PCSB") {
        return raw;
    }
    let text: Vec<u8> = raw.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    B64.decode(&text).unwrap_or(raw)
}

/// Runs a `tpm` subcommand.
pub async fn run(socket: &Path, cmd: TpmCmd) -> Result<(), Failure> {
    let mut c = TpmClient::new(channel(socket).await?);
    match cmd {
        TpmCmd::Identity { json } => {
            let id = c.get_device_identity(GetDeviceIdentityRequest {}).await.map_err(|s| status_failure(&s))?;
            let id = id.into_inner();
            if json {
                println!("{}", serde_json::json!({ "device_id": id.device_id, "ek_public_pem": id.ek_public_pem }));
            } else {
                println!("device id  {}", id.device_id);
                print!("EK public key (RSA 2048, TCG default template):\n{}", id.ek_public_pem);
            }
        }
        TpmCmd::Pcrs { bank, indices, json } => {
            let r = c.read_pcrs(ReadPcrsRequest { bank, indices }).await.map_err(|s| status_failure(&s))?;
            let r = r.into_inner();
            if json {
                let pcrs: Vec<_> =
                    r.pcrs.iter().map(|p| serde_json::json!({ "index": p.index, "value": hex(&p.digest) })).collect();
                println!("{}", serde_json::json!({ "bank": r.bank, "pcrs": pcrs }));
            } else {
                let rows: Vec<Vec<String>> = r.pcrs.iter().map(|p| vec![p.index.to_string(), hex(&p.digest)]).collect();
                table(&["PCR", &r.bank.to_ascii_uppercase()], &rows);
            }
        }
        TpmCmd::Seal { pcrs, input, output } => {
            let secret = zeroize::Zeroizing::new(read_input(&input)?);
            let req = SealSecretRequest { secret: secret.to_vec(), pcrs };
            let blob = c.seal_secret(req).await.map_err(|s| status_failure(&s))?.into_inner().sealed_blob;
            print_blob(&blob, output)?;
        }
        TpmCmd::Reseal { expected, input, output } => {
            let expected = parse_expected(&expected)?;
            let blob = decode_blob(read_input(&input)?);
            let r = c.reseal_secret(ResealSecretRequest { sealed_blob: blob, expected }).await;
            print_blob(&r.map_err(|s| status_failure(&s))?.into_inner().sealed_blob, output)?;
        }
        TpmCmd::TokenKey { json } => {
            let k = c.get_device_token_key(GetDeviceTokenKeyRequest {}).await.map_err(|s| status_failure(&s))?;
            let k = k.into_inner();
            if json {
                let jwk: serde_json::Value = serde_json::from_str(&k.jwk_json).unwrap_or_default();
                println!("{}", serde_json::json!({ "kid": k.kid, "public_key_pem": k.public_key_pem, "jwk": jwk }));
            } else {
                println!("kid  {}", k.kid);
                println!("jwk  {}", k.jwk_json);
                print!("{}", k.public_key_pem);
            }
        }
        TpmCmd::SignToken { tier, features, ttl, json } => {
            let req = SignDeviceTokenRequest { subscription_tier: tier, features, ttl_seconds: ttl };
            let t = c.sign_device_token(req).await.map_err(|s| status_failure(&s))?.into_inner();
            if json {
                println!("{}", serde_json::json!({ "token": t.token, "expires_at": t.expires_at }));
            } else {
                println!("{}", t.token);
            }
        }
        TpmCmd::EnrollDisk { partition, pcrs, key_file } => {
            let unlock_key = zeroize::Zeroizing::new(read_input(&Some(key_file))?);
            let req = EnrollDiskTpmRequest { partition: partition.clone(), pcrs, unlock_key: unlock_key.to_vec() };
            let r = c.enroll_disk_tpm(req).await.map_err(|s| status_failure(&s))?.into_inner();
            println!("enrolled TPM2 keyslot {} on {partition}", r.keyslot);
        }
        TpmCmd::ResealDisk { partition, expected, key_file } => {
            let expected = parse_expected(&expected)?;
            let unlock_key = zeroize::Zeroizing::new(read_input(&Some(key_file))?);
            let req = ResealDiskTpmRequest { partition: partition.clone(), expected, unlock_key: unlock_key.to_vec() };
            let r = c.reseal_disk_tpm(req).await.map_err(|s| status_failure(&s))?.into_inner();
            println!("enrolled TPM2 keyslot {} on {partition}; wiped {:?}", r.keyslot, r.wiped_keyslots);
        }
        TpmCmd::Unseal { input, output } => {
            let blob = decode_blob(read_input(&input)?);
            let r = c.unseal_secret(UnsealSecretRequest { sealed_blob: blob }).await.map_err(|s| status_failure(&s))?;
            let secret = zeroize::Zeroizing::new(r.into_inner().secret);
            match output {
                Some(p) => write_private(&p, &secret)?,
                None => std::io::stdout()
                    .write_all(&secret)
                    .map_err(|e| Failure::new(1, format!("cannot write stdout: {e}")))?,
            }
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
