// SPDX-License-Identifier: Apache-2.0
//! Benchmark: authenticated `GET /api/v1/auth/session` (bearer JWT check + session lookup +
//! lock gate + JSON) on the real `piccolo-api` binary, against a bare axum handler returning
//! JSON of the same size, in the same run, same client, same runtime shape (2 worker
//! threads, separate process). Also the API worker's RSS idle and under load. The worker
//! runs on the whole stack (a real broker with gocryptfs volumes, as `piccolo-api`), so the
//! benchmark runs as root.
//!
//!   cargo bench -p piccolo-api --bench api_bench        (BENCH_SECS, BENCH_CONNS to tune)

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};

#[path = "../tests/common/mod.rs"]
mod common;
use hyper::body::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-server") {
        baseline_server(args[i + 1].parse().expect("port"));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let conns: usize = std::env::var("BENCH_CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let api = common::Api::start(&["--boot-poll-secs", "0"]);
    let api_addr = api.addr;
    let base_port = free_port();
    let baseline = Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["--baseline-server", &base_port.to_string()])
            .spawn()
            .unwrap(),
    );
    let base_addr: SocketAddr = format!("127.0.0.1:{base_port}").parse().unwrap();
    wait_port(base_addr);

    let token = rt.block_on(async {
        api.setup().await;
        api.login(common::PASSWORD).await.token
    });
    // The new stack, not a stand-in: the control store sits on the broker's gocryptfs mount.
    let control = api.mountpoint("control");
    assert!(common::mounted(&control), "control volume not mounted at {}", control.display());
    assert!(control.join("control.db").exists(), "no control.db on the control volume");
    println!("stack: broker + gocryptfs (control store on {}), piccolo-api as piccolo-api", control.display());
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(api.pid());

    let bearer = format!("Bearer {token}");
    println!("load: {conns} keep-alive connections, {secs} s per target, sequential requests per connection");
    let (b_rps, b_p50, b_p99) = rt.block_on(load(base_addr, "/api/v1/auth/session", None, conns, secs));
    let pid = api.pid();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    let (a_rps, a_p50, a_p99) = rt.block_on(load(api_addr, "/api/v1/auth/session", Some(bearer), conns, secs));
    let loaded = sampler.join().unwrap();
    let hwm = hwm_kib(pid);

    println!();
    println!("| target | requests/s | p50 | p99 |");
    println!("|---|---|---|---|");
    println!("| bare axum JSON handler | {b_rps:.0} | {:.3} ms | {:.3} ms |", b_p50, b_p99);
    println!("| piccolo-api authenticated GET /api/v1/auth/session | {a_rps:.0} | {:.3} ms | {:.3} ms |", a_p50, a_p99);
    println!();
    println!("throughput ratio api/bare = {:.2}x; p99 ratio api/bare = {:.2}x", a_rps / b_rps, a_p99 / b_p99);
    println!(
        "piccolo-api RSS: idle {:.1} MiB, under load {:.1} MiB (peak sampled), VmHWM {:.1} MiB",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(baseline);
    drop(api);
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(a: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(a).is_err() {
        assert!(Instant::now() < end, "{a} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// `conns` connections, each sending sequential GETs for `secs`; returns (req/s, p50 ms, p99 ms).
async fn load(addr: SocketAddr, path: &'static str, auth: Option<String>, conns: usize, secs: u64) -> (f64, f64, f64) {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::new();
            while Instant::now() < end {
                let mut req = hyper::Request::builder().uri(path).header("host", "bench");
                if let Some(a) = &auth {
                    req = req.header("authorization", a.as_str());
                }
                let t = Instant::now();
                tx.ready().await.unwrap();
                let resp = tx.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    // Index of the p-th permille: integer arithmetic, no float-to-int casts.
    let pct = |permille: usize| all[(all.len() * permille / 1000).min(all.len() - 1)].as_secs_f64() * 1000.0;
    (all.len() as f64 / elapsed, pct(500), pct(990))
}

/// The baseline: a bare axum handler with the same JSON shape, same runtime shape.
fn baseline_server(port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let app = axum::Router::new().route(
            "/api/v1/auth/session",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({
                    "via": "bearer", "csrf_token": "0123456789abcdefghijklmnopqrstuv",
                    "created_at": 1_796_190_516u64, "expires_at": 1_796_233_716u64
                }))
            }),
        );
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        axum::serve(l, app).await.unwrap();
    });
}
