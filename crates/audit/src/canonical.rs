// SPDX-License-Identifier: Apache-2.0
//! Canonical JSON: objects with keys sorted by bytes, no whitespace, serde_json's escaping
//! and number formatting. Independent of serde_json's `preserve_order` feature, so the
//! encoding cannot change because another crate in the build turned that feature on.

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
        // Null, bool and numbers have one serde_json rendering.
        other => out.push_str(&other.to_string()),
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push_str(&Value::String(s.to_owned()).to_string());
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
}
