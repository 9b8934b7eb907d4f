// SPDX-License-Identifier: Apache-2.0
//! The state every handler shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::auth::Sessions;
use crate::backend::Persistence;
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
    /// Key set, control store, lock state.
    pub backend: Arc<dyn Persistence>,
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
}

/// What handlers receive.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// Builds the state.
    pub fn new(backend: Arc<dyn Persistence>, setup: SetupCode, limits: LimitConfig, cfg: AppConfig) -> SharedState {
        let (events, _) = broadcast::channel(64);
        Arc::new(AppState {
            backend,
            sessions: Sessions::new(cfg.session_ttl),
            limiter: Limiter::new(limits),
            setup,
            events,
            cfg,
        })
    }

    /// Publishes an event to every SSE subscriber (none listening is fine).
    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }
}
