// SPDX-License-Identifier: Apache-2.0
//! The sd_notify protocol as systemd sees it, on a real notify socket: READY=1 with a
//! STATUS only once the socket is usable, WATCHDOG=1 at half the requested interval, and
//! STOPPING=1 on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use piccolo_testkit::broker::{Broker, BrokerOptions};

#[test]
fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
    system_users();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = Broker::start(BrokerOptions {
        policy: ROOT_POLICY.into(),
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string()), ("WATCHDOG_USEC".into(), "200000".into())],
        ..Default::default()
    });
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains(&format!("STATUS=serving on {}", b.socket.display())), "{ready}");
    // READY is sent after the socket is bound with its final mode: it must answer now.
    assert!(std::os::unix::net::UnixStream::connect(&b.socket).is_ok());

    // Pings at ~100 ms (half of 200 ms): expect at least 5 within a second.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if recv() == "WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!(pings >= 5, "only {pings} watchdog pings in 1 s");

    b.signal(nix::sys::signal::Signal::SIGTERM);
    let mut stopping = false;
    for _ in 0..50 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 on SIGTERM");
    assert_eq!(b.stop_wait().code(), Some(0));
}
