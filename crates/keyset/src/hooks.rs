// SPDX-License-Identifier: Apache-2.0
//! Test-only hooks, compiled in only with the `test-hooks` feature (this crate's own tests and
//! benches turn it on through a dev-dependency on itself). Without the feature every hook is an
//! empty inline function, so production builds carry no crash points and no counters.
//!
//! * Crash points: with `PICCOLO_KEYSET_CRASH_AT=<point>` a durable write stops at that point,
//!   prints `PICCOLO-KEYSET-CRASH-POINT <point>` on stderr and sleeps until the test kills it
//!   with SIGKILL (or aborts at once with `PICCOLO_KEYSET_CRASH_MODE=abort`).
//! * Derivation counter: how many Argon2id derivations run at the same moment, and the peak.

/// A step of a durable (atomic) file write or an import swap at which a test may crash the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Half of the temp file's bytes are written.
    MidTempWrite,
    /// The temp file is fully written, not yet fsynced.
    AfterTempWrite,
    /// The temp file is fsynced, not yet renamed.
    AfterTempFsync,
    /// The temp file is renamed over the target, the directory is not yet fsynced.
    AfterRename,
    /// The directory is fsynced; the write is complete.
    AfterDirFsync,
    /// An import is validated and staged, its journal not yet written.
    ImportBeforeJournal,
    /// An import's swap journal is durable, nothing is swapped yet.
    ImportAfterJournal,
    /// An import has moved one live target aside, its replacement is not in place yet.
    ImportMidSwap,
    /// An import has swapped every target, the old content is not deleted yet.
    ImportAfterSwap,
}

impl CrashPoint {
    /// Every crash point of a durable file write, in order.
    pub const WRITE_STEPS: &'static [CrashPoint] = &[
        CrashPoint::MidTempWrite,
        CrashPoint::AfterTempWrite,
        CrashPoint::AfterTempFsync,
        CrashPoint::AfterRename,
        CrashPoint::AfterDirFsync,
    ];

    /// Every crash point of an import swap, in order.
    pub const IMPORT_STEPS: &'static [CrashPoint] = &[
        CrashPoint::ImportBeforeJournal,
        CrashPoint::ImportAfterJournal,
        CrashPoint::ImportMidSwap,
        CrashPoint::ImportAfterSwap,
    ];

    /// The name used in `PICCOLO_KEYSET_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::MidTempWrite => "mid-temp-write",
            CrashPoint::AfterTempWrite => "after-temp-write",
            CrashPoint::AfterTempFsync => "after-temp-fsync",
            CrashPoint::AfterRename => "after-rename",
            CrashPoint::AfterDirFsync => "after-dir-fsync",
            CrashPoint::ImportBeforeJournal => "import-before-journal",
            CrashPoint::ImportAfterJournal => "import-after-journal",
            CrashPoint::ImportMidSwap => "import-mid-swap",
            CrashPoint::ImportAfterSwap => "import-after-swap",
        }
    }
}

#[cfg(feature = "test-hooks")]
mod enabled {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::CrashPoint;

    /// Environment variable naming the crash point.
    pub const CRASH_AT_ENV: &str = "PICCOLO_KEYSET_CRASH_AT";
    /// `pause` (default: report and sleep until SIGKILL) or `abort`.
    pub const CRASH_MODE_ENV: &str = "PICCOLO_KEYSET_CRASH_MODE";
    /// Prefix of the line printed on stderr when a crash point is reached.
    pub const CRASH_BANNER: &str = "PICCOLO-KEYSET-CRASH-POINT";

    pub(crate) fn crash_point(point: CrashPoint) {
        if std::env::var(CRASH_AT_ENV).ok().as_deref() != Some(point.name()) {
            return;
        }
        let mut err = std::io::stderr();
        let _ = writeln!(err, "{CRASH_BANNER} {}", point.name());
        let _ = err.flush();
        if std::env::var(CRASH_MODE_ENV).ok().as_deref() == Some("abort") {
            std::process::abort();
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    static TOTAL: AtomicUsize = AtomicUsize::new(0);

    /// Counts one derivation in flight for as long as it lives.
    pub(crate) struct DerivationGuard(());

    impl DerivationGuard {
        pub(crate) fn enter() -> DerivationGuard {
            let now = ACTIVE.fetch_add(1, Ordering::SeqCst) + 1;
            PEAK.fetch_max(now, Ordering::SeqCst);
            TOTAL.fetch_add(1, Ordering::SeqCst);
            DerivationGuard(())
        }
    }

    impl Drop for DerivationGuard {
        fn drop(&mut self) {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// `(peak concurrent, total)` Argon2id derivations since the last reset.
    pub fn derivation_stats() -> (usize, usize) {
        (PEAK.load(Ordering::SeqCst), TOTAL.load(Ordering::SeqCst))
    }

    /// Resets the derivation counters.
    pub fn reset_derivation_stats() {
        PEAK.store(0, Ordering::SeqCst);
        TOTAL.store(0, Ordering::SeqCst);
    }
}

#[cfg(feature = "test-hooks")]
pub use enabled::{CRASH_AT_ENV, CRASH_BANNER, CRASH_MODE_ENV, derivation_stats, reset_derivation_stats};
#[cfg(feature = "test-hooks")]
pub(crate) use enabled::{DerivationGuard, crash_point};

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn crash_point(_point: CrashPoint) {}

#[cfg(not(feature = "test-hooks"))]
pub(crate) struct DerivationGuard;

#[cfg(not(feature = "test-hooks"))]
impl DerivationGuard {
    #[inline(always)]
    pub(crate) fn enter() -> DerivationGuard {
        DerivationGuard
    }
}
