// SPDX-License-Identifier: Apache-2.0
//! UEFI variables through efivarfs: the file format ([`codec`]: attribute word ‖ data, and
//! the value types of `BootNext`, `BootOrder` and systemd-boot's `LoaderEntry*` strings),
//! variable identity ([`VarId`]: strict name and GUID, file `<Name>-<guid>`), and reading,
//! writing and deleting under a configurable root ([`Efivars`]) with the careful write
//! algorithm (immutable flag cleared and restored, create-exclusive, replaced-file check,
//! one `write()`, clean-up on failure).
//!
//! Owns: every byte written under the efivarfs root. Must never: write a variable in more
//! than one `write()`, write a file other than the one it examined, leave behind a file it
//! created when the write failed, leave a variable's immutable flag cleared, follow a link
//! under the root, or act on a name, GUID or attribute word before validating it. It does no
//! authorisation: the broker decides who may touch which variable.
//!
//! ## Errors and gRPC codes
//! [`Error::grpc_code`]: bad names, GUIDs, attributes, empty or oversized data
//! `INVALID_ARGUMENT`; a missing variable `NOT_FOUND`; no efivarfs (no EFI) or a variable
//! too large to return `FAILED_PRECONDITION`; a file replaced mid-write `ABORTED`; a stored
//! file shorter than 4 bytes `DATA_LOSS`; a full variable store `RESOURCE_EXHAUSTED`; other
//! io failures `INTERNAL`.

pub mod codec;
mod error;
mod fs;
mod id;

pub use codec::{Attributes, MAX_DATA_BYTES, Variable};
pub use error::{Code, Error};
pub use fs::{EFIVARFS_MAGIC, Efivars, RootKind};
pub use id::{GLOBAL_GUID, Guid, MAX_NAME_BYTES, SYSTEMD_BOOT_GUID, VarId, VarName};

#[cfg(test)]
mod tests;
