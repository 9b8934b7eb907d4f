// SPDX-License-Identifier: Apache-2.0
//! Canonical JSON: objects with keys sorted by bytes, no whitespace, serde_json's escaping
//! and number formatting. Independent of serde_json's `preserve_order` feature, so the
//! encoding cannot change because another crate in the build turned that feature on.
//!
//! Strings are escaped here rather than through a temporary `Value`: the writer encodes
//! every field of every record on the hot path, and the tests pin the escaping to
//! serde_json's byte for byte.

use serde_json::Value;

/// Appends the canonical encoding of `v` to `out`.
pub fn write(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(k, out);
                out.push(':');
                write(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_str(s, out),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // Numbers have one serde_json rendering (integers in decimal, floats via ryu).
        Value::Number(n) => out.push_str(&n.to_string()),
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json does: `"` and `\`, the short
/// forms `\b \f \n \r \t`, other control characters below 0x20 as `\u00xx` (lowercase hex),
/// everything else (DEL and non-ASCII included) verbatim.
pub fn write_str(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every escaped byte is ASCII, so these slice bounds are char boundaries.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The canonical encoding of `v` as a new string.
pub fn to_string(v: &Value) -> String {
    let mut s = String::with_capacity(256);
    write(v, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sorted_recursively_and_compact() {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": {"z": [1, "x\n"], "c": null}}"#).unwrap();
        assert_eq!(to_string(&v), r#"{"a":{"c":null,"z":[1,"x\n"]},"b":1}"#);
    }

    #[test]
    fn string_escaping_matches_serde_json_for_every_ascii_byte_and_more() {
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| format!("a{}z", char::from(b))).collect();
        samples.extend(["", "\"\\", "é✓😀", "\u{7f}\u{80}\u{2028}\u{2029}", "\u{0}\u{1f}x"].map(String::from));
        for s in samples {
            let mut ours = String::new();
            write_str(&s, &mut ours);
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "escaping of {s:?}");
        }
    }

    #[test]
    fn scalars_match_serde_json() {
        for v in [
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!(false),
            serde_json::json!(-3),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.5),
        ] {
            assert_eq!(to_string(&v), v.to_string());
        }
    }
}
