// SPDX-License-Identifier: Apache-2.0
//! Rebooting the machine, behind a small trait so tests record instead of rebooting.

use std::sync::Mutex;
use std::time::Duration;

use crate::error::Error;

/// Upper bound on a requested delay: long enough for any drain, short enough to notice.
pub const MAX_REBOOT_DELAY: Duration = Duration::from_secs(3600);

/// Refuses delays above [`MAX_REBOOT_DELAY`] (an argument error, never clamped silently).
pub fn check_delay(delay: Duration) -> Result<(), Error> {
    if delay > MAX_REBOOT_DELAY {
        return Err(Error::RebootDelayTooLong { max_secs: MAX_REBOOT_DELAY.as_secs() });
    }
    Ok(())
}

/// Something that can reboot the machine.
pub trait Rebooter: Send + Sync {
    /// Schedules a reboot after `delay` (at most [`MAX_REBOOT_DELAY`]) and returns once it is scheduled.
    fn reboot(&self, delay: Duration) -> Result<(), Error>;
}

/// The real one: after the delay, `sync(2)` then `reboot(2)` with `RB_AUTOBOOT`.
///
/// The delay runs on its own thread so the caller can answer (and audit) first.
#[derive(Debug, Default)]
pub struct SystemRebooter;

impl Rebooter for SystemRebooter {
    fn reboot(&self, delay: Duration) -> Result<(), Error> {
        check_delay(delay)?;
        std::thread::Builder::new()
            .name("piccolo-reboot".into())
            .spawn(move || {
                std::thread::sleep(delay);
                nix::unistd::sync();
                // Returns only on failure; there is nobody left to tell but the log.
                let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
                eprintln!("piccolo: reboot(2) failed: {e}");
            })
            .map(|_| ())
            .map_err(|source| Error::Reboot { source })
    }
}

/// Records requests instead of rebooting (tests, dry runs).
#[derive(Debug, Default)]
pub struct RecordingRebooter {
    requests: Mutex<Vec<Duration>>,
}

impl RecordingRebooter {
    /// The delays requested so far, in order.
    pub fn requests(&self) -> Vec<Duration> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Rebooter for RecordingRebooter {
    fn reboot(&self, delay: Duration) -> Result<(), Error> {
        check_delay(delay)?;
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).push(delay);
        Ok(())
    }
}

/// Appends each request (`delay=<seconds>`) to a file instead of rebooting: the test
/// backend for a broker running as a separate process.
#[derive(Debug, Clone)]
pub struct RecordFileRebooter {
    /// The record file.
    pub path: std::path::PathBuf,
}

impl Rebooter for RecordFileRebooter {
    fn reboot(&self, delay: Duration) -> Result<(), Error> {
        use std::io::Write;
        check_delay(delay)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|source| Error::Reboot { source })?;
        writeln!(f, "delay={}", delay.as_secs()).map_err(|source| Error::Reboot { source })?;
        f.sync_all().map_err(|source| Error::Reboot { source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_rebooter_records_and_refuses_long_delays() {
        let r = RecordingRebooter::default();
        r.reboot(Duration::from_secs(5)).unwrap();
        r.reboot(Duration::ZERO).unwrap();
        assert!(matches!(r.reboot(Duration::from_secs(3601)), Err(Error::RebootDelayTooLong { max_secs: 3600 })));
        assert_eq!(r.requests(), vec![Duration::from_secs(5), Duration::ZERO]);
    }

    #[test]
    fn file_rebooter_appends() {
        let dir = tempfile::tempdir().unwrap();
        let r = RecordFileRebooter { path: dir.path().join("reboots") };
        r.reboot(Duration::from_secs(7)).unwrap();
        r.reboot(Duration::ZERO).unwrap();
        assert!(r.reboot(MAX_REBOOT_DELAY + Duration::from_secs(1)).is_err());
        assert_eq!(std::fs::read_to_string(&r.path).unwrap(), "delay=7\ndelay=0\n");
    }
}
