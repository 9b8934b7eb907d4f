// SPDX-License-Identifier: Apache-2.0
//! The one table of broker RPCs.
//!
//! Adding a privileged verb means: its `rpc` line in a `.proto` file, one entry
//! here, its handler in the broker. The policy loader rejects names not in this
//! table, and the broker's guard refuses calls whose RPC no rule names.

/// What the policy and the audit log need to know about one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcSpec {
    /// The RPC as named in the policy and the audit log (the proto method name).
    pub name: &'static str,
    /// The proto service that carries it.
    pub service: &'static str,
    /// Mutating RPCs get a durable intent record before they act.
    pub mutating: bool,
    /// Argument constraint key a rule granting this RPC must set (e.g. `volumes`).
    pub constraint: Option<&'static str>,
}

macro_rules! rpcs {
    ($($name:ident => ($service:literal, $mutating:literal, $constraint:expr)),* $(,)?) => {
        /// Every broker RPC, as a typed value for handlers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Rpc { $(
            #[doc = concat!("`", stringify!($name), "`")]
            $name,
        )* }

        /// The table, in declaration order.
        pub const RPCS: &[RpcSpec] = &[$(RpcSpec {
            name: stringify!($name),
            service: $service,
            mutating: $mutating,
            constraint: $constraint,
        }),*];

        impl Rpc {
            /// Every RPC, in table order.
            pub const ALL: &[Rpc] = &[$(Rpc::$name),*];

            /// This RPC's table entry.
            pub fn spec(self) -> &'static RpcSpec {
                &RPCS[self as usize]
            }
        }
    };
}

// name => (service, mutating, required argument-constraint key)
rpcs! {
    GetInfo => ("Broker", false, None),
    WhoAmI => ("Broker", false, None),
    GetBootState => ("Boot", false, None),
    PrepareInactiveSlot => ("Boot", true, None),
    WriteInactiveSlot => ("Boot", true, None),
    ActivateInactiveSlot => ("Boot", true, None),
    CancelUpdate => ("Boot", true, None),
    RollbackToOtherSlot => ("Boot", true, None),
    MarkBootSuccessful => ("Boot", true, None),
    Reboot => ("Boot", true, None),
    ListDisks => ("Disks", false, None),
    PlanInstall => ("Disks", false, None),
    InstallToDisk => ("Disks", true, Some("disks")),
    GetEfiVariable => ("Efi", false, Some("efi_variables")),
    SetEfiVariable => ("Efi", true, Some("efi_variables")),
    DeleteEfiVariable => ("Efi", true, Some("efi_variables")),
    CreateVolume => ("Volumes", true, Some("volumes")),
    MountVolume => ("Volumes", true, Some("volumes")),
    UnmountVolume => ("Volumes", true, Some("volumes")),
    VolumeStatus => ("Volumes", false, Some("volumes")),
    GetUpdateEngineStatus => ("UpdateEngine", false, None),
    WatchUpdateEngine => ("UpdateEngine", false, None),
    ResetUpdateEngine => ("UpdateEngine", true, None),
    GetDeviceIdentity => ("Tpm", false, None),
    ReadPcrs => ("Tpm", false, None),
    SealSecret => ("Tpm", false, None),
    UnsealSecret => ("Tpm", false, None),
    ResealSecret => ("Tpm", false, None),
    GetDeviceTokenKey => ("Tpm", false, None),
    SignDeviceToken => ("Tpm", false, None),
    EnrollDiskTpm => ("Tpm", true, Some("partitions")),
    ResealDiskTpm => ("Tpm", true, Some("partitions")),
    ExportArchive => ("Archive", true, Some("volumes")),
    ImportArchive => ("Archive", true, Some("volumes")),
}

impl Rpc {
    /// Looks an RPC up by its policy name.
    pub fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.iter().copied().find(|r| r.spec().name == name)
    }

    /// The policy/audit name.
    pub fn name(self) -> &'static str {
        self.spec().name
    }
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_enum_agree() {
        for (i, r) in Rpc::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Rpc::from_name(r.name()), Some(*r));
        }
        assert_eq!(Rpc::from_name("RunCommand"), None);
    }
}
