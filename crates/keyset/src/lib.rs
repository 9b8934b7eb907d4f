// SPDX-License-Identifier: Apache-2.0
//! The key set that protects piccolo's encrypted state, and the export/import archive format.
//!
//! **Owns:** `crypto/keyset.json` under `$PICCOLO_STATE_DIR` (a random 256-bit SDEK wrapped
//! under an Argon2id key from the admin password and under a recovery key, optionally carrying
//! a TPM-sealed copy), every write to it, and the `piccolo-export` archive format with its
//! streaming writer and validating importer.
//!
//! **Must never:** log, print, `Debug`-format or put in an error any password, recovery key,
//! derived key or SDEK (all live in zeroize-on-drop types with redacting `Debug`); write the
//! key set except atomically; touch live state during an import before the whole archive has
//! been validated; talk gRPC or to the TPM itself (the caller passes closures and blobs).
//!
//! # Key set
//! [`Keyset::create`] draws the SDEK and a recovery key from the OS RNG (getrandom(2)) and
//! writes two AES-256-GCM wraps of the SDEK, each with its own random 96-bit nonce and an AAD
//! that binds the format version and the wrap kind, so a wrap cannot be moved to the other slot.
//! Unlocking returns an [`Sdek`]; [`Keyset::change_password`] and
//! [`Keyset::rotate_recovery_key`] rewrap the same SDEK, so volume data is never touched.
//!
//! ## Argon2id parameters ([`KdfParams::RECOMMENDED`]: m = 64 MiB, t = 3, p = 1)
//! * Memory: 64 MiB is the memory of RFC 9106's second recommended option and about 3-6 % of
//!   a 1-2 GiB board. Unlock attempts are serialised by a process-wide mutex around the whole
//!   derivation (including the block allocation), so a burst of concurrent guesses costs
//!   64 MiB once, never N times; the blocks are zeroed after each derivation.
//! * Passes: RFC 9106 pairs 64 MiB with t = 3. `keyset_bench` measures about 130 ms per
//!   unlock on the x86-64 (AMD EPYC) development machine; a Cortex-A53/A72 class board is
//!   expected (not yet measured) to be several times slower, i.e. well under 2 s: acceptable
//!   for an interactive unlock and a real per-guess cost for an offline attacker.
//! * Lanes: p = 1. The RustCrypto implementation runs lanes sequentially without the
//!   `parallel` feature (and we keep the one core free for serving the portal), so more
//!   lanes would add time without adding hardness.
//! * A key set read from disk (or an import) is refused if its parameters fall outside
//!   8 MiB..=256 MiB, t 1..=16, p 1..=8, so a crafted file cannot exhaust a small board.
//!
//! ## Recovery key
//! 128 bits from the OS RNG + a 32-bit checksum, shown as 32 Crockford-base32 symbols
//! (5 bits each, so no modulo bias) in groups of four. A typo is [`Error::RecoveryKeyMistyped`];
//! a well-formed key that does not open the wrap is [`Error::WrongRecoveryKey`]. It is
//! returned once by [`Keyset::create`] / [`Keyset::rotate_recovery_key`] and never stored.
//! Its wrapping key is SHA-256(domain, salt, entropy): 128 random bits need no stretching.
//!
//! ## TPM auto-unlock
//! The caller seals the SDEK through the broker's SealSecret (PCR 7 policy) and stores the
//! opaque blob with [`Keyset::write_tpm_sealed_sdek`]. At boot [`Keyset::unlock_with_tpm`]
//! hands the blob to a caller-supplied unseal closure; a PCR mismatch comes back as
//! [`Error::TpmPcrChanged`], whose message is exactly "TPM unlock failed: PCR 7 changed", and
//! the store stays locked.
//!
//! ## Crash safety
//! Every key-set write goes through a temp file in `crypto/`, fsync, rename, fsync of the
//! directory. The crash test (`tests/crash.rs`) kills the writer with SIGKILL at every step
//! and checks that the old or the new password (and recovery key) opens the key set.
//!
//! # Export and import
//! See [`write_export`] and [`import`]; the format is described in the `archive` module docs.
//! After [`import`] the caller must drop any SDEK it holds, keep the store locked and unlock
//! again with the password or recovery key of the export ([`ImportReport::requires_unlock`]).

mod archive;
mod durable;
mod error;
mod format;
pub mod hooks;
mod kdf;
mod keyset;
mod recovery;
mod secret;

pub use archive::{
    ARCHIVE_FORMAT, ARCHIVE_VERSION, ExportKind, ExportSummary, ImportHooks, ImportLimits, ImportReport,
    MAX_VOLUME_ID_LEN, ManifestInfo, import, import_with_hooks, peek_manifest, recover_interrupted_import,
    validate_volume_id, write_export, write_export_file,
};
pub use error::{Error, Result};
pub use format::{KEYSET_FORMAT, KEYSET_VERSION, MAX_TPM_BLOB_BYTES};
pub use kdf::KdfParams;
pub use keyset::{
    CreatedKeyset, KEYSET_RELATIVE_PATH, Keyset, PENDING_KEYSET_RELATIVE_PATH, PendingRecoveryKey, TpmUnsealError,
    keyset_path,
};
pub use recovery::{RECOVERY_ENTROPY_BYTES, RECOVERY_SYMBOLS, RecoveryKey};
pub use secret::{KEY_LEN, MAX_PASSWORD_BYTES, MIN_NEW_PASSWORD_CHARS, Password, Sdek, Secret};
