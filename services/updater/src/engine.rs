// SPDX-License-Identifier: Apache-2.0
//! The update state machine: check → download (streamed into the broker) → verify →
//! activate (staged) → wait for the window → reboot; recovery at start; the scheduler.
//!
//! One job at a time holds [`Engine::job`]. Every step that changes the disk is preceded by a
//! durable record write, so after a crash [`Engine::recover`] compares the record with the
//! broker's boot state and either resumes, restarts or marks the version failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use piccolo_proto::updater::v1::{Phase, StatusResponse, Window as PbWindow};
use piccolo_proto::v1::write_inactive_slot_request::Msg;
use piccolo_proto::v1::{BootState, WriteHeader, WriteInactiveSlotRequest};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OwnedMutexGuard, mpsc, oneshot};

use crate::boot::{BrokerBoot, inactive, slot_by_label, slot_label};
use crate::config::Config;
use crate::error::Error;
use crate::http::{Http, error_chain};
use crate::manifest::{self, Answer, Offer, compare_versions};
use crate::record::{AttemptState, RecordStore};
use crate::status::Board;
use crate::token::TokenSource;
use crate::window::{Window, now};

/// Largest chunk sent to the broker (its limit).
const CHUNK: usize = 1 << 20;

/// Shared engine.
pub struct Engine {
    cfg: Config,
    boot: BrokerBoot,
    tokens: Arc<dyn TokenSource>,
    http: Http,
    record: Mutex<RecordStore>,
    /// Status board.
    pub board: Board,
    job: Arc<tokio::sync::Mutex<()>>,
    cancel: AtomicBool,
    cancel_notify: Notify,
    reboot_now: AtomicBool,
    next_check: AtomicU64,
    wake: Notify,
    recovered: AtomicBool,
}

/// What a job was asked to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobOptions {
    /// Retry a version that failed or was cancelled.
    pub force: bool,
    /// Reboot as soon as it is staged, whatever the window.
    pub apply_now: bool,
}

/// Test-only crash points (debug builds only): with `PICCOLO_UPDATER_CRASH_AT=<name>` the
/// worker prints `PICCOLO-UPDATER-CRASH-POINT <name>` and stops there until it is killed.
fn crash_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var("PICCOLO_UPDATER_CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("PICCOLO-UPDATER-CRASH-POINT {name}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

impl Engine {
    /// An engine over these parts.
    pub fn new(cfg: Config, record: RecordStore, tokens: Arc<dyn TokenSource>) -> Arc<Engine> {
        let boot = BrokerBoot::new(cfg.broker_socket.clone());
        let http = Http::new(cfg.http_timeout);
        let first = now() + cfg.initial_check_delay.as_secs();
        let e = Arc::new(Engine {
            boot,
            tokens,
            http,
            record: Mutex::new(record),
            board: Board::new(),
            job: Arc::new(tokio::sync::Mutex::new(())),
            cancel: AtomicBool::new(false),
            cancel_notify: Notify::new(),
            reboot_now: AtomicBool::new(false),
            next_check: AtomicU64::new(first),
            wake: Notify::new(),
            recovered: AtomicBool::new(false),
            cfg,
        });
        e.refresh_meta();
        e
    }

    fn rec<T>(&self, f: impl FnOnce(&mut RecordStore) -> T) -> T {
        let mut g = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut g);
        self.board.attempts(&g.rec);
        r
    }

    /// Updates `version`'s record entry durably.
    fn note(&self, version: &str, f: impl FnOnce(&mut crate::record::Attempt)) -> Result<(), Error> {
        self.rec(|s| s.update(version, f))
    }

    /// The window in force (SetWindow's, else the config file's).
    pub fn window(&self) -> Window {
        self.rec(|s| s.rec.window).unwrap_or(self.cfg.window)
    }

    fn refresh_meta(&self) {
        let (start, end) = self.window().render();
        let current = self.cfg.current_version();
        let next = self.next_check.load(Ordering::Relaxed);
        self.board.set(|s| {
            s.window = Some(PbWindow { start, end });
            s.current_version = current;
            s.next_check = i64::try_from(next).unwrap_or(i64::MAX);
        });
        self.rec(|_| ());
    }

    /// The status now.
    pub fn status(&self) -> StatusResponse {
        self.refresh_meta();
        self.board.get()
    }

    fn fail(&self, version: &str, e: &Error) {
        tracing::warn!(version, error = %e, "update step failed");
        self.board.phase(Phase::Failed, version, e.to_string());
    }

    // ---- recovery -------------------------------------------------------------------

    /// Compares the durable record with the broker's boot state (once the broker answers)
    /// and settles every version that was in flight when the worker last stopped.
    pub async fn recover(self: &Arc<Self>) {
        self.recover_inner().await;
        self.recovered.store(true, Ordering::SeqCst);
    }

    async fn recover_inner(self: &Arc<Self>) {
        let st = loop {
            match self.boot.state().await {
                Ok(st) => break st,
                Err(e) => {
                    self.board.phase(Phase::Failed, "", format!("waiting for the broker: {e}"));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        self.board.phase(Phase::Idle, "", "");
        let Some((version, a)) = self.rec(|s| s.in_flight()) else { return };
        let booted = slot_label(st.booted).to_owned();
        let next = slot_label(st.next_boot).to_owned();
        let slot = a.slot.clone().unwrap_or_default();
        tracing::info!(version, state = a.state.name(), booted, next, "recovering");
        let fell_back = |how: &str| {
            format!(
                "the box fell back to {booted} after {how} version {version} in {slot}: the new boot did not \
                 complete or was never marked good by the health check; not retried automatically"
            )
        };
        let result = match a.state {
            AttemptState::Downloading => self.abandon(&version, "the updater stopped during the download").await,
            AttemptState::Written | AttemptState::Activating => {
                if !slot.is_empty() && next == slot && slot != booted {
                    // The activation landed before the worker stopped.
                    self.note(&version, |a| a.state = AttemptState::Staged).map(|()| self.after_staged(&version))
                } else if inactive(&st).is_some_and(|s| s.verified && s.label == slot) {
                    self.resume_activation(version.clone()).await
                } else {
                    self.abandon(&version, "the updater stopped before activation").await
                }
            }
            AttemptState::Staged if booted == slot => self.booted_new(&version, &st),
            AttemptState::Staged if next == slot => {
                self.after_staged(&version);
                Ok(())
            }
            AttemptState::Staged => self.mark_failed(&version, fell_back("activating")),
            AttemptState::Booted if booted == slot => self.booted_new(&version, &st),
            AttemptState::Booted => self.mark_failed(&version, fell_back("booting")),
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.fail(&version, &e);
        }
    }

    async fn resume_activation(self: &Arc<Self>, version: String) -> Result<(), Error> {
        let Ok(guard) = self.job.clone().try_lock_owned() else { return Ok(()) };
        let this = self.clone();
        tokio::spawn(async move {
            let _g = guard;
            if let Err(e) = this.activate(&version).await {
                this.fail(&version, &e);
            } else {
                this.staged_and_maybe_reboot(&version).await;
            }
        });
        Ok(())
    }

    /// An interrupted download: the slot is made unbootable again; the next check restarts it.
    async fn abandon(&self, version: &str, why: &str) -> Result<(), Error> {
        self.boot.cancel().await?;
        self.note(version, |a| {
            a.state = AttemptState::Failed;
            a.reason = format!("{why}; the inactive slot was left unbootable");
        })?;
        self.next_check.store(now(), Ordering::Relaxed);
        self.board.phase(Phase::Idle, "", format!("{version}: {why}; will retry"));
        Ok(())
    }

    fn mark_failed(&self, version: &str, reason: String) -> Result<(), Error> {
        tracing::warn!(version, reason, "version marked failed");
        self.note(version, |a| {
            a.state = AttemptState::Failed;
            a.permanent = true;
            a.reason = reason.clone();
        })?;
        self.board.phase(Phase::Failed, version, reason);
        Ok(())
    }

    /// Running the new version: booted, and succeeded once the slot is marked good.
    fn booted_new(&self, version: &str, st: &BootState) -> Result<(), Error> {
        let booted = slot_label(st.booted);
        let good = slot_by_label(st, booted).is_some_and(|s| s.successful);
        let state = if good { AttemptState::Succeeded } else { AttemptState::Booted };
        self.note(version, |a| a.state = state)?;
        let msg = if good {
            format!("running {version} from {booted}, marked good")
        } else {
            format!("running {version} from {booted}; waiting for the health check to mark the boot good")
        };
        self.board.phase(Phase::Idle, version, msg);
        Ok(())
    }

    /// Notices a boot the health unit marked good since the last look.
    async fn poll_boot(&self) {
        let Some((version, a)) = self.rec(|s| s.in_flight()) else { return };
        if a.state != AttemptState::Booted {
            return;
        }
        if let Ok(st) = self.boot.state().await
            && slot_label(st.booted) == a.slot.as_deref().unwrap_or("")
            && let Err(e) = self.booted_new(&version, &st)
        {
            self.fail(&version, &e);
        }
    }

    // ---- the job --------------------------------------------------------------------

    /// Whether start-up recovery has finished (jobs are refused before).
    pub fn recovered(&self) -> bool {
        self.recovered.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` for start-up recovery (operator commands right after a start).
    pub async fn wait_recovered(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.recovered() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a job if none runs. `checked` gets the status once the check has an answer.
    pub fn start_job(
        self: &Arc<Self>,
        opts: JobOptions,
        checked: Option<oneshot::Sender<Result<StatusResponse, Error>>>,
    ) -> Result<(), Error> {
        if !self.recovered.load(Ordering::SeqCst) {
            return Err(Error::Busy("recovering: waiting for the broker's boot state".into()));
        }
        let guard = self.job.clone().try_lock_owned().map_err(|_| self.busy())?;
        let this = self.clone();
        tokio::spawn(async move { this.job(guard, opts, checked).await });
        Ok(())
    }

    fn busy(&self) -> Error {
        let s = self.board.get();
        let phase = Phase::try_from(s.phase).unwrap_or(Phase::Unspecified).as_str_name();
        Error::Busy(format!("another update job is running ({phase} {})", s.version))
    }

    async fn job(
        self: Arc<Self>,
        _guard: OwnedMutexGuard<()>,
        opts: JobOptions,
        checked: Option<oneshot::Sender<Result<StatusResponse, Error>>>,
    ) {
        self.cancel.store(false, Ordering::SeqCst);
        self.reboot_now.store(opts.apply_now, Ordering::SeqCst);
        let mut checked = checked;
        let mut report = |r: Result<StatusResponse, Error>| {
            if let Some(tx) = checked.take() {
                let _ = tx.send(r);
            }
        };
        self.board.phase(Phase::Checking, "", "");
        self.next_check.store(now() + self.cfg.check_interval.as_secs(), Ordering::Relaxed);
        let answer = self.check().await;
        self.board.set(|s| s.last_check = i64::try_from(now()).unwrap_or(i64::MAX));
        let offer = match answer {
            Err(e) => {
                self.fail("", &e);
                return report(Err(e));
            }
            Ok(Answer::UpToDate) => {
                self.board.phase(Phase::Idle, "", "up to date");
                return report(Ok(self.status()));
            }
            Ok(Answer::NotYet(secs)) => {
                self.next_check.store(now() + secs, Ordering::Relaxed);
                self.board.phase(Phase::Idle, "", format!("not yet: staged rollout, asking again in {secs} s"));
                return report(Ok(self.status()));
            }
            Ok(Answer::Available(o)) => o,
        };
        if let Some(why) = self.skip_reason(&offer, opts.force) {
            self.board.phase(Phase::Idle, "", why);
            return report(Ok(self.status()));
        }
        if self.rec(|s| s.rec.attempts.get(&offer.version).map(|a| a.state)) == Some(AttemptState::Staged) {
            report(Ok(self.status()));
            return self.staged_and_maybe_reboot(&offer.version).await;
        }
        self.board.phase(Phase::Downloading, &offer.version, "");
        self.board.set(|s| s.bytes_total = offer.size);
        report(Ok(self.status()));
        match self.install(&offer).await {
            Ok(()) => self.staged_and_maybe_reboot(&offer.version).await,
            Err(Error::Cancelled) => {
                let _ = self.boot.cancel().await;
                let _ = self.note(&offer.version, |a| {
                    a.state = AttemptState::Cancelled;
                    a.reason = "download cancelled by the operator".into();
                });
                self.board.phase(Phase::Idle, "", format!("{}: cancelled", offer.version));
            }
            Err(e) => {
                let _ = self.note(&offer.version, |a| {
                    a.state = AttemptState::Failed;
                    a.reason = e.to_string();
                });
                self.fail(&offer.version, &e);
            }
        }
    }

    /// Why an offered version is not fetched now (None: fetch it).
    fn skip_reason(&self, offer: &Offer, force: bool) -> Option<String> {
        let current = self.cfg.current_version();
        if !current.is_empty() && compare_versions(&offer.version, &current).is_le() {
            return Some(format!("up to date (running {current}, server offers {})", offer.version));
        }
        let a = self.rec(|s| s.rec.attempts.get(&offer.version).cloned())?;
        let v = &offer.version;
        match a.state {
            AttemptState::Failed if a.permanent && !force => {
                Some(format!("{v} is marked failed ({}); not retried automatically", a.reason))
            }
            AttemptState::Failed if a.attempts >= self.cfg.max_download_attempts && !force => {
                Some(format!("{v} failed {} times (last: {}); not retried automatically", a.attempts, a.reason))
            }
            AttemptState::Cancelled if !force => Some(format!("{v} was cancelled; not retried automatically")),
            AttemptState::Booted | AttemptState::Succeeded => Some(format!("{v} is already installed")),
            _ => None,
        }
    }

    /// Asks the update server; verifies the manifest before looking at it.
    async fn check(&self) -> Result<Answer, Error> {
        let token = self.tokens.token().await?;
        let url = format!("{}/api/v1/updates/check", self.cfg.server);
        let body = self.http.get_small(&url, Some(&token), manifest::MAX_ENVELOPE_BYTES).await?;
        let m = manifest::verify(&body, &self.cfg.manifest_key).map_err(Error::Manifest)?;
        m.check(&self.cfg.channel, &self.cfg.server, now()).map_err(Error::Manifest)
    }

    /// Prepare, stream, verify, activate.
    async fn install(&self, offer: &Offer) -> Result<(), Error> {
        let v = &offer.version;
        // Preparing the inactive slot wipes the fallback: never while this boot is unconfirmed.
        let now_st = self.boot.state().await?;
        if !slot_by_label(&now_st, slot_label(now_st.booted)).is_some_and(|s| s.successful) {
            return Err(Error::Precondition(format!(
                "the running boot ({}) is not marked good yet; the other slot is its fallback and stays untouched",
                slot_label(now_st.booted)
            )));
        }
        // A newer offer replaces whatever was staged or in flight for another version.
        if let Some((old, _)) = self.rec(|s| s.in_flight()).filter(|(old, _)| old != v) {
            self.note(&old, |a| {
                a.state = AttemptState::Failed;
                a.reason = format!("superseded by {v}");
            })?;
        }
        self.note(v, |a| {
            a.state = AttemptState::Downloading;
            a.attempts += 1;
            a.reason.clear();
            a.permanent = false;
            a.sha256 = offer.sha256.clone();
        })?;
        let st = self.boot.prepare().await?;
        let target =
            inactive(&st).ok_or_else(|| Error::Precondition("the broker reports no inactive slot".into()))?.clone();
        if target.size_bytes < offer.size {
            return Err(Error::Precondition(format!(
                "update {v} is {} bytes, slot {} holds {}",
                offer.size, target.label, target.size_bytes
            )));
        }
        let from = slot_label(st.booted).to_owned();
        self.note(v, |a| {
            a.slot = Some(target.label.clone());
            a.from_slot = Some(from);
        })?;
        crash_point("downloading");
        let (tx, rx) = mpsc::channel::<WriteInactiveSlotRequest>(4);
        let header = Msg::Header(WriteHeader { size: offer.size, sha256: offer.sha256.clone() });
        tx.send(WriteInactiveSlotRequest { msg: Some(header) })
            .await
            .map_err(|_| Error::Precondition("write stream closed".into()))?;
        let boot = self.boot.clone();
        let writer = tokio::spawn(async move { boot.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        let fetched = self.fetch(offer, tx).await;
        if fetched.is_ok() {
            self.board.phase(Phase::Verifying, v, "the broker checks the digest and reads the slot back");
        }
        let written = writer.await.map_err(|e| Error::Precondition(format!("write task: {e}")))?;
        // The broker ending the stream early says why in its own answer.
        if let (Err(Error::Download { reason, .. }), Err(b)) = (&fetched, &written)
            && reason.contains("closed the write stream")
        {
            return Err(Error::Precondition(b.to_string()));
        }
        let digest = fetched?;
        if digest != offer.sha256 {
            return Err(Error::Digest { expected: offer.sha256.clone(), actual: digest });
        }
        let r = written?;
        if r.sha256.to_ascii_lowercase() != offer.sha256 || r.bytes != offer.size {
            return Err(Error::Digest { expected: offer.sha256.clone(), actual: r.sha256 });
        }
        self.note(v, |a| a.state = AttemptState::Written)?;
        crash_point("written");
        self.activate(v).await
    }

    async fn activate(&self, v: &str) -> Result<(), Error> {
        self.note(v, |a| a.state = AttemptState::Activating)?;
        crash_point("before-activate");
        self.boot.activate().await?;
        crash_point("after-activate");
        self.note(v, |a| a.state = AttemptState::Staged)
    }

    /// Streams the payload into `tx`, resuming with Range after drops; returns the digest.
    async fn fetch(&self, offer: &Offer, tx: mpsc::Sender<WriteInactiveSlotRequest>) -> Result<String, Error> {
        let mut done = 0u64;
        let mut hasher = Sha256::new();
        let mut failures = 0u32;
        let mut last_shown = Instant::now();
        let err = |done: u64, reason: String| Error::Download {
            version: offer.version.clone(),
            bytes: done,
            total: offer.size,
            reason,
        };
        while done < offer.size {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            let attempt: Result<(), String> = async {
                let resp = self.http.get(&offer.url, None, done).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let mut skip = 0u64;
                match status {
                    206 if done > 0 => {
                        let cr = resp.headers().get("content-range").and_then(|h| h.to_str().ok()).unwrap_or("");
                        if !cr.starts_with(&format!("bytes {done}-")) {
                            return Err(format!("server resumed at the wrong offset ({cr:?})"));
                        }
                    }
                    200 => skip = done,
                    s => return Err(format!("server answered {s}")),
                }
                let mut body = resp.into_body();
                loop {
                    let frame = tokio::select! {
                        f = tokio::time::timeout(self.http.timeout(), body.frame()) => f,
                        () = self.cancel_notify.notified() => return Err("cancelled".into()),
                    };
                    let frame = match frame {
                        Err(_) => return Err(format!("no data for {} s", self.http.timeout().as_secs())),
                        Ok(None) => return Ok(()),
                        Ok(Some(Err(e))) => return Err(error_chain(&e)),
                        Ok(Some(Ok(f))) => f,
                    };
                    let Ok(mut data) = frame.into_data() else { continue };
                    if skip > 0 {
                        let n = usize::try_from(skip.min(data.len() as u64)).unwrap_or(0);
                        skip -= n as u64;
                        let _ = data.split_to(n);
                    }
                    if data.is_empty() {
                        continue;
                    }
                    if done + data.len() as u64 > offer.size {
                        return Err(format!("server sent more than the manifest's {} bytes", offer.size));
                    }
                    hasher.update(&data);
                    for c in data.chunks(CHUNK) {
                        tx.send(WriteInactiveSlotRequest { msg: Some(Msg::Chunk(c.to_vec())) })
                            .await
                            .map_err(|_| "the broker closed the write stream".to_string())?;
                    }
                    done += data.len() as u64;
                    if last_shown.elapsed() >= Duration::from_millis(200) || done == offer.size {
                        last_shown = Instant::now();
                        self.board.set(|s| s.bytes_done = done);
                    }
                }
            }
            .await;
            if self.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            match attempt {
                Ok(()) if done >= offer.size => break,
                Ok(()) => {
                    failures += 1;
                    if failures > self.cfg.download_retries {
                        return Err(err(done, "the server closed the transfer early".into()));
                    }
                }
                Err(reason) => {
                    failures += 1;
                    if failures > self.cfg.download_retries || tx.is_closed() {
                        return Err(err(done, reason));
                    }
                    tracing::info!(version = offer.version, done, reason, "download interrupted; resuming");
                }
            }
            self.board.set(|s| s.message = format!("resuming at byte {done} (retry {failures})"));
            tokio::time::sleep(Duration::from_millis(250u64 << failures.min(4))).await;
        }
        self.board.set(|s| s.bytes_done = done);
        Ok(hex::encode(hasher.finalize()))
    }

    /// Staged: shows whether it reboots now (operator, or inside the window) or waits.
    fn after_staged(&self, version: &str) {
        if self.reboot_now.load(Ordering::SeqCst) || self.window().contains(now()) {
            self.board.phase(Phase::Staged, version, "activated; rebooting into it");
        } else {
            self.board.phase(Phase::WaitingForWindow, version, self.window_message());
        }
        self.wake.notify_one();
    }

    fn window_message(&self) -> String {
        let w = self.window();
        let (a, b) = w.render();
        let secs = w.seconds_until_open(now());
        format!("activated; reboot in the maintenance window {a}-{b} UTC (opens in {secs} s)")
    }

    /// [`Engine::after_staged`], then the reboot if it is due now (called with the job held).
    async fn staged_and_maybe_reboot(&self, version: &str) {
        self.after_staged(version);
        if self.board.current_phase() == Phase::Staged {
            self.reboot(version).await;
        }
    }

    async fn reboot(&self, version: &str) {
        self.board.phase(Phase::Rebooting, version, "");
        self.reboot_now.store(false, Ordering::SeqCst);
        if let Err(e) = self.boot.reboot(self.cfg.reboot_delay_seconds).await {
            self.fail(version, &e);
            return;
        }
        let msg = format!("reboot requested (in {} s)", self.cfg.reboot_delay_seconds);
        self.board.phase(Phase::Rebooting, version, msg);
    }

    // ---- operator commands ----------------------------------------------------------

    /// ApplyNow: reboot into a staged update at once, or run a job that does.
    pub fn apply_now(self: &Arc<Self>, force: bool) -> Result<(), Error> {
        match self.board.current_phase() {
            Phase::Staged | Phase::WaitingForWindow => {
                self.reboot_now.store(true, Ordering::SeqCst);
                self.wake.notify_one();
                Ok(())
            }
            Phase::Downloading | Phase::Verifying | Phase::Checking => {
                self.reboot_now.store(true, Ordering::SeqCst);
                Ok(())
            }
            _ => self.start_job(JobOptions { force, apply_now: true }, None),
        }
    }

    /// Cancel: stop the download, or un-stage an activated update.
    pub async fn cancel(self: &Arc<Self>) -> Result<(), Error> {
        match self.board.current_phase() {
            Phase::Downloading | Phase::Verifying | Phase::Checking => {
                self.cancel.store(true, Ordering::SeqCst);
                self.cancel_notify.notify_waiters();
                // Wait for the job to wind down (the broker may still be fsyncing).
                let _g = tokio::time::timeout(Duration::from_secs(60), self.job.clone().lock_owned())
                    .await
                    .map_err(|_| self.busy())?;
                Ok(())
            }
            Phase::Staged | Phase::WaitingForWindow | Phase::Rebooting => {
                let _g = self.job.clone().try_lock_owned().map_err(|_| self.busy())?;
                let version = self.board.get().version;
                self.boot.cancel().await?;
                self.reboot_now.store(false, Ordering::SeqCst);
                self.note(&version, |a| {
                    a.state = AttemptState::Cancelled;
                    a.reason = "cancelled by the operator after activation".into();
                })?;
                self.board.phase(Phase::Idle, "", format!("{version}: cancelled; the next boot stays on this slot"));
                Ok(())
            }
            p => Err(Error::Precondition(format!("nothing to cancel ({})", p.as_str_name()))),
        }
    }

    /// Rollback: the other slot boots next (the broker refuses unless it would boot), then reboot.
    pub async fn rollback(self: &Arc<Self>) -> Result<(), Error> {
        let _g = self.job.clone().try_lock_owned().map_err(|_| self.busy())?;
        let st = self.boot.rollback().await?;
        let running = self.rec(|s| s.in_flight()).filter(|(_, a)| a.slot.as_deref() == Some(slot_label(st.booted)));
        if let Some((v, _)) = running {
            self.note(&v, |a| {
                a.state = AttemptState::Failed;
                a.permanent = true;
                a.reason = "rolled back by the operator".into();
            })?;
        }
        let to = slot_label(st.next_boot);
        self.board.phase(Phase::Rebooting, "", format!("rolling back to {to}"));
        self.boot.reboot(self.cfg.reboot_delay_seconds).await?;
        Ok(())
    }

    /// SetWindow.
    pub fn set_window(&self, w: Window) -> Result<(), Error> {
        self.rec(|s| {
            s.rec.window = Some(w);
            s.save()
        })?;
        self.refresh_meta();
        self.wake.notify_one();
        Ok(())
    }

    // ---- scheduler ------------------------------------------------------------------

    /// Periodic checks, reboots inside the window, and boot polling. Runs forever.
    pub async fn scheduler(self: Arc<Self>) {
        let mut last_poll = Instant::now();
        loop {
            let phase = self.board.current_phase();
            let t = now();
            if matches!(phase, Phase::Staged | Phase::WaitingForWindow)
                && (self.reboot_now.load(Ordering::SeqCst) || self.window().contains(t))
                && let Ok(g) = self.job.clone().try_lock_owned()
            {
                // Re-read under the job lock: a cancel may have un-staged it since `phase`.
                let s = self.board.get();
                if matches!(Phase::try_from(s.phase), Ok(Phase::Staged | Phase::WaitingForWindow)) {
                    self.reboot(&s.version).await;
                }
                drop(g);
            } else if phase == Phase::WaitingForWindow {
                // Only the countdown changes, and only if nothing (a cancel) moved the phase on;
                // rewriting the whole phase here could resurrect an un-staged update.
                self.board.refresh_message(Phase::WaitingForWindow, self.window_message());
            }
            if matches!(self.board.current_phase(), Phase::Idle | Phase::Failed)
                && t >= self.next_check.load(Ordering::Relaxed)
                && self.start_job(JobOptions::default(), None).is_err()
            {
                tracing::debug!("scheduled check skipped: busy");
            }
            if last_poll.elapsed() >= self.cfg.boot_poll {
                last_poll = Instant::now();
                self.poll_boot().await;
            }
            self.refresh_meta();
            let until_check = self.next_check.load(Ordering::Relaxed).saturating_sub(now());
            let until_window = if self.board.current_phase() == Phase::WaitingForWindow {
                self.window().seconds_until_open(now()).max(1)
            } else {
                u64::MAX
            };
            let sleep = Duration::from_secs(until_check.min(until_window).clamp(1, 60)).min(self.cfg.boot_poll);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
            }
        }
    }
}
