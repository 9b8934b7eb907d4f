// SPDX-License-Identifier: Apache-2.0
//! The client against the update_engine stand-in on a private system-like dbus-daemon.

use std::time::Duration;

use piccolo_testkit::dbus::{SystemBus, UpdateEngineStandin};
use piccolo_update_engine::{Code, Error, Event, Operation, UpdateEngine, Watch};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn next(w: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("event within 10 s").expect("watch ok")
}

#[test]
fn attempt_update_acts_only_when_idle() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    rt().block_on(async {
        let c = UpdateEngine::new(Some(bus.address()));
        let mut w = c.watch().await.unwrap();
        assert_eq!(w.initial().operation, Operation::Idle);
        assert_eq!(w.initial().new_version, "0.0.0");
        c.attempt_update().await.unwrap();
        match next(&mut w).await {
            Event::Status(s) => {
                assert_eq!(s.operation, Operation::CheckingForUpdate);
                assert!(s.last_checked_time > 0);
            }
            e => panic!("{e:?}"),
        }
        // Not IDLE: success, but nothing happens (update_engine's quirk).
        c.attempt_update().await.unwrap();
        assert_eq!(c.status().await.unwrap().operation, Operation::CheckingForUpdate);
        assert!(ue.calls().contains("attempt=2 attempt_skipped=1"), "{}", ue.calls());
        assert!(tokio::time::timeout(Duration::from_millis(300), w.next()).await.is_err(), "no signal for a skip");
        // Unknown operation strings are kept verbatim.
        ue.set("UPDATE_STATUS_ATTEMPTING_ROLLBACK", 0.0, "0.0.0", 0);
        match next(&mut w).await {
            Event::Status(s) => assert_eq!(s.operation, Operation::Other("UPDATE_STATUS_ATTEMPTING_ROLLBACK".into())),
            e => panic!("{e:?}"),
        }
    });
}

#[test]
fn reset_is_refused_outside_idle_and_need_reboot() {
    let bus = SystemBus::start();
    let ue = UpdateEngineStandin::start(&bus);
    rt().block_on(async {
        let c = UpdateEngine::new(Some(bus.address()));
        for op in [
            "UPDATE_STATUS_DOWNLOADING",
            "UPDATE_STATUS_VERIFYING",
            "UPDATE_STATUS_FINALIZING",
            "UPDATE_STATUS_REPORTING_ERROR_EVENT",
        ] {
            ue.set(op, 0.5, "1.0.0", 1);
            match c.reset_status().await {
                Err(e @ Error::ResetRefused { .. }) => {
                    assert_eq!(e.code(), Code::FailedPrecondition);
                    assert!(e.to_string().contains(op), "{e}");
                }
                other => panic!("{op}: {other:?}"),
            }
            assert_eq!(ue.operation(), op);
        }
        ue.set("UPDATE_STATUS_UPDATED_NEED_REBOOT", 1.0, "1.0.0", 1);
        assert_eq!(c.reset_status().await.unwrap().operation, Operation::Idle);
        assert_eq!(c.reset_status().await.unwrap().operation, Operation::Idle, "no-op in IDLE");
    });
}

#[test]
fn watch_follows_update_engine_restarts() {
    let bus = SystemBus::start();
    let mut ue = UpdateEngineStandin::start(&bus);
    rt().block_on(async {
        let c = UpdateEngine::new(Some(bus.address()));
        let mut w = c.watch().await.unwrap();
        for _ in 0..3 {
            ue.kill();
            assert_eq!(next(&mut w).await, Event::Vanished);
            let e = c.status().await.unwrap_err();
            assert!(matches!(e, Error::NotRunning { .. }) && e.code() == Code::Unavailable, "{e:?}");
            assert!(matches!(c.watch().await, Err(Error::NotRunning { .. })));
            ue.restart();
            assert_eq!(next(&mut w).await, Event::Appeared);
            match next(&mut w).await {
                Event::Status(s) => assert_eq!(s.operation, Operation::Idle, "start-up broadcast"),
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(c.probe().await.unwrap().operation, Operation::Idle);
    });
}

#[test]
fn no_bus_and_bus_loss_are_unavailable() {
    let mut bus = SystemBus::start();
    let mut ue = UpdateEngineStandin::start(&bus);
    rt().block_on(async {
        let missing = UpdateEngine::new(Some("unix:path=/nonexistent/piccolo-test-bus".into()));
        let e = missing.status().await.unwrap_err();
        assert!(matches!(e, Error::Connect { .. }) && e.code() == Code::Unavailable, "{e:?}");

        let c = UpdateEngine::new(Some(bus.address()));
        let mut w = c.watch().await.unwrap();
        ue.kill();
        bus.kill();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("watch ends") {
                Ok(Event::Vanished) => continue,
                other => break other,
            }
        };
        assert!(matches!(end, Err(Error::Disconnected { .. })), "{end:?}");
        assert_eq!(c.status().await.unwrap_err().code(), Code::Unavailable);
        bus.restart();
        ue.restart();
        assert_eq!(c.status().await.unwrap().operation, Operation::Idle, "reconnected");
    });
}
