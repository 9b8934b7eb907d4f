// SPDX-License-Identifier: Apache-2.0
//! The UpdateEngine service through a real broker process, against the update_engine stand-in
//! on a private dbus-daemon with a system-bus-like policy: status, the StatusUpdate stream
//! (quirks included), reset, update_engine and the bus going away and coming back, the
//! broker policy for workers and operators, and the bus policy itself.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use piccolo_proto::v1::broker_client::BrokerClient;
use piccolo_proto::v1::update_engine_client::UpdateEngineClient;
use piccolo_proto::v1::update_engine_event::Kind;
use piccolo_proto::v1::{
    GetInfoRequest, GetUpdateEngineStatusRequest, ResetUpdateEngineRequest, UpdateEngineEvent, UpdateOperation,
    WatchUpdateEngineRequest,
};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::dbus::{SystemBus, UpdateEngineStandin};
use tonic::{Code, Streaming};

const IDLE: &str = "UPDATE_STATUS_IDLE";
const DOWNLOADING: &str = "UPDATE_STATUS_DOWNLOADING";
const NEED_REBOOT: &str = "UPDATE_STATUS_UPDATED_NEED_REBOOT";

/// Root may do everything; piccolo-api nothing (tests run as root).
const POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetInfo", "GetUpdateEngineStatus", "WatchUpdateEngine", "ResetUpdateEngine"]
users = ["root"]
reason = "test: root drives update_engine"
"#;

fn broker_on(policy: &str, address: &str) -> Broker {
    system_users();
    Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[update_engine]\nbus_address = {address:?}\n"),
        ..Default::default()
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn client(socket: &Path) -> UpdateEngineClient<tonic::transport::Channel> {
    UpdateEngineClient::new(piccolo_proto::client::connect_unix(socket).await.unwrap())
}

async fn status(
    c: &mut UpdateEngineClient<tonic::transport::Channel>,
) -> Result<(String, f64, String, i64), tonic::Status> {
    let s = c.get_update_engine_status(GetUpdateEngineStatusRequest {}).await?.into_inner().status.unwrap();
    Ok((s.current_operation, s.progress, s.new_version, s.new_size))
}

async fn next(w: &mut Streaming<UpdateEngineEvent>) -> UpdateEngineEvent {
    tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream still open")
}

fn kind(e: &UpdateEngineEvent) -> Kind {
    Kind::try_from(e.kind).unwrap()
}

fn op(e: &UpdateEngineEvent) -> &str {
    &e.status.as_ref().expect("event carries a status").current_operation
}

async fn update_engine_backend(socket: &Path) -> (bool, String) {
    let mut b = BrokerClient::new(piccolo_proto::client::connect_unix(socket).await.unwrap());
    let info = b.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    let be = info.backends.into_iter().find(|b| b.name == "update_engine").expect("update_engine backend");
    (be.available, be.detail)
}

#[test]
fn status_watch_and_reset_through_the_broker() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    let b = broker_on(POLICY, &bus.address());
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        assert_eq!(status(&mut c).await.unwrap(), (IDLE.into(), 0.0, "0.0.0".into(), 0));
        let r = c.get_update_engine_status(GetUpdateEngineStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(r.status.unwrap().operation, UpdateOperation::Idle as i32);
        let (up, detail) = update_engine_backend(&b.socket).await;
        assert!(up && detail.contains(IDLE) && detail.contains(&bus.address()), "{detail}");

        let mut w = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        let e = next(&mut w).await;
        assert_eq!((kind(&e), op(&e)), (Kind::Current, IDLE));

        // Every state change is broadcast; while downloading, only progress steps of >= 1 %.
        assert!(ue.set(DOWNLOADING, 0.10, "9.9.9", 4096));
        let e = next(&mut w).await;
        assert_eq!((kind(&e), op(&e)), (Kind::Signal, DOWNLOADING));
        let s = e.status.as_ref().unwrap();
        assert_eq!(
            (s.progress, s.new_version.as_str(), s.new_size, s.operation),
            (0.10, "9.9.9", 4096, UpdateOperation::Downloading as i32)
        );
        assert!(!ue.set(DOWNLOADING, 0.105, "9.9.9", 4096), "a 0.5 % step is not broadcast");
        assert_eq!(status(&mut c).await.unwrap().1, 0.105, "but GetStatus sees it");
        assert!(ue.set(DOWNLOADING, 0.20, "9.9.9", 4096));
        let e = next(&mut w).await;
        assert_eq!(e.status.as_ref().unwrap().progress, 0.20, "the quiet step never reached the watcher");

        // Reset is refused outside IDLE / UPDATED_NEED_REBOOT, and says in which state.
        let err = c.reset_update_engine(ResetUpdateEngineRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(DOWNLOADING), "{}", err.message());
        assert!(ue.calls().contains("reset_refused=1"), "{}", ue.calls());
        assert_eq!(ue.operation(), DOWNLOADING, "refused reset changed nothing");

        assert!(ue.set(NEED_REBOOT, 1.0, "9.9.9", 4096));
        let e = next(&mut w).await;
        assert_eq!(op(&e), NEED_REBOOT);
        assert!(ue.marker().exists());
        let r = c.reset_update_engine(ResetUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(r.status.unwrap().current_operation, IDLE);
        assert!(!ue.marker().exists(), "reset removes the completed marker");
        let e = next(&mut w).await;
        assert_eq!((kind(&e), op(&e)), (Kind::Signal, IDLE));
        // In IDLE it is a no-op that succeeds, with no broadcast.
        let r = c.reset_update_engine(ResetUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(r.status.unwrap().current_operation, IDLE);
        assert!(ue.calls().contains("reset=3 reset_refused=1"), "{}", ue.calls());
        assert!(tokio::time::timeout(Duration::from_millis(500), w.message()).await.is_err(), "no event for a no-op");
        drop(w);
    });

    // Audit: the stream is one read-only record; reset has intent + outcome.
    let recs = records(&b);
    let of = |rpc: &str| recs.iter().filter(|r| r["rpc"] == rpc).cloned().collect::<Vec<_>>();
    let watch = of("WatchUpdateEngine");
    assert_eq!(watch.len(), 1, "{watch:?}");
    assert_eq!((watch[0]["kind"].as_str(), watch[0]["decision"].as_str()), (Some("call"), Some("allow")));
    assert_eq!(watch[0]["outcome"]["code"], "ok");
    let reset = of("ResetUpdateEngine");
    let kinds: Vec<&str> = reset.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["intent", "outcome", "intent", "outcome", "intent", "outcome"]);
    assert_eq!(reset[1]["outcome"]["code"], "FAILED_PRECONDITION");
    assert!(of("GetUpdateEngineStatus").iter().all(|r| r["kind"] == "call"));
}

#[test]
fn missing_update_engine_is_unavailable_and_the_broker_follows_its_restart() {
    let bus = SystemBus::start();
    let mut ue = UpdateEngineStandin::start(&bus);
    let b = broker_on(POLICY, &bus.address());
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        let mut w = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut w).await), Kind::Current);
        assert!(ue.set(NEED_REBOOT, 1.0, "9.9.9", 4096));
        assert_eq!(op(&next(&mut w).await), NEED_REBOOT);

        ue.kill();
        let e = next(&mut w).await;
        assert_eq!((kind(&e), e.status.is_none()), (Kind::Vanished, true));
        let t = Instant::now();
        let err = status(&mut c).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("not running"), "{}", err.message());
        assert!(t.elapsed() < Duration::from_secs(3), "no waiting for a deadline: {:?}", t.elapsed());
        let err = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(c.reset_update_engine(ResetUpdateEngineRequest {}).await.unwrap_err().code(), Code::Unavailable);
        let (up, detail) = update_engine_backend(&b.socket).await;
        assert!(!up && detail.contains("not running"), "{detail}");

        // Back again: it starts in UPDATED_NEED_REBOOT (the marker survived) and broadcasts
        // that at start-up; the open stream sees the hand-over and the broadcast.
        ue.restart();
        let e = next(&mut w).await;
        assert_eq!(kind(&e), Kind::Appeared);
        let e = next(&mut w).await;
        assert_eq!((kind(&e), op(&e)), (Kind::Signal, NEED_REBOOT));
        assert_eq!(status(&mut c).await.unwrap().0, NEED_REBOOT);
        assert!(update_engine_backend(&b.socket).await.0);
    });
}

#[test]
fn the_broker_reconnects_after_the_bus_restarts() {
    let mut bus = SystemBus::start();
    let mut ue = UpdateEngineStandin::start(&bus);
    let b = broker_on(POLICY, &bus.address());
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        assert_eq!(status(&mut c).await.unwrap().0, IDLE);
        let mut w = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut w).await), Kind::Current);

        ue.kill();
        bus.kill();
        // The stream ends with UNAVAILABLE (after reporting what it saw); calls fail fast.
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), w.message()).await.expect("stream ends") {
                Ok(Some(e)) => assert_eq!(kind(&e), Kind::Vanished),
                other => break other,
            }
        };
        assert_eq!(end.unwrap_err().code(), Code::Unavailable);
        let t = Instant::now();
        let err = status(&mut c).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        assert!(!update_engine_backend(&b.socket).await.0);

        bus.restart();
        ue.restart();
        assert_eq!(status(&mut c).await.unwrap().0, IDLE, "reconnected");
        let mut w = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut w).await), Kind::Current);
        assert!(ue.set(DOWNLOADING, 0.5, "1.0.0", 1));
        assert_eq!(op(&next(&mut w).await), DOWNLOADING);
    });
}

#[test]
fn no_bus_is_a_quick_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}", dir.path().join("no-bus-here").display());
    let b = broker_on(POLICY, &address);
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        let t = Instant::now();
        let err = status(&mut c).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("cannot connect to D-Bus") && err.message().contains("no-bus-here"),
            "{}",
            err.message()
        );
        assert_eq!(c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap_err().code(), Code::Unavailable);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let (up, detail) = update_engine_backend(&b.socket).await;
        assert!(!up && detail.contains("cannot connect"), "{detail}");
    });
}

#[test]
fn production_policy_for_workers_and_operators() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let b = broker_on(&policy, &bus.address());

    let o = b.ctl_as("piccolo-updater", &["update-engine", "status", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["current_operation"], IDLE);
    let o = b.ctl_as("root", &["update-engine", "status"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains(IDLE), "{o:?}");
    let o = b.ctl_as("root", &["update-engine", "watch", "--json", "--count", "1"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["kind"].as_str(), v["status"]["current_operation"].as_str()), (Some("current"), Some(IDLE)));

    // Operators may look but not reset; the updater may reset; other workers get nothing.
    assert!(ue.set(NEED_REBOOT, 1.0, "2.0.0", 10));
    let o = b.ctl_as("root", &["update-engine", "reset"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(ue.operation(), NEED_REBOOT);
    for args in
        [&["update-engine", "status"][..], &["update-engine", "watch", "--count", "1"], &["update-engine", "reset"]]
    {
        let o = b.ctl_as("piccolo-api", args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {o:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"), "{o:?}");
    }
    assert_eq!(ue.operation(), NEED_REBOOT);
    let o = b.ctl_as("piccolo-updater", &["update-engine", "reset"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(ue.operation(), IDLE);

    let recs = records(&b);
    let denied = recs
        .iter()
        .filter(|r| r["decision"] == "deny" && r["caller"]["user"] == "piccolo-api")
        .map(|r| r["rpc"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(denied, ["GetUpdateEngineStatus", "WatchUpdateEngine", "ResetUpdateEngine"]);
}

#[test]
fn only_root_may_own_or_call_update_engine_on_the_bus() {
    system_users();
    let bus = SystemBus::start();
    // A worker cannot take the name (nobody owns it yet, so only the policy stops it).
    let o = UpdateEngineStandin::try_as("piccolo-api", &bus, Duration::from_secs(10)).expect("stand-in must not run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("AccessDenied"), "{o:?}");

    let ue = UpdateEngineStandin::start(&bus);
    let get = [
        "--print-reply",
        "--reply-timeout=5000",
        "--dest=com.coreos.update1",
        "/com/coreos/update1",
        "com.coreos.update1.Manager.GetStatus",
    ];
    let o = bus.dbus_send_as("root", &get);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains(IDLE), "{o:?}");
    for user in ["piccolo-api", "piccolo-updater"] {
        for method in ["GetStatus", "ResetStatus", "AttemptUpdate"] {
            let m = format!("com.coreos.update1.Manager.{method}");
            let o = bus.dbus_send_as(
                user,
                &["--print-reply", "--reply-timeout=5000", "--dest=com.coreos.update1", "/com/coreos/update1", &m],
            );
            assert!(!o.status.success(), "{user} {method}: {o:?}");
            assert!(String::from_utf8_lossy(&o.stderr).contains("AccessDenied"), "{user} {method}: {o:?}");
        }
    }
    assert!(ue.calls().starts_with("get=1 attempt=0"), "only root's call arrived: {}", ue.calls());

    // Root's AttemptUpdate: success always, but only acts in IDLE.
    let attempt = [
        "--print-reply",
        "--dest=com.coreos.update1",
        "/com/coreos/update1",
        "com.coreos.update1.Manager.AttemptUpdate",
    ];
    assert!(bus.dbus_send_as("root", &attempt).status.success());
    assert_eq!(ue.operation(), "UPDATE_STATUS_CHECKING_FOR_UPDATE");
    assert!(bus.dbus_send_as("root", &attempt).status.success());
    assert!(ue.calls().contains("attempt=2 attempt_skipped=1"), "{}", ue.calls());
}

#[test]
fn forged_status_updates_do_not_reach_watchers() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    let b = broker_on(POLICY, &bus.address());
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        let mut w = c.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut w).await), Kind::Current);

        // Every unique name on the bus (the broker's among them), as root may list them.
        let o = bus.dbus_send_as(
            "root",
            &[
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.ListNames",
            ],
        );
        let names: Vec<String> =
            String::from_utf8_lossy(&o.stdout).split('"').filter(|s| s.starts_with(':')).map(str::to_owned).collect();
        assert!(names.len() >= 2, "{names:?}");
        let forged = [
            "/com/coreos/update1",
            "com.coreos.update1.Manager.StatusUpdate",
            "int64:0",
            "double:0.5",
            "string:UPDATE_STATUS_DOWNLOADING",
            "string:6.6.6",
            "int64:666",
        ];
        let mut broadcast = vec!["--type=signal"];
        broadcast.extend(forged);
        assert!(bus.dbus_send_as("piccolo-api", &broadcast).status.success());
        for n in &names {
            let dest = format!("--dest={n}");
            let mut unicast = vec!["--type=signal", dest.as_str()];
            unicast.extend(forged);
            assert!(bus.dbus_send_as("piccolo-api", &unicast).status.success(), "signals are allowed on the bus");
        }
        // The next event is the real one.
        assert!(ue.set(NEED_REBOOT, 1.0, "1.2.3", 7));
        let e = next(&mut w).await;
        assert_eq!(
            (kind(&e), op(&e), e.status.as_ref().unwrap().new_version.as_str()),
            (Kind::Signal, NEED_REBOOT, "1.2.3")
        );
    });
}

#[test]
fn a_watcher_that_does_not_read_stalls_nobody() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    let b = broker_on(POLICY, &bus.address());
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        // A client with tiny HTTP/2 windows really stops taking data when it stops reading.
        let path = b.socket.clone();
        let tiny = tonic::transport::Endpoint::from_static("http://broker.invalid")
            .initial_stream_window_size(Some(2048))
            .initial_connection_window_size(Some(4096))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .unwrap();
        let mut slow =
            UpdateEngineClient::new(tiny).watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut slow).await), Kind::Current);
        let mut fast =
            client(&b.socket).await.watch_update_engine(WatchUpdateEngineRequest {}).await.unwrap().into_inner();
        assert_eq!(kind(&next(&mut fast).await), Kind::Current);

        // 2,000 state changes while `slow` reads nothing: far more than its queue and its
        // HTTP/2 windows hold. Both watchers share one bus subscription, whose queue holds 64
        // signals: had the broker stopped draining `slow`'s, `fast` would stall there too.
        ue.control("burst 2000");
        assert!(ue.set("UPDATE_STATUS_UPDATED_NEED_REBOOT", 1.0, "3.0.0", 3));
        let mut seen = 0;
        loop {
            let e = next(&mut fast).await;
            seen += 1;
            if e.status.as_ref().is_some_and(|s| s.current_operation == NEED_REBOOT) {
                break;
            }
        }
        assert!(seen > 64, "the reading watcher got the changes: {seen}");
        let t = Instant::now();
        assert_eq!(status(&mut c).await.unwrap().0, NEED_REBOOT);
        assert!(t.elapsed() < Duration::from_secs(1), "calls are not stalled: {:?}", t.elapsed());

        // The slow one lost the oldest events, says so, and still ends on the latest state.
        let mut dropped = 0u64;
        loop {
            let e = next(&mut slow).await;
            dropped += u64::from(e.dropped);
            if e.status.as_ref().is_some_and(|s| s.current_operation == NEED_REBOOT) {
                break;
            }
        }
        assert!(dropped > 0, "the slow watcher was told it missed events");
    });
}
