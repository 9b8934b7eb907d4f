// SPDX-License-Identifier: Apache-2.0
//! Crash test: a writer process commits a stream of changes through [`Store`] and acknowledges
//! each on stdout only after the call returned; the parent SIGKILLs it at a random moment
//! (often in the middle of a commit), 100 times against the same database. After every kill
//! `PRAGMA integrity_check` must be `ok`, every acknowledged write must be present with its
//! value and its revision row, and the journal's checksum chain must verify.
//!
//! `harness = false`: the same binary is the writer when `PICCOLO_STORE_CRASH_CHILD` is set.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use piccolo_store::{AppWrite, Role, Store};
use rusqlite::Connection;

const CHILD_ENV: &str = "PICCOLO_STORE_CRASH_CHILD";
const START_ENV: &str = "PICCOLO_STORE_CRASH_START";
const ROUNDS: usize = 100;

fn main() {
    if let Some(db) = std::env::var_os(CHILD_ENV) {
        let start: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
        writer(PathBuf::from(db), start);
        return;
    }
    parent();
}

/// Writes forever: even `i` → an app `app-i` with status `v-i`; odd `i` → the remote config.
fn writer(db: PathBuf, start: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = Store::locked();
        store.open(&db, Role::Leader).await.unwrap();
        let mut out = std::io::stdout().lock();
        for i in start.. {
            let rev = if i.is_multiple_of(2) {
                let app = AppWrite {
                    name: format!("app-{i}"),
                    spec: format!("name: app-{i}\n{}", "x".repeat((i % 17) as usize * 100)),
                    enabled: i % 3 == 0,
                    status: format!("v-{i}"),
                };
                store.write_app("crash-writer", app).await.unwrap()
            } else {
                store.write_remote_config("crash-writer", serde_json::json!({ "seq": i })).await.unwrap()
            };
            writeln!(out, "ack {i} {}", rev.revision).unwrap();
            out.flush().unwrap();
        }
    });
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn parent() {
    let seed = std::env::var("PICCOLO_STORE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        u64::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() % (1 << 63)).unwrap()
            | 1
    });
    println!("store crash test: {ROUNDS} rounds, seed {seed} (PICCOLO_STORE_CRASH_SEED to repeat)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("control.db");
    let me = std::env::current_exe().unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut next = 0u64;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let mut child = Command::new(&me)
            .env(CHILD_ENV, &db)
            .env(START_ENV, next.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let want = 1 + rng.below(40);
        let mut round_acks = 0;
        for _ in 0..want {
            let line = lines.next().expect("writer died before acknowledging").unwrap();
            acked.push(parse_ack(&line));
            round_acks += 1;
        }
        // Land the kill at a random point of the next commit (a commit takes ~0.2-2 ms here).
        std::thread::sleep(Duration::from_micros(rng.below(2500)));
        let pid = nix_pid(child.id());
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill");
        // Acks already written to the pipe before the kill count too.
        for line in lines {
            acked.push(parse_ack(&line.unwrap()));
            round_acks += 1;
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: writer was killed");
        next = acked.last().map(|a| a.0 + 1).unwrap_or(0) + 1;
        verify(&db, &acked, round);
        if round.is_multiple_of(25) {
            println!("round {round}: {round_acks} acks this round, {} total", acked.len());
        }
    }
    println!(
        "store crash test: ok, {ROUNDS} kills, {} acknowledged writes all present, {:.1} s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}

fn nix_pid(id: u32) -> libc::pid_t {
    libc::pid_t::try_from(id).unwrap()
}

fn parse_ack(line: &str) -> (u64, u64) {
    let mut parts = line.split(' ');
    assert_eq!(parts.next(), Some("ack"), "{line}");
    (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap())
}

fn verify(db: &Path, acked: &[(u64, u64)], round: usize) {
    let conn = Connection::open(db).unwrap();
    let check: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(check, ["ok"], "round {round}: integrity_check");
    for &(i, rev) in acked {
        let (kind, subject): (String, String) = conn
            .query_row("SELECT kind, subject FROM revisions WHERE revision = ?1", [i64::try_from(rev).unwrap()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap_or_else(|e| panic!("round {round}: acknowledged revision {rev} (write {i}) missing: {e}"));
        if i.is_multiple_of(2) {
            assert_eq!((kind.as_str(), subject.as_str()), ("app.write", format!("app-{i}").as_str()));
            let status: String = conn
                .query_row("SELECT status FROM apps WHERE name = ?1", [format!("app-{i}")], |r| r.get(0))
                .unwrap_or_else(|e| panic!("round {round}: acknowledged app-{i} missing: {e}"));
            assert_eq!(status, format!("v-{i}"));
        } else {
            assert_eq!(kind, "remote_config.write");
        }
    }
    // The newest acknowledged remote-config write (or a later, unacknowledged one) is in place.
    if let Some(&(last_odd, _)) = acked.iter().rev().find(|(i, _)| i % 2 == 1) {
        let doc: String = conn.query_row("SELECT document FROM remote_config WHERE id = 1", [], |r| r.get(0)).unwrap();
        let seq = serde_json::from_str::<serde_json::Value>(&doc).unwrap()["seq"].as_u64().unwrap();
        assert!(seq >= last_odd, "round {round}: remote config seq {seq} older than acknowledged {last_odd}");
    }
    drop(conn);
    // The journal chain verifies through the store itself (every fifth round, to also cover
    // kills of a writer that starts from a checkpointed, truncated WAL).
    if round.is_multiple_of(5) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Store::locked();
            store.open(db, Role::Leader).await.unwrap();
            let check = store.read_journal_verification().await.unwrap();
            assert!(check.rows >= acked.len() as u64);
            store.close().await.unwrap();
        });
    }
}
