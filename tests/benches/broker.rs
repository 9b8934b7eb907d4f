// SPDX-License-Identifier: Apache-2.0
//! Broker round-trip benchmark, reported as ratios against baselines measured in the same run:
//!
//! - `echo`: a raw Unix-socket echo of a 64-byte message;
//! - `fsync-echo`: the same echo, but the server appends and fdatasyncs one audit-sized
//!   record per message first: the floor for any durably audited call;
//! - `fsync-echo, preallocated`: the same, but the record overwrites zeros written ahead
//!   of time, as the broker's audit writer does by default (`audit_preallocate`), so the
//!   `fdatasync` has no file size to make durable: the floor for the broker's own I/O;
//! - `GetInfo`: a real broker call (policy check, identity lookup, durable audit record).
//!
//! The rows are measured in interleaved rounds (`BENCH_ROUNDS`, default 5: echo, fsync-echo,
//! GetInfo, then 1 and 8 clients, again and again), so a drift in the machine's fsync
//! latency or load moves the floor and the broker alike instead of skewing one ratio; the
//! per-round ratios are printed next to the pooled one.
//!
//! Run: `cargo bench -p piccolo-tests --bench broker` (as root; the broker runs as a child).
//! `BENCH_CALLS` (default 5000) sets the latency sample size per row; `BENCH_RSS_CALLS`
//! (100000) the number of calls before the broker's RSS is read.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use piccolo_proto::v1::GetInfoRequest;
use piccolo_proto::v1::broker_client::BrokerClient;
use piccolo_testkit::broker::{Broker, BrokerOptions};

const POLICY: &str =
    "version = 1\n[[rule]]\nrpcs = [\"GetInfo\", \"WhoAmI\"]\nusers = [\"root\"]\nreason = \"bench\"\n";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `pct` in whole percent (50, 99).
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

struct Lat {
    p50: Duration,
    p99: Duration,
}

fn summarize(mut v: Vec<Duration>) -> Lat {
    v.sort_unstable();
    Lat { p50: percentile(&v, 50), p99: percentile(&v, 99) }
}

/// What the echo server does with a record before it answers.
#[derive(Clone, Copy, PartialEq)]
enum Floor {
    /// Nothing.
    Echo,
    /// Appends it and `fdatasync`s.
    Append,
    /// Overwrites zeros written ahead (like the broker's preallocated log) and `fdatasync`s.
    Preallocated,
}

/// Echo server: reads 64-byte messages, makes a record durable per `floor`, echoes.
fn echo_server(dir: &Path, name: &str, floor: Floor) -> std::path::PathBuf {
    let sock = dir.join(format!("{name}.sock"));
    let listener = UnixListener::bind(&sock).unwrap();
    let log = dir.join(format!("{name}.log"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(floor != Floor::Preallocated)
                    .write(true)
                    .open(&log)
                    .unwrap();
                // Far more than a run writes, so no extension happens while measuring.
                let ahead = 32 << 20;
                if floor == Floor::Preallocated {
                    f.write_all(&vec![0u8; ahead]).unwrap();
                    f.sync_all().unwrap();
                }
                // About the size of a broker audit record for GetInfo, newline included.
                let mut record = [b'x'; 421];
                record[420] = b'\n';
                let (mut buf, mut at) = ([0u8; 64], 0u64);
                while c.read_exact(&mut buf).is_ok() {
                    match floor {
                        Floor::Echo => {}
                        Floor::Append => f.write_all(&record).unwrap(),
                        Floor::Preallocated => {
                            std::os::unix::fs::FileExt::write_all_at(&f, &record, at % ahead as u64).unwrap();
                            at += record.len() as u64;
                        }
                    }
                    if floor != Floor::Echo {
                        f.sync_data().unwrap();
                    }
                    if c.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    sock
}

fn echo_latency(c: &mut UnixStream, n: usize) -> Vec<Duration> {
    let msg = [1u8; 64];
    let mut buf = [0u8; 64];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&msg).unwrap();
        c.read_exact(&mut buf).unwrap();
        v.push(t.elapsed());
    }
    v
}

async fn client(socket: &Path) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::new(piccolo_proto::client::connect_unix(socket).await.unwrap())
}

async fn broker_latency(c: &mut BrokerClient<tonic::transport::Channel>, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get_info(GetInfoRequest {}).await.unwrap();
        v.push(t.elapsed());
    }
    v
}

/// Calls and seconds with `clients` concurrent connections, each making `per_client` calls.
async fn throughput(socket: &Path, clients: usize, per_client: usize) -> (usize, f64) {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(client(socket).await);
    }
    let t = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..per_client {
                    c.get_info(GetInfoRequest {}).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (clients * per_client, t.elapsed().as_secs_f64())
}

/// Median of a few per-round figures, and their range.
fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let (lo, mid, hi) = (v[0], v[v.len() / 2], v[v.len() - 1]);
    format!("per round: median {mid:.2}x, range {lo:.2}x-{hi:.2}x")
}

/// The broker's last durable audit seq, as `GetInfo` reports it.
async fn audit_seq(socket: &Path) -> u64 {
    client(socket).await.get_info(GetInfoRequest {}).await.unwrap().into_inner().audit_seq
}

/// Records per commit over the seqs in the `(from, to]` ranges, in one pass over the log:
/// the writer stamps one `ts` on every record of a batch, so a batch is a run of
/// consecutive records with the same `ts`.
fn commit_sizes(log: &Path, ranges: &[(u64, u64)]) -> Vec<u64> {
    let files = piccolo_audit::chain_files(log);
    let (mut sizes, mut last_ts) = (Vec::new(), String::new());
    for rec in piccolo_audit::read_records(&files).flatten() {
        if !ranges.iter().any(|&(from, to)| rec.seq > from && rec.seq <= to) {
            // A batch never continues across a gap between ranges.
            last_ts.clear();
            continue;
        }
        if rec.ts != last_ts {
            sizes.push(0);
            last_ts = rec.ts;
        }
        *sizes.last_mut().unwrap() += 1;
    }
    sizes
}

/// Mean records per commit and how many commits held 1, 2, ... records.
fn describe_commits(sizes: &[u64]) -> String {
    let mut hist = std::collections::BTreeMap::<u64, u64>::new();
    for s in sizes {
        *hist.entry(*s).or_default() += 1;
    }
    let mean = sizes.iter().sum::<u64>() as f64 / sizes.len().max(1) as f64;
    let hist: Vec<String> = hist.iter().map(|(size, n)| format!("{size}: {n}")).collect();
    format!("{mean:.2} (commits by size: {})", hist.join(", "))
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// (Rss, Anonymous) in KiB from `smaps_rollup`: what is left is file-backed (code, mostly).
fn rss_split_kib(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Anonymous:"))
}

/// CPU time (user + system, every thread) the process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest.split(' ').skip(11).take(2).map(|v| v.parse().unwrap()).collect();
    // /proc reports clock ticks of USER_HZ, which is 100 on Linux (every architecture we build for).
    Duration::from_micros((f[0] + f[1]) * 10_000)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Calls, wall time and CPU (broker's and this process's) summed over the rounds of one load.
#[derive(Default)]
struct Load {
    calls: usize,
    secs: f64,
    broker_cpu: Duration,
    own_cpu: Duration,
}

impl Load {
    /// Runs one round of `clients` × `per_client` calls, adds it up, returns its calls/s.
    fn measure(&mut self, rt: &tokio::runtime::Runtime, b: &Broker, me: i32, clients: usize, per_client: usize) -> f64 {
        let (broker0, own0) = (cpu_time(b.pid()), cpu_time(me));
        let (calls, secs) = rt.block_on(throughput(&b.socket, clients, per_client));
        self.broker_cpu += cpu_time(b.pid()) - broker0;
        self.own_cpu += cpu_time(me) - own0;
        self.calls += calls;
        self.secs += secs;
        calls as f64 / secs
    }

    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
}

fn main() {
    let n = env_usize("BENCH_CALLS", 5000);
    let rounds = env_usize("BENCH_ROUNDS", 5).clamp(1, n.max(1));
    let per_round = n / rounds;
    let rss_calls = env_usize("BENCH_RSS_CALLS", 100_000);
    // Keep the state on the same filesystem as the broker's audit log (the temp dir).
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server(dir.path(), "echo", Floor::Echo);
    let fsync_echo = echo_server(dir.path(), "fsync", Floor::Append);
    let prealloc_echo = echo_server(dir.path(), "prealloc", Floor::Preallocated);
    let b = Broker::start(BrokerOptions { policy: POLICY.into(), ..Default::default() });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let single = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let me = i32::try_from(std::process::id()).unwrap();

    let mut echo_c = UnixStream::connect(&echo).unwrap();
    let mut fsync_c = UnixStream::connect(&fsync_echo).unwrap();
    let mut prealloc_c = UnixStream::connect(&prealloc_echo).unwrap();
    let mut grpc = single.block_on(client(&b.socket));
    single.block_on(broker_latency(&mut grpc, 50));
    let (mut e, mut f, mut p, mut g) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lat_ratios, mut pre_ratios, mut scale_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut one, mut eight) = (Load::default(), Load::default());
    let mut eight_client_seqs = Vec::new();
    for _ in 0..rounds {
        e.extend(echo_latency(&mut echo_c, per_round));
        let fr = echo_latency(&mut fsync_c, per_round);
        let pr = echo_latency(&mut prealloc_c, per_round);
        let gr = single.block_on(broker_latency(&mut grpc, per_round));
        let g50 = summarize(gr.clone()).p50.as_secs_f64();
        lat_ratios.push(g50 / summarize(fr.clone()).p50.as_secs_f64());
        pre_ratios.push(g50 / summarize(pr.clone()).p50.as_secs_f64());
        f.extend(fr);
        p.extend(pr);
        g.extend(gr);

        let r1 = one.measure(&rt, &b, me, 1, per_round);
        let from = rt.block_on(audit_seq(&b.socket));
        let r8 = eight.measure(&rt, &b, me, 8, per_round);
        eight_client_seqs.push((from, rt.block_on(audit_seq(&b.socket))));
        scale_ratios.push(r8 / r1);
    }
    let per = rss_calls / 8;
    let t_rss = Instant::now();
    rt.block_on(throughput(&b.socket, 8, per));
    let rss = rss_kib(b.pid());
    let (rollup_rss, anon) = rss_split_kib(b.pid());
    let seq_after = rt.block_on(audit_seq(&b.socket));
    let (e, f, p, g) = (summarize(e), summarize(f), summarize(p), summarize(g));

    println!(
        "broker benchmark ({} sequential calls per latency row in {rounds} interleaved rounds; same machine, same run)",
        per_round * rounds
    );
    println!("{:<34} {:>12} {:>12}", "", "p50", "p99");
    println!("{:<34} {:>12} {:>12}", "raw unix echo", ms(e.p50), ms(e.p99));
    println!("{:<34} {:>12} {:>12}", "unix echo + fdatasync'd record", ms(f.p50), ms(f.p99));
    println!("{:<34} {:>12} {:>12}", "  same, into preallocated zeros", ms(p.p50), ms(p.p99));
    println!("{:<34} {:>12} {:>12}", "broker GetInfo (durable audit)", ms(g.p50), ms(g.p99));
    let ratio = g.p50.as_secs_f64() / f.p50.as_secs_f64();
    println!("GetInfo p50 / fsync-echo p50 = {ratio:.2}x (target <= 1.5x; {})", spread(lat_ratios));
    // The broker's overhead over the same I/O it does: what preallocation does not hide.
    println!(
        "GetInfo p50 / preallocated fsync-echo p50 = {:.2}x ({})",
        g.p50.as_secs_f64() / p.p50.as_secs_f64(),
        spread(pre_ratios)
    );
    let (t1, t8) = (one.rate(), eight.rate());
    println!("calls/s, 1 client:  {t1:.0}");
    println!("calls/s, 8 clients: {t8:.0}  ({:.2}x single client; target >= 4x; {})", t8 / t1, spread(scale_ratios));
    let per_call = |d: Duration, calls: usize| d.as_secs_f64() * 1e6 / calls as f64;
    println!(
        "broker CPU per call (user+sys, all threads): {:.0} us with 1 client, {:.0} us with 8",
        per_call(one.broker_cpu, one.calls),
        per_call(eight.broker_cpu, eight.calls)
    );
    println!(
        "records per group commit with 8 clients: {}",
        describe_commits(&commit_sizes(&b.audit, &eight_client_seqs))
    );
    // The clients share the machine with the broker: on 2 cores, broker + client CPU per call
    // bounds the calls/s any number of clients can reach.
    println!(
        "bench client CPU per call (this process): {:.0} us with 1 client, {:.0} us with 8",
        per_call(one.own_cpu, one.calls),
        per_call(eight.own_cpu, eight.calls)
    );
    println!(
        "broker RSS after {seq_after} audited calls: {} KiB ({:.2} MiB; target < 8 MiB) [{:.1}s]",
        rss,
        rss as f64 / 1024.0,
        t_rss.elapsed().as_secs_f64()
    );
    println!(
        "  smaps_rollup: Rss {rollup_rss} KiB = anonymous {anon} KiB + file-backed {} KiB (code of the broker and its libraries)",
        rollup_rss.saturating_sub(anon)
    );
}
