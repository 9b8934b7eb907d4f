// SPDX-License-Identifier: Apache-2.0
//! Test harness: starts real components (system users, swtpm, dbus-daemon, stand-ins) for tests.
//!
//! Owns: process lifetimes of test components (killed on drop), test users, locating the
//! workspace's binaries. Must never: stand in for a component that can run here for real.

pub mod bins;
pub mod broker;
pub mod disks;
pub mod ext4;
pub mod peer;
pub mod swtpm;
pub mod users;
