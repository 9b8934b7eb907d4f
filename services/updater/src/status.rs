// SPDX-License-Identifier: Apache-2.0
//! The status board: the state machine's current value, shared with WatchStatus streams.

use piccolo_proto::updater::v1::{Attempt as PbAttempt, Phase, StatusResponse};
use tokio::sync::watch;

use crate::record::Record;

/// Holds the current status; every change bumps `seq` and wakes watchers.
pub struct Board {
    tx: watch::Sender<StatusResponse>,
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    /// An idle board.
    pub fn new() -> Board {
        let (tx, _) = watch::channel(StatusResponse { phase: Phase::Idle as i32, ..Default::default() });
        Board { tx }
    }

    /// The current status.
    pub fn get(&self) -> StatusResponse {
        self.tx.borrow().clone()
    }

    /// A receiver for WatchStatus.
    pub fn subscribe(&self) -> watch::Receiver<StatusResponse> {
        self.tx.subscribe()
    }

    /// Changes the status with `f`; watchers are woken (and `seq` bumped) only on a change.
    pub fn set(&self, f: impl FnOnce(&mut StatusResponse)) {
        self.tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            let changed = *s != before;
            if changed {
                s.seq += 1;
            }
            changed
        });
    }

    /// Sets phase, version and message, clearing progress.
    pub fn phase(&self, phase: Phase, version: &str, message: impl Into<String>) {
        let message = message.into();
        self.set(|s| {
            s.phase = phase as i32;
            s.version = version.to_owned();
            s.message = message;
            if phase != Phase::Downloading && phase != Phase::Verifying {
                s.bytes_done = 0;
                s.bytes_total = 0;
            }
        });
    }

    /// Replaces the message, but only while the phase is still `phase` (checked and set as one
    /// step, so a concurrent transition is never overwritten).
    pub fn refresh_message(&self, phase: Phase, message: String) {
        self.set(|s| {
            if s.phase == phase as i32 {
                s.message = message;
            }
        });
    }

    /// The phase now.
    pub fn current_phase(&self) -> Phase {
        Phase::try_from(self.tx.borrow().phase).unwrap_or(Phase::Unspecified)
    }

    /// Copies the record's attempts (newest first, at most 16) into the status.
    pub fn attempts(&self, rec: &Record) {
        let mut v: Vec<PbAttempt> = rec
            .attempts
            .iter()
            .map(|(ver, a)| PbAttempt {
                version: ver.clone(),
                state: a.state.name().into(),
                attempts: a.attempts,
                reason: a.reason.clone(),
                updated_at: i64::try_from(a.updated_at).unwrap_or(i64::MAX),
                slot: a.slot.clone().unwrap_or_default(),
            })
            .collect();
        v.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.version.cmp(&a.version)));
        v.truncate(16);
        self.set(|s| s.attempts = v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_countdown_refresh_never_undoes_a_transition() {
        let b = Board::new();
        b.phase(Phase::WaitingForWindow, "1.1.0", "opens in 60 s");
        b.refresh_message(Phase::WaitingForWindow, "opens in 59 s".into());
        assert_eq!((b.get().message.as_str(), b.get().version.as_str()), ("opens in 59 s", "1.1.0"));
        // A cancel lands between the scheduler's phase read and its refresh.
        b.phase(Phase::Idle, "", "1.1.0: cancelled");
        let seq = b.get().seq;
        b.refresh_message(Phase::WaitingForWindow, "opens in 58 s".into());
        let s = b.get();
        assert_eq!((s.phase, s.version.as_str(), s.message.as_str()), (Phase::Idle as i32, "", "1.1.0: cancelled"));
        assert_eq!(s.seq, seq, "no change, no event");
    }
}
