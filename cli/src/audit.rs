// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl audit verify|show`: reads the files directly (group `piccolo-audit`).

use std::path::PathBuf;

use clap::Subcommand;
use piccolo_audit::{Decision, Record, chain_files, read_chain_state, read_records, verify_files};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Failure;
use crate::output::table;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain. Exits 5 naming the first broken record.
    Verify {
        /// Files oldest first (default: every file of --log's chain).
        files: Vec<PathBuf>,
        /// The live log; its `.state` checkpoint file is used too.
        #[arg(long, default_value = piccolo_proto::paths::AUDIT_LOG)]
        log: PathBuf,
    },
    /// Show records, newest last.
    Show {
        /// The live log (rotated files are read too).
        #[arg(long, default_value = piccolo_proto::paths::AUDIT_LOG)]
        log: PathBuf,
        /// Only records at or after this time: RFC 3339, or an age like 30s, 15m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Only this RPC (or event name).
        #[arg(long)]
        rpc: Option<String>,
        /// Only this caller: uid or user name.
        #[arg(long)]
        caller: Option<String>,
        /// Only allow or deny.
        #[arg(long, value_parser = ["allow", "deny"])]
        decision: Option<String>,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AuditCmd) -> Result<(), Failure> {
    match cmd {
        AuditCmd::Verify { files, log } => verify(files, log),
        AuditCmd::Show { log, since, rpc, caller, decision, json } => {
            let since = since.map(|s| parse_since(&s)).transpose()?;
            let decision = decision.map(|d| if d == "allow" { Decision::Allow } else { Decision::Deny });
            show(&log, since, rpc, caller, decision, json)
        }
    }
}

fn verify(files: Vec<PathBuf>, log: PathBuf) -> Result<(), Failure> {
    let files = if files.is_empty() { chain_files(&log) } else { files };
    if files.is_empty() {
        return Err(Failure::new(1, format!("no audit files found at {}", log.display())));
    }
    let state =
        read_chain_state(&log).map_err(|e| Failure::new(1, format!("cannot read {}.state: {e}", log.display())))?;
    match verify_files(&files, &state) {
        Ok(s) => {
            println!(
                "ok: {} records, seq {}..{} in {} file(s)",
                s.records,
                s.first_seq.map_or("-".into(), |v| v.to_string()),
                s.last_seq.map_or("-".into(), |v| v.to_string()),
                files.len()
            );
            Ok(())
        }
        Err(e) => Err(Failure::new(
            5,
            format!(
                "audit chain broken at {}:{}{}: {}",
                e.file.display(),
                e.line,
                e.seq.map_or(String::new(), |s| format!(" (seq {s})")),
                e.reason
            ),
        )),
    }
}

fn parse_since(s: &str) -> Result<OffsetDateTime, Failure> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let bad = || Failure::new(2, format!("--since {s:?}: expected RFC 3339 or an age like 30s, 15m, 2h, 7d"));
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    Ok(OffsetDateTime::now_utc() - time::Duration::seconds(secs))
}

fn caller_matches(r: &Record, want: &str) -> bool {
    r.entry.caller.as_ref().is_some_and(|c| c.uid.to_string() == want || c.user.as_deref() == Some(want))
}

fn show(
    log: &std::path::Path,
    since: Option<OffsetDateTime>,
    rpc: Option<String>,
    caller: Option<String>,
    decision: Option<Decision>,
    json: bool,
) -> Result<(), Failure> {
    let files = chain_files(log);
    if files.is_empty() {
        return Err(Failure::new(1, format!("no audit files found at {}", log.display())));
    }
    let mut rows = Vec::new();
    for r in read_records(&files) {
        let r = r.map_err(|e| Failure::new(1, e))?;
        if let Some(t) = since
            && OffsetDateTime::parse(&r.ts, &Rfc3339).is_ok_and(|ts| ts < t)
        {
            continue;
        }
        if rpc.as_ref().is_some_and(|x| *x != r.entry.rpc)
            || caller.as_ref().is_some_and(|c| !caller_matches(&r, c))
            || decision.is_some_and(|d| r.entry.decision != Some(d))
        {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            continue;
        }
        let who = r
            .entry
            .caller
            .as_ref()
            .map_or("-".to_string(), |c| format!("{}({})", c.user.clone().unwrap_or_else(|| "?".into()), c.uid));
        let dec = match r.entry.decision {
            Some(Decision::Allow) => "allow",
            Some(Decision::Deny) => "deny",
            None => "-",
        };
        let outcome = r.entry.outcome.as_ref().map_or("-".to_string(), |o| o.code.clone());
        let kind =
            serde_json::to_value(r.entry.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let dur = r.entry.duration_us.map_or("-".to_string(), |d| format!("{d}us"));
        rows.push(vec![r.seq.to_string(), r.ts.clone(), who, r.entry.rpc.clone(), kind, dec.into(), outcome, dur]);
    }
    if !json {
        table(&["SEQ", "TIME", "CALLER", "RPC", "KIND", "DECISION", "OUTCOME", "DURATION"], &rows);
    }
    Ok(())
}
