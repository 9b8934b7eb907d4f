// SPDX-License-Identifier: Apache-2.0
//! `piccolo-test-update-server`: the update server the end-to-end tests talk to.
//!
//! Owns: checking the device JWT (ES256, against the device's TPM-held token key as a JWK;
//! expired, wrong key or tampered → 401), answering `/api/v1/updates/check` with a manifest
//! signed by the release key, serving payloads with Range, and simulating failures read from
//! a scenario file on every request (bad manifest signature, truncated transfers, wrong
//! digest, 500s, slow transfers, "not yet"). Every request is appended to a JSON-lines log
//! so tests can prove what was (not) fetched. Must never: bind anything but 127.0.0.1.
//!
//! Usage: `piccolo-test-update-server --dir DIR` where DIR holds `device.jwk` (the device's
//! token key, JSON), `release.key` (hex Ed25519 seed) and `scenario.json`; the server writes
//! `release.pub` (hex public key), `port` (once listening) and `requests.jsonl` there.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use piccolo_updater::manifest::{self, Manifest};
use serde::Deserialize;
use sha2::Digest;

#[derive(Parser)]
struct Args {
    /// Directory with device.jwk, release.key and scenario.json.
    #[arg(long)]
    dir: PathBuf,
}

/// What the server does, re-read on every request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Scenario {
    /// "available", "none" or "not_yet".
    status: String,
    channel: String,
    version: String,
    /// Payload file, served at /payloads/<version>.
    payload: Option<PathBuf>,
    /// `not_yet`: seconds.
    retry_after: Option<u64>,
    /// Sign the manifest with another key.
    bad_signature: bool,
    /// Announce this digest instead of the payload's.
    wrong_sha256: Option<String>,
    /// The check answers 500.
    check_500: bool,
    /// The first N payload requests (of this scenario) answer 500.
    payload_500_count: u32,
    /// Every payload response stops at this absolute offset (the transfer never completes).
    truncate_at: Option<u64>,
    /// The first payload response stops at this offset; later ones (Range) complete.
    drop_once_at: Option<u64>,
    /// Throttle payload responses to about this many bytes per second.
    rate_bytes_per_sec: Option<u64>,
}

struct Server {
    dir: PathBuf,
    release: ed25519_dalek::SigningKey,
    /// Payload requests since the scenario last changed.
    payload_requests: AtomicU32,
    last_scenario: std::sync::Mutex<String>,
}

impl Server {
    fn scenario(&self) -> Scenario {
        let text = std::fs::read_to_string(self.dir.join("scenario.json")).unwrap_or_else(|_| "{}".into());
        let mut last = self.last_scenario.lock().unwrap_or_else(|p| p.into_inner());
        if *last != text {
            // A new scenario counts its payload requests from zero.
            self.payload_requests.store(0, Ordering::SeqCst);
            *last = text.clone();
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("scenario.json: {e}"))
    }

    fn log(&self, v: serde_json::Value) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("requests.jsonl"))
            .expect("open request log");
        let _ = writeln!(f, "{v}");
    }

    /// Ok(claims) or the reason for a 401.
    fn verify_token(&self, headers: &HeaderMap) -> Result<serde_json::Value, String> {
        let auth = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).ok_or("no Authorization")?;
        let token = auth.strip_prefix("Bearer ").ok_or("not a Bearer token")?;
        let jwk_text = std::fs::read_to_string(self.dir.join("device.jwk")).map_err(|e| format!("device.jwk: {e}"))?;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&jwk_text).map_err(|e| format!("device.jwk: {e}"))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| format!("device key: {e}"))?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.leeway = 0;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| e.to_string())?;
        let id = data.claims.get("device_id").and_then(|d| d.as_str()).unwrap_or("");
        if !id.starts_with("tpm-ek-") {
            return Err(format!("device_id {id:?} is not a TPM identity"));
        }
        Ok(data.claims)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn check(State(s): State<Arc<Server>>, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let claims = match s.verify_token(&headers) {
        Ok(c) => c,
        Err(reason) => {
            s.log(serde_json::json!({"path": "/api/v1/updates/check", "status": 401, "reason": reason}));
            return (StatusCode::UNAUTHORIZED, reason).into_response();
        }
    };
    let sc = s.scenario();
    s.log(serde_json::json!({"path": "/api/v1/updates/check", "query": uri.query(), "claims": claims,
        "status": if sc.check_500 { 500 } else { 200 }}));
    if sc.check_500 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "simulated").into_response();
    }
    let mut m = Manifest {
        status: sc.status.clone(),
        channel: if sc.channel.is_empty() { "stable".into() } else { sc.channel.clone() },
        issued_at: now(),
        version: None,
        size: None,
        sha256: None,
        url: None,
        retry_after: sc.retry_after,
    };
    if sc.status == "available" {
        let path = sc.payload.clone().expect("scenario: payload");
        let data = std::fs::read(&path).expect("payload file");
        m.version = Some(sc.version.clone());
        m.size = Some(data.len() as u64);
        m.sha256 = Some(sc.wrong_sha256.clone().unwrap_or_else(|| hex::encode(sha2::Sha256::digest(&data))));
        m.url = Some(format!("/payloads/{}", sc.version));
    }
    let key = if sc.bad_signature { ed25519_dalek::SigningKey::from_bytes(&[0x42; 32]) } else { s.release.clone() };
    let env = manifest::sign(&key, &m);
    ([(header::CONTENT_TYPE, "application/json")], serde_json::to_vec(&env).unwrap_or_default()).into_response()
}

async fn payload(State(s): State<Arc<Server>>, Path(version): Path<String>, headers: HeaderMap) -> Response {
    let sc = s.scenario();
    let n = s.payload_requests.fetch_add(1, Ordering::SeqCst);
    let range = headers.get(header::RANGE).and_then(|h| h.to_str().ok()).map(str::to_owned);
    let log = |status: u16| {
        s.log(serde_json::json!({"path": format!("/payloads/{version}"), "range": range, "status": status, "n": n}));
    };
    if version != sc.version || sc.payload.is_none() {
        log(404);
        return StatusCode::NOT_FOUND.into_response();
    }
    if n < sc.payload_500_count {
        log(500);
        return (StatusCode::INTERNAL_SERVER_ERROR, "simulated").into_response();
    }
    let data = std::fs::read(sc.payload.as_ref().expect("payload")).expect("payload file");
    let size = data.len() as u64;
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok())
        .unwrap_or(0);
    if from >= size && size > 0 {
        log(416);
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    // Where this response stops (it still announces the full length, like a dropped link).
    let mut stop = size;
    if let Some(t) = sc.truncate_at {
        stop = stop.min(t.max(from));
    }
    if let Some(d) = sc.drop_once_at
        && n == sc.payload_500_count
    {
        stop = stop.min(d.max(from));
    }
    let status = if from > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    log(status.as_u16());
    let rate = sc.rate_bytes_per_sec;
    let body = futures_util::stream::unfold((from, data), move |(pos, data)| async move {
        if pos >= stop {
            return None;
        }
        let step = rate.map_or(64 * 1024, |r| (r / 20).max(1));
        let end = (pos + step).min(stop);
        if rate.is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lo = usize::try_from(pos).unwrap_or(usize::MAX);
        let hi = usize::try_from(end).unwrap_or(usize::MAX);
        let chunk = axum::body::Bytes::copy_from_slice(&data[lo..hi]);
        Some((Ok::<_, std::io::Error>(chunk), (end, data)))
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, (size - from).into());
    h.insert(header::ACCEPT_RANGES, header::HeaderValue::from_static("bytes"));
    if from > 0
        && let Ok(v) = header::HeaderValue::from_str(&format!("bytes {from}-{}/{size}", size - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

fn main() {
    let args = Args::parse();
    let seed = std::fs::read_to_string(args.dir.join("release.key")).expect("release.key");
    let seed: [u8; 32] = hex::decode(seed.trim()).expect("hex seed").try_into().expect("32-byte seed");
    let release = ed25519_dalek::SigningKey::from_bytes(&seed);
    std::fs::write(args.dir.join("release.pub"), hex::encode(release.verifying_key().to_bytes())).expect("release.pub");
    let server = Arc::new(Server {
        dir: args.dir.clone(),
        release,
        payload_requests: AtomicU32::new(0),
        last_scenario: std::sync::Mutex::new(String::new()),
    });
    let app = Router::new()
        .route("/api/v1/updates/check", get(check))
        .route("/payloads/{version}", get(payload))
        .with_state(server);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let tmp = args.dir.join(".port.tmp");
        std::fs::write(&tmp, port.to_string()).expect("write port");
        std::fs::rename(&tmp, args.dir.join("port")).expect("rename port");
        axum::serve(l, app).await.expect("serve");
    });
}
