// SPDX-License-Identifier: Apache-2.0
//! update_engine's status tuple `(xdssx)` and its operation string.

/// `current_operation`, matched by its string (`UpdateStatusToString`), never by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `UPDATE_STATUS_IDLE`.
    Idle,
    /// `UPDATE_STATUS_CHECKING_FOR_UPDATE`.
    CheckingForUpdate,
    /// `UPDATE_STATUS_UPDATE_AVAILABLE`.
    UpdateAvailable,
    /// `UPDATE_STATUS_DOWNLOADING`.
    Downloading,
    /// `UPDATE_STATUS_VERIFYING`.
    Verifying,
    /// `UPDATE_STATUS_FINALIZING`.
    Finalizing,
    /// `UPDATE_STATUS_UPDATED_NEED_REBOOT`.
    UpdatedNeedReboot,
    /// `UPDATE_STATUS_REPORTING_ERROR_EVENT`.
    ReportingErrorEvent,
    /// A string this client does not know (a newer update_engine), kept verbatim.
    Other(String),
}

const NAMES: &[(Operation, &str)] = &[
    (Operation::Idle, "UPDATE_STATUS_IDLE"),
    (Operation::CheckingForUpdate, "UPDATE_STATUS_CHECKING_FOR_UPDATE"),
    (Operation::UpdateAvailable, "UPDATE_STATUS_UPDATE_AVAILABLE"),
    (Operation::Downloading, "UPDATE_STATUS_DOWNLOADING"),
    (Operation::Verifying, "UPDATE_STATUS_VERIFYING"),
    (Operation::Finalizing, "UPDATE_STATUS_FINALIZING"),
    (Operation::UpdatedNeedReboot, "UPDATE_STATUS_UPDATED_NEED_REBOOT"),
    (Operation::ReportingErrorEvent, "UPDATE_STATUS_REPORTING_ERROR_EVENT"),
];

impl Operation {
    /// Every known operation, in update_engine's enum order.
    pub fn known() -> impl Iterator<Item = Operation> {
        NAMES.iter().map(|(o, _)| o.clone())
    }

    /// Parses update_engine's string.
    pub fn parse(s: &str) -> Operation {
        NAMES.iter().find(|(_, n)| *n == s).map(|(o, _)| o.clone()).unwrap_or_else(|| Operation::Other(s.to_owned()))
    }

    /// update_engine's string for this operation.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Other(s) => s,
            known => NAMES.iter().find(|(o, _)| o == known).map(|(_, n)| *n).unwrap_or(""),
        }
    }

    /// `ResetStatus` succeeds only in these states (a no-op in IDLE).
    pub fn resettable(&self) -> bool {
        matches!(self, Operation::Idle | Operation::UpdatedNeedReboot)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `GetStatus` returns and `StatusUpdate` carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Unix time of the last update check (0: never).
    pub last_checked_time: i64,
    /// Fraction in [0, 1].
    pub progress: f64,
    /// The state.
    pub operation: Operation,
    /// Version on offer, `"0.0.0"` when there is none.
    pub new_version: String,
    /// Payload size in bytes.
    pub new_size: i64,
}

/// The D-Bus tuple `(xdssx)`.
pub(crate) type Wire = (i64, f64, String, String, i64);

impl From<Wire> for Status {
    fn from((last_checked_time, progress, op, new_version, new_size): Wire) -> Status {
        Status { last_checked_time, progress, operation: Operation::parse(&op), new_version, new_size }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_strings_round_trip() {
        let all: Vec<Operation> = Operation::known().collect();
        assert_eq!(all.len(), 8);
        for o in all {
            assert_eq!(Operation::parse(o.as_str()), o);
            assert!(o.as_str().starts_with("UPDATE_STATUS_"));
        }
        assert_eq!(
            Operation::parse("UPDATE_STATUS_ATTEMPTING_ROLLBACK"),
            Operation::Other("UPDATE_STATUS_ATTEMPTING_ROLLBACK".into())
        );
        assert_eq!(Operation::parse("UPDATE_STATUS_ATTEMPTING_ROLLBACK").as_str(), "UPDATE_STATUS_ATTEMPTING_ROLLBACK");
        // Numbers are not operations.
        assert_eq!(Operation::parse("0"), Operation::Other("0".into()));
    }

    #[test]
    fn only_idle_and_need_reboot_are_resettable() {
        let ok: Vec<String> = Operation::known().filter(Operation::resettable).map(|o| o.to_string()).collect();
        assert_eq!(ok, ["UPDATE_STATUS_IDLE", "UPDATE_STATUS_UPDATED_NEED_REBOOT"]);
    }

    #[test]
    fn wire_tuple() {
        let s = Status::from((1_700_000_000, 0.25, "UPDATE_STATUS_DOWNLOADING".to_owned(), "1.2.3".to_owned(), 42));
        assert_eq!(s.operation, Operation::Downloading);
        assert_eq!(
            (s.last_checked_time, s.progress, s.new_version.as_str(), s.new_size),
            (1_700_000_000, 0.25, "1.2.3", 42)
        );
    }
}
