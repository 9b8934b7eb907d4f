// SPDX-License-Identifier: Apache-2.0
//! TPM latencies through the broker against swtpm (informational), with the broker's
//! `GetInfo` round trip measured in the same run as the baseline:
//!
//! - `GetInfo`: policy check, identity lookup, durable audit record, no TPM;
//! - `SealSecret` / `UnsealSecret` (32 bytes, PCR 7) and `SignDeviceToken`: the same
//!   path plus one TPM connection and its commands (create the storage or token primary,
//!   create/load, policy session, unseal or sign, flushes).
//! - the same three operations on the `piccolo_tpm` library directly (no broker).
//!
//! Run: `cargo bench -p piccolo-tests --bench tpm` (as root). `BENCH_TPM_CALLS` (default
//! 200) sets the sample size.

use std::time::{Duration, Instant};

use piccolo_proto::v1::broker_client::BrokerClient;
use piccolo_proto::v1::tpm_client::TpmClient;
use piccolo_proto::v1::{GetInfoRequest, SealSecretRequest, SignDeviceTokenRequest, UnsealSecretRequest};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::swtpm::Swtpm;

const POLICY: &str = r#"version = 1
[[rule]]
rpcs = ["GetInfo", "SealSecret", "UnsealSecret", "SignDeviceToken"]
users = ["root"]
reason = "bench"
"#;

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

struct Lat {
    p50: Duration,
    p99: Duration,
}

fn summarize(mut v: Vec<Duration>) -> Lat {
    v.sort_unstable();
    Lat { p50: percentile(&v, 50), p99: percentile(&v, 99) }
}

async fn measure<F, Fut>(n: usize, mut f: F) -> Lat
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n.min(10) {
        f().await;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    summarize(v)
}

fn measure_sync(n: usize, mut f: impl FnMut()) -> Lat {
    for _ in 0..n.min(10) {
        f();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    summarize(v)
}

fn main() {
    let n: usize = std::env::var("BENCH_TPM_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let sw = Swtpm::start();
    let b = Broker::start(BrokerOptions {
        policy: POLICY.into(),
        extra_config: format!("[tpm]\ntcti = {:?}\n", sw.tcti()),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rows = rt.block_on(async {
        let ch = piccolo_proto::client::connect_unix(&b.socket).await.unwrap();
        let info = BrokerClient::new(ch.clone());
        let mut tpm = TpmClient::new(ch);
        let secret = vec![0x42u8; 32];
        let blob = tpm
            .seal_secret(SealSecretRequest { secret: secret.clone(), pcrs: vec![] })
            .await
            .unwrap()
            .into_inner()
            .sealed_blob;
        let base = measure(n, || {
            let mut c = info.clone();
            async move {
                c.get_info(GetInfoRequest {}).await.unwrap();
            }
        })
        .await;
        let seal = measure(n, || {
            let (mut c, s) = (tpm.clone(), secret.clone());
            async move {
                c.seal_secret(SealSecretRequest { secret: s, pcrs: vec![] }).await.unwrap();
            }
        })
        .await;
        let unseal = measure(n, || {
            let (mut c, b) = (tpm.clone(), blob.clone());
            async move {
                c.unseal_secret(UnsealSecretRequest { sealed_blob: b }).await.unwrap();
            }
        })
        .await;
        let sign = measure(n, || {
            let mut c = tpm.clone();
            async move {
                let r =
                    SignDeviceTokenRequest { subscription_tier: "premium".into(), features: vec![], ttl_seconds: 300 };
                c.sign_device_token(r).await.unwrap();
            }
        })
        .await;
        vec![
            ("broker GetInfo (baseline)", base),
            ("broker SealSecret", seal),
            ("broker UnsealSecret", unseal),
            ("broker SignDeviceToken", sign),
        ]
    });
    let lib = piccolo_tpm::Tpm::new(sw.tcti());
    let blob = lib.seal(&[0x42; 32], &[]).unwrap();
    let req = piccolo_tpm::TokenRequest { subscription_tier: "premium".into(), features: vec![], ttl_seconds: 300 };
    let lib_rows = [
        ("piccolo-tpm seal", measure_sync(n, || drop(lib.seal(&[0x42; 32], &[]).unwrap()))),
        ("piccolo-tpm unseal", measure_sync(n, || drop(lib.unseal(&blob).unwrap()))),
        ("piccolo-tpm sign", measure_sync(n, || drop(lib.sign_token(&req, 1_700_000_000).unwrap()))),
    ];
    let base = rows[0].1.p50.as_secs_f64();
    println!("{n} sequential calls each, swtpm on TCP localhost, one broker connection\n");
    println!("| | p50 | p99 | p50 / GetInfo p50 |");
    println!("|---|---|---|---|");
    for (name, l) in rows.iter().chain(lib_rows.iter()) {
        println!("| {name} | {} | {} | {:.1}x |", ms(l.p50), ms(l.p99), l.p50.as_secs_f64() / base);
    }
}
