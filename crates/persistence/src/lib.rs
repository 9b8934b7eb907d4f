// SPDX-License-Identifier: Apache-2.0
//! The single lock/unlock state machine of `$PICCOLO_STATE_DIR`, linked by the API worker
//! `piccolo-api` (the one process that owns the key set, the control store, the lock state and
//! the volume journal; see ARCHITECTURE.md).
//!
//! **Owns:** the transitions Locked → Unlocking → Unlocked → Locking → Locked (plus Exporting
//! and Importing), the SDEK while unlocked, the per-volume keys derived from it
//! ([`VolumeKey`], HKDF-SHA256 per volume id), the `volumes/<id>/state.json` journals and
//! their reconciliation against the broker's observed state, the open [`piccolo_store::Store`],
//! TPM auto-unlock enrolment, and the quiescing around exports and imports.
//!
//! **Must never:** log, emit or put in an error a password, recovery key, SDEK or volume key;
//! send a key anywhere but a CreateVolume/MountVolume request to the broker; leave a
//! half-unlocked state (every failure rolls back to locked); leave control or application
//! volumes mounted while locked; mount anything itself (mounting is the broker's).
//!
//! # Unlock
//! key set (password, recovery key or TPM) → SDEK → per-volume keys → mount bootstrap (if not
//! mounted), control and every desired-mounted application volume through [`VolumeBackend`]
//! → open `mounts/control/control.db`. Any failure closes the store, unmounts what this
//! attempt mounted (except bootstrap, which serves the portal while locked) and drops the SDEK.
//!
//! # Lock
//! close the store → unmount application volumes and control → zero the SDEK. Bootstrap stays
//! mounted by design. Every transition is sent as an [`Event`] on a broadcast channel.

mod broker;
mod durable;
mod error;
mod events;
mod grpc;
mod journal;
mod keys;
mod machine;
mod mounts;

pub use broker::{BrokerError, SealBackend, VolumeBackend, VolumeClass, VolumeInfo};
pub use error::{Error, Result};
pub use events::{Event, LockReason, LockState, UnlockMethod};
pub use grpc::GrpcBroker;
pub use journal::{Desired, JOURNAL_VERSION, Observed, VolumeRecord, journal_path};
pub use keys::VolumeKey;
pub use machine::{
    APP_VOLUME_USER, BOOTSTRAP, CONTROL, Config, MAX_VOLUME_ID_LEN, Persistence, ReconcileReport,
    validate_app_volume_id,
};
