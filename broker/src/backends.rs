// SPDX-License-Identifier: Apache-2.0
//! What `GetInfo` reports about each backend: present and usable, or why not.
//!
//! `GetInfo` is the broker's cheapest call and callers poll it, so it must not probe the
//! backends itself (a TCP connect or device check for the TPM on the blocking pool, a D-Bus
//! round trip to update_engine, an efivarfs `statfs`): that cost 2x its latency. Instead the
//! availability of each backend is kept here, and each entry is replaced by a newer
//! observation from any of:
//!
//! - the refresher task, which re-probes every backend whose entry is older than [`REFRESH`]
//!   (checked every [`TICK`]);
//! - the update_engine follower, which holds a watch on `com.coreos.update1` (its
//!   `NameOwnerChanged` and `StatusUpdate` signals) and records each event as it arrives;
//! - the outcome of every update_engine call a handler makes (answered: available; bus or
//!   update_engine gone: unavailable).
//!
//! Staleness bound: an entry is at most `REFRESH + TICK` old plus the probe's own deadline
//! (TPM connect 2 s, D-Bus connect 2 s + call 1 s). update_engine leaving or (re)joining the
//! bus is seen as soon as the bus tells us, and any failed update_engine call is reflected
//! at once. Until the first probe of a backend has finished, `GetInfo` waits for it
//! (bounded by the same deadlines) rather than answer without it.
//!
//! Observations are ordered by when they *started*: a probe that began before an event
//! and finished after it never overwrites that event.

use std::time::{Duration, Instant};

use piccolo_proto::v1::Backend;
use tokio::sync::watch;

use crate::guard::Shared;

/// An entry older than this is re-probed.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How often the refresher looks at the entries' ages.
pub const TICK: Duration = Duration::from_secs(1);

/// The backends `GetInfo` lists, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The TPM behind `[tpm] tcti`.
    Tpm = 0,
    /// The efivarfs root.
    Efi = 1,
    /// update_engine on D-Bus.
    UpdateEngine = 2,
    /// The configured OS disk.
    OsDisk = 3,
    /// The gocryptfs binary for volumes.
    Gocryptfs = 4,
}

const ALL: [Kind; 5] = [Kind::Tpm, Kind::Efi, Kind::UpdateEngine, Kind::OsDisk, Kind::Gocryptfs];

#[derive(Debug, Clone)]
struct Entry {
    /// When the observation began.
    seen: Instant,
    backend: Backend,
}

type Table = [Option<Entry>; 5];

/// The latest observation of every backend.
pub struct Backends {
    table: watch::Sender<Table>,
}

impl Default for Backends {
    fn default() -> Self {
        Backends { table: watch::Sender::new(Default::default()) }
    }
}

impl Backends {
    /// Records `backend` as observed at `seen`, unless a newer observation is already kept.
    pub fn observe(&self, kind: Kind, seen: Instant, backend: Backend) {
        self.table.send_if_modified(|t| {
            let slot = &mut t[kind as usize];
            if slot.as_ref().is_some_and(|e| e.seen > seen) {
                return false;
            }
            *slot = Some(Entry { seen, backend });
            true
        });
    }

    /// Every backend's latest state, waiting for the first probe of any not yet observed.
    pub async fn snapshot(&self) -> Vec<Backend> {
        let collect = |t: &Table| t.iter().flatten().map(|e| e.backend.clone()).collect::<Vec<_>>();
        {
            let t = self.table.borrow();
            if t.iter().all(Option::is_some) {
                return collect(&t);
            }
        }
        let mut rx = self.table.subscribe();
        // The sender lives as long as `self`, so this only ends with every entry present.
        match rx.wait_for(|t| t.iter().all(Option::is_some)).await {
            Ok(t) => collect(&t),
            Err(_) => collect(&self.table.borrow()),
        }
    }

    /// Kinds whose entry is missing or older than `max_age`.
    fn stale(&self, max_age: Duration) -> Vec<Kind> {
        let t = self.table.borrow();
        ALL.into_iter().filter(|k| t[*k as usize].as_ref().is_none_or(|e| e.seen.elapsed() >= max_age)).collect()
    }
}

/// Starts the refresher and the update_engine follower; they end when the broker stops.
pub fn spawn(ctx: &Shared) {
    tokio::spawn(stop_with(ctx.clone(), refresher(ctx.clone())));
    tokio::spawn(stop_with(ctx.clone(), crate::handlers::update_engine::follow(ctx.clone())));
}

async fn stop_with(ctx: Shared, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = ctx.stopping.notified() => {}
        () = task => {}
    }
}

async fn refresher(ctx: Shared) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stale = ctx.backends.stale(REFRESH);
        // Concurrently: a TPM that takes its full connect deadline delays nothing else.
        let probes = stale.into_iter().map(|k| probe(&ctx, k));
        futures_util::future::join_all(probes).await;
    }
}

/// Probes one backend now and records the result.
pub async fn probe(ctx: &Shared, kind: Kind) {
    let seen = Instant::now();
    let cfg = &ctx.config.file;
    let backend = match kind {
        Kind::Tpm => tpm(&cfg.tpm).await,
        Kind::Efi => efi(&cfg.efi.efivars_root),
        Kind::UpdateEngine => crate::handlers::update_engine::probe(ctx).await,
        Kind::OsDisk => match &cfg.boot.os_disk {
            Some(d) => present("os_disk", d, &d.display().to_string()),
            None => unavailable("os_disk", "no OS disk configured".into()),
        },
        Kind::Gocryptfs => present("gocryptfs", &cfg.volumes.gocryptfs, &cfg.volumes.state_dir.display().to_string()),
    };
    ctx.backends.observe(kind, seen, backend);
}

/// The TPM probe: bounded (piccolo_tcti::CONNECT_TIMEOUT) and off the async thread. The
/// helper that performs TPM calls must be installed too, or no call could succeed.
async fn tpm(cfg: &crate::config::TpmConfig) -> Backend {
    match &cfg.helper {
        Some(p) if p.is_file() => {}
        Some(p) => return unavailable("tpm", format!("TPM helper {} not present", p.display())),
        None => return unavailable("tpm", format!("cannot locate the TPM helper {}", crate::tpm_helper::PROGRAM)),
    }
    let tcti = cfg.tcti.clone();
    match crate::handlers::boot::blocking(move || Ok(piccolo_tcti::probe(&tcti).map(|()| tcti))).await {
        Ok(Ok(tcti)) => available("tpm", tcti),
        Ok(Err(e)) => unavailable("tpm", format!("no TPM ({e})")),
        Err(e) => unavailable("tpm", format!("probe failed: {e}")),
    }
}

/// The efivarfs root: a real efivarfs (statfs magic), a plain directory standing in for one,
/// or "no EFI" and why.
fn efi(root: &std::path::Path) -> Backend {
    use piccolo_efivars::{Efivars, RootKind};
    match Efivars::open(root) {
        Ok(ev) if ev.kind() == RootKind::Efivarfs => available("efi", format!("efivarfs at {}", root.display())),
        Ok(_) => available("efi", format!("{}: plain directory, not efivarfs", root.display())),
        Err(e) => unavailable("efi", e.to_string()),
    }
}

fn present(name: &str, path: &std::path::Path, detail: &str) -> Backend {
    if path.exists() {
        available(name, detail.to_owned())
    } else {
        unavailable(name, format!("{} not present", path.display()))
    }
}

/// A backend entry saying `name` is usable.
pub fn available(name: &str, detail: String) -> Backend {
    Backend { name: name.into(), available: true, detail }
}

/// A backend entry saying `name` is not usable, and why.
pub fn unavailable(name: &str, detail: String) -> Backend {
    Backend { name: name.into(), available: false, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_observations_win_and_snapshot_waits_for_all() {
        let b = std::sync::Arc::new(Backends::default());
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1);
        for k in ALL {
            if k != Kind::Gocryptfs {
                b.observe(k, t0, available("x", "first".into()));
            }
        }
        // One entry missing: the snapshot waits until it arrives.
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.snapshot().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        b.observe(Kind::Gocryptfs, t0, available("gocryptfs", "here".into()));
        assert_eq!(waiter.await.unwrap().len(), 5);

        b.observe(Kind::UpdateEngine, t1, unavailable("update_engine", "gone".into()));
        // A probe that started before the event finishes after it: ignored.
        b.observe(Kind::UpdateEngine, t0, available("update_engine", "stale".into()));
        let snap = b.snapshot().await;
        assert_eq!((snap[2].available, snap[2].detail.as_str()), (false, "gone"));
        assert_eq!(b.stale(Duration::ZERO).len(), 5);
        assert!(b.stale(Duration::from_secs(3600)).is_empty());
    }
}
