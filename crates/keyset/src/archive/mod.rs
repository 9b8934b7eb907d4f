// SPDX-License-Identifier: Apache-2.0
//! The `piccolo-export` archive: a plain POSIX/GNU tar stream, produced and consumed in constant
//! memory with respect to file sizes (memory grows only with the number of entries).
//!
//! ```text
//! manifest.json                 first entry: format, version, kind, created, key_id, volumes,
//!                               and for every entry its path, type, mode, size and SHA-256
//! crypto/keyset.json            `full` exports only: the sealed key set (restores with the
//!                               export's password or recovery key on new hardware)
//! ciphertext/<id>/...           each volume's gocryptfs ciphertext, dirs before their contents
//! volumes/<id>/...              each volume's journal, when present
//! trailer.json                  last entry: SHA-256 and length of every archive byte before
//!                               the trailer's own header (the overall checksum)
//! ```
//!
//! **Manifest first, two passes.** The writer hashes the (quiesced) tree once to build the
//! manifest, then streams it. In the streaming pass each file's identity and change stamps
//! (device, inode, size, mtime, ctime) must equal those taken around its hashing in pass 1,
//! before and after it is streamed, or the export fails with [`crate::Error::TreeChanged`]; the
//! importer re-checks every file against its manifest digest anyway, so a change no stamp shows
//! still cannot produce a silently wrong restore. The cost is reading the tree twice (the second
//! read is usually served from the page cache); the gain is on the import side: the importer
//! knows every path, type, size and digest before it writes a byte, enforces the caps against
//! the manifest, and checks each streamed entry against the next manifest entry as it arrives,
//! so an unexpected, reordered or oversized entry is refused at once instead of after a full
//! unpack. A manifest-last layout would need a full staging pass before anything could be
//! judged, and would leave the importer trusting header sizes until the end.
//!
//! The tar stream holds only regular files and directories. Ciphertext symlinks (gocryptfs
//! stores a plaintext symlink as a symlink whose target is one base64url name) are carried as
//! manifest entries of type `symlink` and recreated by the importer only if the target is a
//! single name in that alphabet, so it can never point outside its directory.

mod export;
mod hashio;
mod import;
mod manifest;
mod swap;

pub use export::{ExportSummary, write_export, write_export_file};
pub use import::{ImportHooks, ImportLimits, ImportReport, ManifestInfo, import, import_with_hooks, peek_manifest};
pub use manifest::{ExportKind, MAX_VOLUME_ID_LEN, validate_volume_id};
pub use swap::recover_interrupted_import;

/// The `format` field of an export manifest.
pub const ARCHIVE_FORMAT: &str = "piccolo-export";
/// The only archive version this build writes and reads.
pub const ARCHIVE_VERSION: u64 = 1;
