// SPDX-License-Identifier: Apache-2.0
//! Store write throughput against a bare rusqlite baseline, measured in the same run on the
//! same filesystem with the same pragmas (WAL, synchronous=FULL, busy timeout, foreign keys,
//! temp_store=MEMORY, journal_size_limit).
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

/// The `per_mille`-th latency of a sorted, non-empty list.
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[((sorted.len() - 1) * per_mille / 1000).min(sorted.len() - 1)]
}

fn report(name: &str, mut lat: Vec<Duration>, total: Duration) -> f64 {
    lat.sort();
    let rate = lat.len() as f64 / total.as_secs_f64();
    println!(
        "{name:<34} {rate:>9.0} writes/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        percentile(&lat, 500).as_secs_f64() * 1e3,
        percentile(&lat, 990).as_secs_f64() * 1e3
    );
    rate
}

fn spec(i: usize) -> String {
    format!("name: app-{i}\nimage: registry.example/app:{i}\nports: [8080]\n{}", "x".repeat(200))
}

fn open_baseline(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    conn.busy_timeout(piccolo_store::BUSY_TIMEOUT).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
    conn.pragma_update(None, "journal_size_limit", piccolo_store::WAL_SIZE_LIMIT_BYTES).unwrap();
    conn.execute_batch(
        "CREATE TABLE apps (name TEXT PRIMARY KEY, spec TEXT NOT NULL, enabled INTEGER NOT NULL,
                            status TEXT NOT NULL, updated TEXT NOT NULL) STRICT",
    )
    .unwrap();
    conn
}

fn baseline_write(conn: &mut Connection, i: usize) {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
    tx.execute(
        "INSERT INTO apps (name, spec, enabled, status, updated) VALUES (?1, ?2, 1, 'running', '2026-01-01T00:00:00Z')
         ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
        params![format!("app-{i}"), spec(i)],
    )
    .unwrap();
    tx.commit().unwrap();
}

fn main() {
    let n: usize = std::env::var("BENCH_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let base = std::env::var_os("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!("store write throughput, {n} sequential durable writes each, in {}", base.display());
    println!("(batches of {BATCH} alternate between the two, so drift in the fsync cost hits both alike)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut conn = open_baseline(&dir.path().join("baseline.db"));
    let store = Store::locked();
    rt.block_on(store.open(&dir.path().join("store.db"), Role::Leader)).unwrap();
    let (mut lat_b, mut lat_s) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut tot_b, mut tot_s) = (Duration::ZERO, Duration::ZERO);
    let mut i = 0;
    while i < n {
        let end = (i + BATCH).min(n);
        let t0 = Instant::now();
        for k in i..end {
            let t = Instant::now();
            baseline_write(&mut conn, k);
            lat_b.push(t.elapsed());
        }
        tot_b += t0.elapsed();
        let t0 = Instant::now();
        rt.block_on(async {
            for k in i..end {
                let t = Instant::now();
                let app = AppWrite { name: format!("app-{k}"), spec: spec(k), enabled: true, status: "running".into() };
                store.write_app("bench", app).await.unwrap();
                lat_s.push(t.elapsed());
            }
        });
        tot_s += t0.elapsed();
        i = end;
    }
    let b = report("bare rusqlite insert (baseline)", lat_b, tot_b);
    let s = report("Store::write_app (+ revision row)", lat_s, tot_s);
    rt.block_on(async {
        assert_eq!(store.read_journal_verification().await.unwrap().rows, n as u64);
        store.close().await.unwrap();
    });
    println!("store / baseline throughput = {:.2}x", s / b);
}

const BATCH: usize = 100;
