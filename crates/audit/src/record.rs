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
    ///
    /// Writes the canonical bytes directly (keys in sorted order, see the `encode_*`
    /// helpers) instead of building a `serde_json::Value` and sorting it: this runs for every
    /// call before its fsync. `hash` sorts between `duration_us` and `intent_seq`, so the
    /// encoding is built as a head (`{` … `duration_us`) and a tail (`,"intent_seq"` … `}`):
    /// the hash covers head + tail, the stored line is head + `,"hash":"…"` + tail. The
    /// tests check the result byte for byte against the generic canonical encoder.
    pub(crate) fn seal(entry: Entry, seq: u64, ts: String, prev: String) -> (Record, String) {
        let mut head = String::with_capacity(384);
        let mut tail = String::with_capacity(256);
        encode_head(&entry, &mut head);
        encode_tail(&entry, seq, &ts, &prev, &mut tail);
        let mut sha = Sha256::new();
        sha.update(head.as_bytes());
        sha.update(tail.as_bytes());
        let hash = hex::encode(sha.finalize());
        let mut line = head;
        line.reserve(tail.len() + 76);
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push('"');
        line.push_str(&tail);
        (Record { seq, ts, entry, prev, hash }, line)
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

/// `{"args":…,"caller":{…},"decision":…,"duration_us":…` (keys before `hash`, sorted).
fn encode_head(e: &Entry, out: &mut String) {
    out.push_str("{\"args\":");
    canonical::write(&e.args, out);
    if let Some(c) = &e.caller {
        out.push_str(",\"caller\":{");
        // exe < gid < pid < uid < unit < user; `gid` always present, so commas follow it.
        if let Some(exe) = &c.exe {
            out.push_str("\"exe\":");
            canonical::write_str(exe, out);
            out.push(',');
        }
        push_num(out, "\"gid\":", c.gid);
        if let Some(pid) = c.pid {
            push_num(out, ",\"pid\":", pid);
        }
        push_num(out, ",\"uid\":", c.uid);
        if let Some(unit) = &c.unit {
            out.push_str(",\"unit\":");
            canonical::write_str(unit, out);
        }
        if let Some(user) = &c.user {
            out.push_str(",\"user\":");
            canonical::write_str(user, out);
        }
        out.push('}');
    }
    if let Some(d) = e.decision {
        out.push_str(match d {
            Decision::Allow => ",\"decision\":\"allow\"",
            Decision::Deny => ",\"decision\":\"deny\"",
        });
    }
    if let Some(us) = e.duration_us {
        push_num(out, ",\"duration_us\":", us);
    }
}

/// `,"intent_seq":…,"kind":…,"outcome":{…},"prev":…,"rpc":…,"seq":…,"ts":…}` (keys after `hash`).
fn encode_tail(e: &Entry, seq: u64, ts: &str, prev: &str, out: &mut String) {
    if let Some(s) = e.intent_seq {
        push_num(out, ",\"intent_seq\":", s);
    }
    out.push_str(match e.kind {
        Kind::Call => ",\"kind\":\"call\"",
        Kind::Intent => ",\"kind\":\"intent\"",
        Kind::Outcome => ",\"kind\":\"outcome\"",
        Kind::Event => ",\"kind\":\"event\"",
    });
    if let Some(o) = &e.outcome {
        out.push_str(",\"outcome\":{\"code\":");
        canonical::write_str(&o.code, out);
        if let Some(m) = &o.message {
            out.push_str(",\"message\":");
            canonical::write_str(m, out);
        }
        out.push('}');
    }
    out.push_str(",\"prev\":");
    canonical::write_str(prev, out);
    out.push_str(",\"rpc\":");
    canonical::write_str(&e.rpc, out);
    push_num(out, ",\"seq\":", seq);
    out.push_str(",\"ts\":");
    canonical::write_str(ts, out);
    out.push('}');
}

fn push_num(out: &mut String, key: &str, n: impl std::fmt::Display) {
    use std::fmt::Write;
    out.push_str(key);
    // Writing into a String cannot fail; integers render as serde_json renders them.
    let _ = write!(out, "{n}");
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

    /// The encoding before the direct writer: serde_json `Value`, then the generic encoder.
    fn reference(rec: &Record) -> (String, String) {
        let v = serde_json::to_value(rec).unwrap();
        (hash_without_hash_field(&v), canonical::to_string(&v))
    }

    fn opt<T: std::fmt::Debug>(
        s: impl proptest::strategy::Strategy<Value = T>,
    ) -> impl proptest::strategy::Strategy<Value = Option<T>> {
        proptest::option::of(s)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn direct_encoding_is_byte_identical_to_the_generic_one(
            kind in 0usize..4, rpc in "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}\u{7f}é😀]{0,6}",
            caller in opt((proptest::prelude::any::<u32>(), proptest::prelude::any::<u32>(), opt(proptest::prelude::any::<i32>()),
                opt("\\PC{0,8}"), opt("[/a-z\u{0}-\u{1f}\"]{0,10}"), opt("\\PC{0,8}"))),
            args in proptest::collection::btree_map("\\PC{0,6}", proptest::prelude::any::<i64>(), 0..4),
            nested in opt("\\PC{0,8}"),
            decision in opt(proptest::prelude::any::<bool>()),
            outcome in opt(("[A-Z_]{1,10}", opt("\\PC{0,16}"))),
            duration in opt(proptest::prelude::any::<u64>()), intent in opt(proptest::prelude::any::<u64>()),
            seq in proptest::prelude::any::<u64>(), ts in "\\PC{0,25}", prev in "[0-9a-f]{64}",
        ) {
            let mut a = serde_json::Map::new();
            for (k, n) in args {
                a.insert(k, n.into());
            }
            if let Some(s) = nested {
                a.insert("nested".into(), serde_json::json!({"z": [s, null, true, 1.5], "a": {}}));
            }
            let entry = Entry {
                kind: [Kind::Call, Kind::Intent, Kind::Outcome, Kind::Event][kind],
                rpc,
                caller: caller.map(|(uid, gid, pid, user, exe, unit)| Caller { uid, gid, pid, user, exe, unit }),
                args: if a.is_empty() && seq % 3 == 0 { Value::Null } else { Value::Object(a) },
                decision: decision.map(|d| if d { Decision::Allow } else { Decision::Deny }),
                outcome: outcome.map(|(code, message)| Outcome { code, message }),
                duration_us: duration,
                intent_seq: intent,
            };
            let (rec, line) = Record::seal(entry, seq, ts, prev);
            let (hash, want) = reference(&rec);
            proptest::prop_assert_eq!(&rec.hash, &hash);
            proptest::prop_assert_eq!(&line, &want);
            proptest::prop_assert_eq!(Record::parse_checked(&line).unwrap(), rec);
        }
    }
}
