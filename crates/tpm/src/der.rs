// SPDX-License-Identifier: Apache-2.0
//! Just enough DER to write SubjectPublicKeyInfo for an RSA and a P-256 public key, and PEM.

use base64::Engine;

fn len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(u8::try_from(n).unwrap_or(0));
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        out.push(0x80 | u8::try_from(bytes.len()).unwrap_or(0));
        out.extend_from_slice(&bytes);
    }
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    len(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A non-negative INTEGER from big-endian magnitude bytes.
fn uint(be: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = {
        let i = be.iter().position(|b| *b != 0).unwrap_or(be.len().saturating_sub(1));
        &be[i.min(be.len())..]
    };
    let mut body = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(trimmed);
    tlv(0x02, &body)
}

/// rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
const RSA_ALG: &[u8] = &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
/// id-ecPublicKey (1.2.840.10045.2.1), prime256v1 (1.2.840.10045.3.1.7).
const EC_P256_ALG: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
    0x01, 0x07,
];

fn spki(alg: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8]; // no unused bits
    bits.extend_from_slice(key);
    let mut body = alg.to_vec();
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// DER SubjectPublicKeyInfo of an RSA public key (modulus and exponent, big-endian).
pub fn rsa_spki(modulus: &[u8], exponent: u32) -> Vec<u8> {
    let mut seq = uint(modulus);
    seq.extend(uint(&exponent.to_be_bytes()));
    spki(RSA_ALG, &tlv(0x30, &seq))
}

/// DER SubjectPublicKeyInfo of a P-256 point (coordinates left-padded to 32 bytes).
pub fn p256_spki(x: &[u8; 32], y: &[u8; 32]) -> Vec<u8> {
    let mut point = vec![0x04];
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    spki(EC_P256_ALG, &point)
}

/// PEM armour with 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Left-pads a big-endian coordinate to 32 bytes (the TPM may drop leading zeros).
pub fn pad32(v: &[u8]) -> Option<[u8; 32]> {
    if v.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_lengths() {
        assert_eq!(uint(&[0x00, 0x01, 0x00, 0x01]), vec![0x02, 0x03, 0x01, 0x00, 0x01]);
        assert_eq!(uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(uint(&[0, 0]), vec![0x02, 0x01, 0x00]);
        let mut l = Vec::new();
        len(270, &mut l);
        assert_eq!(l, vec![0x82, 0x01, 0x0e]);
        assert_eq!(pad32(&[1]).unwrap()[31], 1);
        assert!(pad32(&[0; 33]).is_none());
    }
}
