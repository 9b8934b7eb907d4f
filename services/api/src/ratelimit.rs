// SPDX-License-Identifier: Apache-2.0
//! Attempt limits for credential checks (login, unlock, reset, setup, password change).
//!
//! Two layers, both with exponentially growing back-off:
//! * per client (IPv4 address, or IPv6 /64): after `client_free` failures every further
//!   attempt is refused for `base * 2^(failures - client_free)` (capped at `max_delay`), and
//!   refused *before* the credential is looked at, so during a lock-out even the correct
//!   password gets 429;
//! * global (all clients): the same after `global_free` failures, so a distributed guesser
//!   is slowed as well (at the price that it can delay the admin too; the admin can always
//!   use the console).
//!
//! A success clears the client's record (not the global one). A record quiet for `forget`
//! after its back-off ended is dropped. The table is bounded: when it is full, expired
//! records are purged, and if it is still full new clients share one overflow record, so a
//! flood from many addresses costs bounded memory and throttles itself.
//!
//! Besides, [`Limiter::kdf_permit`] bounds how many credential checks run or wait at once
//! (each is an Argon2id derivation): beyond that the request is answered 429 at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// Tunables; [`LimitConfig::default`] is the production choice.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Failures a client may make before back-off starts.
    pub client_free: u32,
    /// Failures all clients together may make before global back-off starts.
    pub global_free: u32,
    /// First back-off.
    pub base: Duration,
    /// Longest back-off.
    pub max_delay: Duration,
    /// A record is dropped once quiet this long after its back-off ended.
    pub forget: Duration,
    /// Most client records kept.
    pub max_clients: usize,
    /// Credential checks running or queued at once.
    pub max_concurrent_checks: usize,
}

impl Default for LimitConfig {
    fn default() -> LimitConfig {
        LimitConfig {
            client_free: 5,
            global_free: 50,
            base: Duration::from_secs(2),
            max_delay: Duration::from_secs(15 * 60),
            forget: Duration::from_secs(60 * 60),
            max_clients: 10_000,
            max_concurrent_checks: 4,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    blocked_until: Option<Instant>,
    last: Instant,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record { failures: 0, blocked_until: None, last: now }
    }

    fn retry_after(&self, now: Instant) -> Option<Duration> {
        self.blocked_until.and_then(|t| t.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    fn expired(&self, now: Instant, forget: Duration) -> bool {
        let quiet_since = self.blocked_until.map_or(self.last, |b| b.max(self.last));
        now.saturating_duration_since(quiet_since) >= forget
    }

    fn fail(&mut self, now: Instant, free: u32, cfg: &LimitConfig) {
        if self.expired(now, cfg.forget) {
            *self = Record::new(now);
        }
        self.failures = self.failures.saturating_add(1);
        self.last = now;
        if self.failures >= free {
            let exp = (self.failures - free).min(20);
            let delay = cfg.base.saturating_mul(1u32 << exp).min(cfg.max_delay);
            self.blocked_until = Some(now + delay);
        }
    }
}

/// Which client a request comes from, for limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

fn client_key(ip: IpAddr) -> ClientKey {
    match ip {
        IpAddr::V4(a) => ClientKey::V4(u32::from(a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => ClientKey::V4(u32::from(v4)),
            None => {
                let o = a.octets();
                let mut p = [0u8; 8];
                p.copy_from_slice(&o[..8]);
                ClientKey::V6Prefix(u64::from_be_bytes(p))
            }
        },
    }
}

struct Tables {
    clients: HashMap<ClientKey, Record>,
    overflow: Record,
    global: Record,
}

/// The limiter shared by all credential endpoints.
pub struct Limiter {
    cfg: LimitConfig,
    tables: Mutex<Tables>,
    checks: Arc<Semaphore>,
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Limiter {
    /// A limiter with `cfg`.
    pub fn new(cfg: LimitConfig) -> Limiter {
        let now = Instant::now();
        let checks = Arc::new(Semaphore::new(cfg.max_concurrent_checks.max(1)));
        Limiter {
            cfg,
            tables: Mutex::new(Tables {
                clients: HashMap::new(),
                overflow: Record::new(now),
                global: Record::new(now),
            }),
            checks,
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Records are plain values updated whole: a poisoned lock holds consistent data.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses (429) if `ip` or everyone is in back-off; otherwise the caller may check a
    /// credential and must then call [`Limiter::failure`] or [`Limiter::success`].
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        let now = Instant::now();
        let t = self.tables();
        let client = t
            .clients
            .get(&client_key(ip))
            .copied()
            .unwrap_or_else(|| if t.clients.len() >= self.cfg.max_clients { t.overflow } else { Record::new(now) });
        let wait = [client.retry_after(now), t.global.retry_after(now)].into_iter().flatten().max();
        match wait {
            Some(d) => Err(ApiError::RateLimited { retry_after: secs_ceil(d) }),
            None => Ok(()),
        }
    }

    /// Records a failed attempt from `ip`.
    pub fn failure(&self, ip: IpAddr) {
        let now = Instant::now();
        let cfg = &self.cfg;
        let mut t = self.tables();
        let key = client_key(ip);
        if !t.clients.contains_key(&key) && t.clients.len() >= cfg.max_clients {
            t.clients.retain(|_, r| !r.expired(now, cfg.forget));
        }
        if t.clients.contains_key(&key) || t.clients.len() < cfg.max_clients {
            t.clients.entry(key).or_insert_with(|| Record::new(now)).fail(now, cfg.client_free, cfg);
        } else {
            t.overflow.fail(now, cfg.client_free, cfg);
        }
        t.global.fail(now, cfg.global_free, cfg);
    }

    /// Records a successful attempt from `ip` (clears its record).
    pub fn success(&self, ip: IpAddr) {
        self.tables().clients.remove(&client_key(ip));
    }

    /// A slot for one credential check, or 429 if too many are already running or queued.
    pub fn kdf_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.checks).try_acquire_owned().map_err(|_| ApiError::RateLimited { retry_after: 1 })
    }

    /// Client records currently held (for tests of the memory bound).
    pub fn tracked_clients(&self) -> usize {
        self.tables().clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn cfg() -> LimitConfig {
        LimitConfig { client_free: 3, global_free: 10, max_clients: 4, ..LimitConfig::default() }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn back_off_starts_after_free_failures_and_grows() {
        let l = Limiter::new(cfg());
        for _ in 0..2 {
            l.check(ip(1)).unwrap();
            l.failure(ip(1));
        }
        l.check(ip(1)).unwrap();
        l.failure(ip(1));
        let ApiError::RateLimited { retry_after: first } = l.check(ip(1)).unwrap_err() else { panic!() };
        assert_eq!(first, 2);
        l.failure(ip(1));
        let ApiError::RateLimited { retry_after: second } = l.check(ip(1)).unwrap_err() else { panic!() };
        assert_eq!(second, 4);
        // Another client is not affected.
        l.check(ip(2)).unwrap();
    }

    #[test]
    fn success_clears_only_that_client() {
        let l = Limiter::new(cfg());
        l.failure(ip(1));
        l.failure(ip(1));
        l.success(ip(1));
        l.failure(ip(1));
        l.failure(ip(1));
        l.check(ip(1)).unwrap();
    }

    #[test]
    fn global_back_off_covers_every_client() {
        let l = Limiter::new(LimitConfig { client_free: 100, global_free: 5, ..cfg() });
        for n in 0..5 {
            l.failure(ip(n));
        }
        assert!(matches!(l.check(ip(200)), Err(ApiError::RateLimited { .. })));
    }

    #[test]
    fn table_is_bounded_and_overflow_is_shared() {
        let l = Limiter::new(LimitConfig { global_free: 10_000, ..cfg() });
        for n in 0..50 {
            l.failure(ip(n));
        }
        assert_eq!(l.tracked_clients(), 4);
        // 46 failures landed in the shared overflow record: new clients are throttled.
        assert!(matches!(l.check(ip(99)), Err(ApiError::RateLimited { .. })));
        // A tracked client with 1 failure is not.
        l.check(ip(0)).unwrap();
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), client_key(ip(1)));
    }
}
