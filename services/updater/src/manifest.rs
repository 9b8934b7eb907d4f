// SPDX-License-Identifier: Apache-2.0
//! The signed update manifest.
//!
//! The check answer is an envelope `{"manifest": B64, "signature": B64}`: `manifest` is the
//! JSON document's exact bytes, `signature` an Ed25519 signature over
//! [`SIGNING_CONTEXT`] followed by those bytes, made with the release key whose public half
//! is pinned in the config. Nothing in the document is looked at before the signature
//! verifies, and nothing is downloaded before the document passes [`Manifest::check`].

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Prefix of the signed bytes (domain separation: the key signs nothing else this way).
pub const SIGNING_CONTEXT: &[u8] = b"piccolo-update-manifest-v1\n";
/// Largest envelope accepted from the server.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// A manifest older than this is refused (a replayed "no update" would freeze the box).
pub const MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Tolerated clock skew into the future.
pub const MAX_SKEW_SECS: u64 = 3600;

/// What the server sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 of the manifest's JSON bytes.
    pub manifest: String,
    /// Base64 Ed25519 signature over `SIGNING_CONTEXT || manifest bytes`.
    pub signature: String,
}

/// The signed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `available`, `not_yet` (staged rollout: this device's turn has not come) or `none`.
    pub status: String,
    /// Channel the answer is for.
    pub channel: String,
    /// Unix seconds when it was signed.
    pub issued_at: u64,
    /// Version offered (`available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Payload size in bytes (`available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Lowercase hex SHA-256 of the payload (`available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Payload URL, absolute or relative to the server (`available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Seconds until asking again (`not_yet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// A checked offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Version.
    pub version: String,
    /// Exact size.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Absolute URL.
    pub url: String,
}

/// What a checked manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An update to fetch.
    Available(Offer),
    /// Staged rollout: ask again after this many seconds.
    NotYet(u64),
    /// Nothing newer.
    UpToDate,
}

/// Signs a manifest (the test update server and release tooling use this).
pub fn sign(key: &ed25519_dalek::SigningKey, manifest: &Manifest) -> Envelope {
    use ed25519_dalek::Signer;
    let bytes = serde_json::to_vec(manifest).unwrap_or_default();
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&bytes);
    let b64 = base64::engine::general_purpose::STANDARD;
    Envelope { manifest: b64.encode(&bytes), signature: b64.encode(key.sign(&msg).to_bytes()) }
}

/// Verifies the envelope's signature and parses the document (nothing else).
pub fn verify(body: &[u8], key: &VerifyingKey) -> Result<Manifest, String> {
    if body.len() > MAX_ENVELOPE_BYTES {
        return Err(format!("answer is {} bytes, more than {MAX_ENVELOPE_BYTES}", body.len()));
    }
    let env: Envelope = serde_json::from_slice(body).map_err(|e| format!("not a manifest envelope: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes = b64.decode(&env.manifest).map_err(|e| format!("manifest is not base64: {e}"))?;
    let sig = b64.decode(&env.signature).map_err(|e| format!("signature is not base64: {e}"))?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| "signature is not 64 bytes".to_string())?;
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&bytes);
    key.verify_strict(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| "signature does not verify against the pinned key".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("signed document is malformed: {e}"))
}

impl Manifest {
    /// Checks a verified document against this box: channel, age, fields, size bound.
    pub fn check(&self, channel: &str, server: &str, now: u64) -> Result<Answer, String> {
        if self.channel != channel {
            return Err(format!("manifest is for channel {:?}, this box follows {channel:?}", self.channel));
        }
        if self.issued_at + MAX_AGE_SECS < now {
            return Err(format!("manifest was issued at {} and is older than {MAX_AGE_SECS} s", self.issued_at));
        }
        if self.issued_at > now + MAX_SKEW_SECS {
            return Err(format!("manifest is issued in the future ({})", self.issued_at));
        }
        match self.status.as_str() {
            "none" => Ok(Answer::UpToDate),
            "not_yet" => Ok(Answer::NotYet(self.retry_after.unwrap_or(3600).clamp(1, 7 * 24 * 3600))),
            "available" => {
                let (Some(version), Some(size), Some(sha256), Some(url)) =
                    (&self.version, self.size, &self.sha256, &self.url)
                else {
                    return Err("an available update needs version, size, sha256 and url".into());
                };
                if version.is_empty()
                    || version.len() > 64
                    || !version.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
                {
                    return Err(format!("version {version:?} is not a plain version string"));
                }
                if size == 0 {
                    return Err("size is 0".into());
                }
                if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err("sha256 is not 64 hex digits".into());
                }
                let url = absolute_url(server, url)?;
                Ok(Answer::Available(Offer {
                    version: version.clone(),
                    size,
                    sha256: sha256.to_ascii_lowercase(),
                    url,
                }))
            }
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

/// `url` made absolute against `server`; only http(s), no user info.
pub fn absolute_url(server: &str, url: &str) -> Result<String, String> {
    let abs = if url.starts_with('/') {
        format!("{}{url}", server.trim_end_matches('/'))
    } else if url.starts_with("http://") || url.starts_with("https://") {
        url.to_owned()
    } else {
        return Err(format!("payload URL {url:?} is neither absolute nor server-relative"));
    };
    let authority = abs.split_once("://").map(|(_, r)| r.split('/').next().unwrap_or("")).unwrap_or("");
    if authority.contains('@') || authority.is_empty() || abs.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(format!("payload URL {url:?} is not allowed"));
    }
    Ok(abs)
}

/// Compares dotted versions segment by segment (numbers numerically, others as text).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let seg = |s: &str| s.split(['.', '-', '+']).map(str::to_owned).collect::<Vec<_>>();
    let (sa, sb) = (seg(a), seg(b));
    for i in 0..sa.len().max(sb.len()) {
        let (x, y) = (sa.get(i).map_or("0", String::as_str), sb.get(i).map_or("0", String::as_str));
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(p), Ok(q)) => p.cmp(&q),
            _ => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    std::cmp::Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
    }

    fn offer() -> Manifest {
        Manifest {
            status: "available".into(),
            channel: "stable".into(),
            issued_at: 1_000_000,
            version: Some("1.2.0".into()),
            size: Some(10),
            sha256: Some("AB".repeat(32)),
            url: Some("/payloads/1.2.0".into()),
            retry_after: None,
        }
    }

    #[test]
    fn signed_manifest_round_trip_and_checks() {
        let env = serde_json::to_vec(&sign(&key(), &offer())).unwrap();
        let m = verify(&env, &key().verifying_key()).unwrap();
        let a = m.check("stable", "http://h:1", 1_000_100).unwrap();
        let Answer::Available(o) = a else { panic!("{a:?}") };
        assert_eq!((o.url.as_str(), o.sha256), ("http://h:1/payloads/1.2.0", "ab".repeat(32)));
        assert!(m.check("beta", "http://h:1", 1_000_100).unwrap_err().contains("channel"));
        assert!(m.check("stable", "http://h:1", 1_000_000 + MAX_AGE_SECS + 1).unwrap_err().contains("older"));
        assert!(m.check("stable", "http://h:1", 1).unwrap_err().contains("future"));
    }

    #[test]
    fn bad_signatures_are_refused() {
        let good = sign(&key(), &offer());
        let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]);
        assert!(verify(&serde_json::to_vec(&good).unwrap(), &other.verifying_key()).is_err(), "wrong key");
        // Change one field and keep the old signature.
        let mut m = offer();
        m.size = Some(11);
        let tampered = Envelope { manifest: sign(&key(), &m).manifest, signature: good.signature.clone() };
        let e = verify(&serde_json::to_vec(&tampered).unwrap(), &key().verifying_key()).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        assert!(verify(b"{}", &key().verifying_key()).is_err());
        assert!(verify(&vec![b' '; MAX_ENVELOPE_BYTES + 1], &key().verifying_key()).unwrap_err().contains("more than"));
    }

    #[test]
    fn urls_and_versions() {
        assert!(absolute_url("http://h", "http://u@evil/x").is_err());
        assert!(absolute_url("http://h", "file:///etc/shadow").is_err());
        assert_eq!(absolute_url("http://h/", "/p").unwrap(), "http://h/p");
        assert_eq!(compare_versions("1.10.0", "1.9.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.2", "1.2.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.2.0", "1.3.0"), Ordering::Less);
    }
}
