// SPDX-License-Identifier: Apache-2.0
//! Hostile and careless clients do not stop the broker serving others: garbage bytes,
//! half-open and idle connections (1,000 at once), oversized messages, clients that vanish
//! mid-call. SIGTERM drains and exits 0.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use piccolo_proto::v1::GetInfoRequest;
use piccolo_proto::v1::broker_client::BrokerClient;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn get_info(socket: &std::path::Path) -> Result<piccolo_proto::v1::GetInfoResponse, tonic::Status> {
    let ch =
        piccolo_proto::client::connect_unix(socket).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    BrokerClient::new(ch).get_info(GetInfoRequest {}).await.map(|r| r.into_inner())
}

#[test]
fn garbage_half_open_and_a_thousand_idle_connections_do_not_block_others() {
    let b = broker(ROOT_POLICY);
    // Garbage: the broker closes the connection.
    let mut g = UnixStream::connect(&b.socket).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\nthis is not http2 at all\x16\x03\x01").unwrap();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    for _ in 0..100 {
        match g.read(&mut buf) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(closed, "broker keeps a garbage connection open");

    // Half-open: a partial HTTP/2 preface, never finished.
    let mut half = UnixStream::connect(&b.socket).unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    // 1,000 idle connections held open at once.
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&b.socket).unwrap()).collect();

    let rt = rt();
    let info = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), get_info(&b.socket)).await });
    let info = info.expect("GetInfo answered while 1,000 idle connections are open").unwrap();
    assert_eq!(info.version, "0.1.0");
    drop(idle);
    drop(half);
    let again = rt.block_on(get_info(&b.socket)).unwrap();
    assert!(again.audit_seq > info.audit_seq);
}

#[test]
fn oversized_messages_are_refused_and_the_broker_keeps_serving() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Padded {
        #[prost(bytes = "vec", tag = "15")]
        junk: Vec<u8>,
    }
    let b = broker(ROOT_POLICY);
    let rt = rt();
    let status = rt.block_on(async {
        let ch = piccolo_proto::client::connect_unix(&b.socket).await.unwrap();
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/piccolo.broker.v1.Broker/GetInfo");
        let codec = tonic_prost::ProstCodec::<Padded, piccolo_proto::v1::GetInfoResponse>::default();
        grpc.unary(tonic::Request::new(Padded { junk: vec![7; 5 << 20] }), path, codec).await.unwrap_err()
    });
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");
    rt.block_on(get_info(&b.socket)).unwrap();
}

#[test]
fn clients_vanishing_mid_call_leave_a_consistent_audit_chain() {
    let mut b = broker(ROOT_POLICY);
    let rt = rt();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = b.socket.clone();
            let t = tokio::spawn(async move { get_info(&s).await });
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_micros(200)).await;
                t.abort();
            } else {
                tasks.push(t);
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    rt.block_on(get_info(&b.socket)).unwrap();
    assert!(b.stop().success());
    let files = piccolo_audit::chain_files(&b.audit);
    let state = piccolo_audit::read_chain_state(&b.audit).unwrap();
    let s = piccolo_audit::verify_files(&files, &state).unwrap();
    // start + at least the 100 completed calls + the final one + stop.
    assert!(s.records >= 103, "{s:?}");
}

#[test]
fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let mut b = broker(ROOT_POLICY);
    let rt = rt();
    let socket = b.socket.clone();
    let calls = rt.spawn(async move {
        let mut ok = 0;
        let ch = piccolo_proto::client::connect_unix(&socket).await.unwrap();
        let mut c = BrokerClient::new(ch);
        for _ in 0..500 {
            match c.get_info(GetInfoRequest {}).await {
                Ok(_) => ok += 1,
                Err(_) => break,
            }
        }
        ok
    });
    std::thread::sleep(Duration::from_millis(100));
    let status = b.stop();
    assert_eq!(status.code(), Some(0), "{}", b.stderr_text());
    let ok = rt.block_on(calls).unwrap();
    assert!(ok > 0);
    assert!(!b.socket.exists(), "socket removed on exit");
    let recs = records(&b);
    assert_eq!(recs.last().unwrap()["rpc"], "broker.stop");
    // Every call the client saw succeed has its durable record before the stop record.
    let calls_recorded = recs.iter().filter(|r| r["rpc"] == "GetInfo").count();
    assert!(calls_recorded >= ok, "{calls_recorded} < {ok}");
}
