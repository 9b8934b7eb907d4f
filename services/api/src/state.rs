// SPDX-License-Identifier: Apache-2.0
//! The state every handler shares.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::auth::Sessions;
use crate::backend::{LockState, Persistence};
use crate::events::Event;
use crate::ratelimit::{LimitConfig, Limiter};
use crate::setup::SetupCode;

/// Settings the handlers read.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Mark the session cookie `Secure` (served over TLS).
    pub secure_cookies: bool,
    /// Session lifetime.
    pub session_ttl: Duration,
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    /// The broker's socket (boot state).
    pub broker_socket: PathBuf,
    /// The update worker's control socket (updates, `update` events).
    pub updater_socket: PathBuf,
}

/// Shared by every handler.
pub struct AppState {
    /// Key set, volumes, control store, lock state (`crates/persistence`).
    pub persistence: Persistence,
    /// Session table and token key.
    pub sessions: Sessions,
    /// Attempt limits on credential checks.
    pub limiter: Limiter,
    /// The first-run setup code, while setup is pending.
    pub setup: SetupCode,
    /// Server-sent events fan-out.
    pub events: broadcast::Sender<Event>,
    /// Settings.
    pub cfg: AppConfig,
    /// Why the last TPM auto-unlock failed (crypto status shows it).
    pub tpm_error: Mutex<Option<String>>,
}

/// What handlers receive.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// Builds the state.
    pub fn new(persistence: Persistence, setup: SetupCode, limits: LimitConfig, cfg: AppConfig) -> SharedState {
        let (events, _) = broadcast::channel(64);
        Arc::new(AppState {
            persistence,
            sessions: Sessions::new(cfg.session_ttl),
            limiter: Limiter::new(limits),
            setup,
            events,
            cfg,
            tpm_error: Mutex::new(None),
        })
    }

    /// The lock state as the API reports it.
    pub fn lock_state(&self) -> LockState {
        crate::backend::lock_state(&self.persistence)
    }

    /// Records (or clears) why TPM auto-unlock failed.
    pub fn set_tpm_error(&self, e: Option<String>) {
        *self.tpm_error.lock().unwrap_or_else(PoisonError::into_inner) = e;
    }

    /// Why TPM auto-unlock last failed, if it did.
    pub fn tpm_error(&self) -> Option<String> {
        self.tpm_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Publishes an event to every SSE subscriber (none listening is fine).
    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }
}
