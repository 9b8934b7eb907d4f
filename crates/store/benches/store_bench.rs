// SPDX-License-Identifier: Apache-2.0
//! Store write throughput against a bare rusqlite baseline, measured in the same run on the
//! same filesystem with the same pragmas (WAL, synchronous=FULL, busy timeout, foreign keys,
//! temp_store=MEMORY).
//!
//! * baseline: one `INSERT` of an app-sized row per IMMEDIATE transaction, called directly.
//! * store: [`Store::write_app`]: the same row plus its chained revision row, in one
//!   transaction, called through the async API (tokio blocking pool).
//!
//! `cargo bench -p piccolo-store --bench store_bench` (`BENCH_WRITES`, default 2000;
//! `BENCH_DIR` picks the filesystem, default the system temp dir).

use std::time::{Duration, Instant};

use piccolo_store::{AppWrite, Role, Store};
use rusqlite::{Connection, TransactionBehavior, params};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut lat: Vec<Duration>, total: Duration) -> f64 {
    lat.sort();
    let rate = lat.len() as f64 / total.as_secs_f64();
    println!(
        "{name:<34} {rate:>9.0} writes/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    rate
}

fn spec(i: usize) -> String {
    format!("name: app-{i}\nimage: registry.example/app:{i}\nports: [8080]\n{}", "x".repeat(200))
}

fn baseline(dir: &std::path::Path, n: usize) -> f64 {
    let path = dir.join("baseline.db");
    let mut conn = Connection::open(&path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    conn.busy_timeout(piccolo_store::BUSY_TIMEOUT).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
    conn.execute_batch(
        "CREATE TABLE apps (name TEXT PRIMARY KEY, spec TEXT NOT NULL, enabled INTEGER NOT NULL,
                            status TEXT NOT NULL, updated TEXT NOT NULL) STRICT",
    )
    .unwrap();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        tx.execute(
            "INSERT INTO apps (name, spec, enabled, status, updated) VALUES (?1, ?2, 1, 'running', '2026-01-01T00:00:00Z')
             ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
            params![format!("app-{i}"), spec(i)],
        )
        .unwrap();
        tx.commit().unwrap();
        lat.push(t.elapsed());
    }
    report("bare rusqlite insert (baseline)", lat, start.elapsed())
}

async fn store(dir: &std::path::Path, n: usize) -> f64 {
    let s = Store::locked();
    s.open(&dir.join("store.db"), Role::Leader).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let app = AppWrite { name: format!("app-{i}"), spec: spec(i), enabled: true, status: "running".into() };
        s.write_app("bench", app).await.unwrap();
        lat.push(t.elapsed());
    }
    let rate = report("Store::write_app (+ revision row)", lat, start.elapsed());
    assert_eq!(s.read_journal_verification().await.unwrap().rows, n as u64);
    s.close().await.unwrap();
    rate
}

fn main() {
    let n: usize = std::env::var("BENCH_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let base = std::env::var_os("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!("store write throughput, {n} sequential durable writes each, in {}", base.display());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Interleave two rounds so drift in the disk's fsync cost hits both sides.
    let mut ratios = Vec::new();
    for round in 1..=2 {
        println!("round {round}");
        let b = baseline(&tempfile::tempdir_in(dir.path()).unwrap().keep(), n);
        let s = rt.block_on(store(&tempfile::tempdir_in(dir.path()).unwrap().keep(), n));
        ratios.push(s / b);
    }
    for (i, r) in ratios.iter().enumerate() {
        println!("round {}: store / baseline throughput = {r:.2}x", i + 1);
    }
}
