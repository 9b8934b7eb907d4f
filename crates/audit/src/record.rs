// SPDX-License-Identifier: Apache-2.0
//! One audit record and its hash.
//!
//! `hash` = lowercase hex SHA-256 of the canonical encoding of the record without its
//! `hash` field; the stored line is the canonical encoding of the whole record. `prev` is
//! the previous record's `hash` ([`GENESIS`] for the first record ever).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::canonical;

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who made the call, as the broker saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// SO_PEERCRED uid.
    pub uid: u32,
    /// SO_PEERCRED gid.
    pub gid: u32,
    /// SO_PEERCRED pid at connect time (audit only: pids are reused).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<i32>,
    /// User name of `uid`, if it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// `/proc/<pid>/exe`, if readable.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exe: Option<String>,
    /// The systemd unit from `/proc/<pid>/cgroup`, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unit: Option<String>,
}

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A whole call: read-only RPCs and every denied call.
    Call,
    /// Written before a mutating RPC acts.
    Intent,
    /// Written after a mutating RPC acted; `intent_seq` points at its intent.
    Outcome,
    /// Something the broker did on its own (start, stop, policy reload, recovery).
    Event,
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// A rule allowed it.
    Allow,
    /// No rule allowed it.
    Deny,
}

/// How the call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `ok` or a gRPC code name such as `PERMISSION_DENIED`.
    pub code: String,
    /// The error message returned to the caller (never a secret).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

impl Outcome {
    /// Success.
    pub fn ok() -> Self {
        Outcome { code: "ok".into(), message: None }
    }
    /// Whether this is success.
    pub fn is_ok(&self) -> bool {
        self.code == "ok"
    }
}

/// What the broker hands the writer; the writer adds seq, time and the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Record kind.
    pub kind: Kind,
    /// RPC name, or an event name such as `broker.start`.
    pub rpc: String,
    /// The caller; absent for broker events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub caller: Option<Caller>,
    /// Argument summary: sizes, digests, ids; never secrets.
    #[serde(default)]
    pub args: Value,
    /// Policy decision, for calls.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decision: Option<Decision>,
    /// Result, for calls and outcomes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<Outcome>,
    /// Wall time of the call in microseconds, for calls and outcomes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_us: Option<u64>,
    /// For an outcome: the seq of its intent record.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub intent_seq: Option<u64>,
}

impl Entry {
    /// A broker event (start, stop, reload, recovery): no caller, no decision.
    pub fn event(name: &str, args: Value) -> Entry {
        Entry {
            kind: Kind::Event,
            rpc: name.to_owned(),
            caller: None,
            args,
            decision: None,
            outcome: None,
            duration_us: None,
            intent_seq: None,
        }
    }
}

/// A durable record as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain, from 0, never reset by rotation.
    pub seq: u64,
    /// UTC time the writer sealed the record (RFC 3339).
    pub ts: String,
    /// The entry's fields.
    #[serde(flatten)]
    pub entry: Entry,
    /// Hash of the previous record.
    pub prev: String,
    /// Hash of this record.
    pub hash: String,
}

/// SHA-256 over the canonical encoding of `v` without its `hash` key.
pub(crate) fn hash_without_hash_field(v: &Value) -> String {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("hash");
    }
    hex::encode(Sha256::digest(canonical::to_string(&v).as_bytes()))
}

impl Record {
    /// Builds and hashes a record; returns it with its line (no trailing newline).
    pub(crate) fn seal(entry: Entry, seq: u64, ts: String, prev: String) -> (Record, String) {
        let mut rec = Record { seq, ts, entry, prev, hash: String::new() };
        // Serializing plain data structures into a Value cannot fail.
        let mut v = serde_json::to_value(&rec).unwrap_or(Value::Null);
        rec.hash = hash_without_hash_field(&v);
        if let Value::Object(m) = &mut v {
            m.insert("hash".into(), Value::String(rec.hash.clone()));
        }
        let line = canonical::to_string(&v);
        (rec, line)
    }

    /// Parses one stored line and checks that it is canonical and self-consistent.
    pub fn parse_checked(line: &str) -> Result<Record, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
        let rec: Record = serde_json::from_value(v.clone()).map_err(|e| format!("not an audit record ({e})"))?;
        if canonical::to_string(&v) != line {
            return Err("record is not in canonical form (edited?)".into());
        }
        let want = hash_without_hash_field(&v);
        if want != rec.hash {
            return Err(format!(
                "hash mismatch: record content was changed (stored {}, computed {})",
                short(&rec.hash),
                short(&want)
            ));
        }
        Ok(rec)
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            kind: Kind::Call,
            rpc: "GetInfo".into(),
            caller: Some(Caller { uid: 0, gid: 0, pid: Some(1), user: Some("root".into()), exe: None, unit: None }),
            args: serde_json::json!({}),
            decision: Some(Decision::Allow),
            outcome: Some(Outcome::ok()),
            duration_us: Some(12),
            intent_seq: None,
        }
    }

    #[test]
    fn sealed_line_parses_back() {
        let (rec, line) = Record::seal(entry(), 0, "2026-01-01T00:00:00Z".into(), GENESIS.into());
        assert_eq!(Record::parse_checked(&line).unwrap(), rec);
    }

    #[test]
    fn any_edit_is_detected() {
        let (_, line) = Record::seal(entry(), 0, "2026-01-01T00:00:00Z".into(), GENESIS.into());
        let edited = line.replace("\"uid\":0", "\"uid\":1");
        assert!(Record::parse_checked(&edited).unwrap_err().contains("hash mismatch"));
        let spaced = line.replacen(',', ", ", 1);
        assert!(Record::parse_checked(&spaced).unwrap_err().contains("canonical"));
    }
}
