// SPDX-License-Identifier: Apache-2.0
//! The maintenance window: a daily `HH:MM`–`HH:MM` range in UTC (it may wrap past midnight;
//! equal ends mean "any time"). Reboots into a staged update happen only inside it, unless
//! the operator asks for one at once.

use std::time::{SystemTime, UNIX_EPOCH};

/// A daily window, minutes after 00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Opens at this minute of the day.
    pub start: u16,
    /// Closes at this minute of the day (exclusive).
    pub end: u16,
}

const DAY: u64 = 24 * 3600;

impl Window {
    /// Open all day.
    pub const ANY: Window = Window { start: 0, end: 0 };

    /// Parses `"HH:MM"` twice.
    pub fn parse(start: &str, end: &str) -> Result<Window, String> {
        Ok(Window { start: minute_of(start)?, end: minute_of(end)? })
    }

    /// Whether the window is "any time".
    pub fn is_any(&self) -> bool {
        self.start == self.end
    }

    /// Whether `unix` seconds fall inside the window.
    pub fn contains(&self, unix: u64) -> bool {
        if self.is_any() {
            return true;
        }
        let m = u16::try_from((unix % DAY) / 60).unwrap_or(0);
        if self.start < self.end { (self.start..self.end).contains(&m) } else { m >= self.start || m < self.end }
    }

    /// Seconds from `unix` until the window next opens (0 when open now).
    pub fn seconds_until_open(&self, unix: u64) -> u64 {
        if self.contains(unix) {
            return 0;
        }
        let now = unix % DAY;
        let open = u64::from(self.start) * 60;
        if open > now { open - now } else { DAY - now + open }
    }

    /// `"HH:MM"` of the start and end.
    pub fn render(&self) -> (String, String) {
        let f = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        (f(self.start), f(self.end))
    }
}

fn minute_of(s: &str) -> Result<u16, String> {
    let bad = || format!("{s:?} is not HH:MM (00:00 to 23:59, UTC)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || s.trim().len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Seconds since the Unix epoch now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn plain_and_wrapping_windows() {
        let w = Window::parse("02:00", "05:30").unwrap();
        assert!(!w.contains(H + 59 * 60));
        assert!(w.contains(2 * H));
        assert!(w.contains(5 * H + 29 * 60));
        assert!(!w.contains(5 * H + 30 * 60));
        assert_eq!(w.seconds_until_open(H), H);
        assert_eq!(w.seconds_until_open(6 * H), 20 * H);
        let wrap = Window::parse("23:00", "01:00").unwrap();
        assert!(wrap.contains(23 * H + 5) && wrap.contains(DAY * 9 + 30 * 60) && !wrap.contains(DAY + H));
        assert_eq!(wrap.seconds_until_open(22 * H), H);
        assert!(Window::ANY.contains(12345) && Window::ANY.is_any());
        assert_eq!(w.render(), ("02:00".into(), "05:30".into()));
    }

    #[test]
    fn bad_times() {
        for bad in ["24:00", "1:00", "12:60", "noon", "12-00", ""] {
            assert!(Window::parse(bad, "01:00").is_err(), "{bad}");
        }
    }
}
