// SPDX-License-Identifier: Apache-2.0
//! Chain verification: every record canonical and correctly hashed, sequence numbers
//! consecutive, each `prev` equal to the hash before it, the start linked to genesis or to
//! the rotation anchor, and the end not before the writer's head checkpoint.

use std::path::PathBuf;

use crate::error::VerifyError;
use crate::files::ChainState;
use crate::record::{GENESIS, Record};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Records checked.
    pub records: u64,
    /// First and last sequence numbers, if any record was present.
    pub first_seq: Option<u64>,
    /// Last sequence number.
    pub last_seq: Option<u64>,
    /// Hash of the last record.
    pub last_hash: Option<String>,
}

/// Verifies `files` (oldest first) as one chain, against the writer's checkpoints.
pub fn verify_files(files: &[PathBuf], state: &ChainState) -> Result<VerifySummary, VerifyError> {
    let mut prev: Option<(u64, String)> = None;
    let mut summary = VerifySummary { records: 0, first_seq: None, last_seq: None, last_hash: None };
    for file in files {
        let err = |line: usize, seq: Option<u64>, reason: String| VerifyError { file: file.clone(), line, seq, reason };
        let text = crate::files::read_log(file).map_err(|r| err(0, None, r))?;
        let mut rest = text.as_str();
        let mut lineno = 0;
        while !rest.is_empty() {
            lineno += 1;
            let Some(nl) = rest.find('\n') else {
                return Err(err(lineno, None, "last record is truncated (no end of line)".into()));
            };
            let line = &rest[..nl];
            rest = &rest[nl + 1..];
            let rec = Record::parse_checked(line).map_err(|r| err(lineno, None, r))?;
            match &prev {
                None => check_start(&rec, state).map_err(|r| err(lineno, Some(rec.seq), r))?,
                Some((pseq, phash)) => {
                    if rec.seq != pseq + 1 {
                        return Err(err(
                            lineno,
                            Some(rec.seq),
                            format!("sequence jumps from {pseq} to {} (record deleted or reordered)", rec.seq),
                        ));
                    }
                    if &rec.prev != phash {
                        return Err(err(
                            lineno,
                            Some(rec.seq),
                            "prev does not match the previous record's hash".into(),
                        ));
                    }
                }
            }
            if let Some(head) = &state.head
                && head.seq == rec.seq
                && head.hash != rec.hash
            {
                return Err(err(lineno, Some(rec.seq), "record differs from the writer's head checkpoint".into()));
            }
            summary.records += 1;
            summary.first_seq.get_or_insert(rec.seq);
            prev = Some((rec.seq, rec.hash));
        }
    }
    if let Some(head) = &state.head {
        let last = prev.as_ref().map(|(s, _)| *s);
        if last.is_none_or(|l| l < head.seq) {
            return Err(VerifyError {
                file: files.last().cloned().unwrap_or_default(),
                line: 0,
                seq: last,
                reason: format!(
                    "chain truncated: it ends at {} but the writer's checkpoint says record {} was written",
                    last.map_or("no record".to_string(), |l| format!("record {l}")),
                    head.seq
                ),
            });
        }
    }
    if let Some((s, h)) = prev {
        summary.last_seq = Some(s);
        summary.last_hash = Some(h);
    }
    Ok(summary)
}

fn check_start(rec: &Record, state: &ChainState) -> Result<(), String> {
    if rec.prev == GENESIS {
        return if rec.seq == 0 { Ok(()) } else { Err(format!("record {} claims to start the chain", rec.seq)) };
    }
    match &state.anchor {
        Some(a) if a.seq + 1 == rec.seq && a.hash == rec.prev => Ok(()),
        _ => Err(format!(
            "chain truncated at the start: first record {} links to a record that is not in the given files",
            rec.seq
        )),
    }
}
