// SPDX-License-Identifier: Apache-2.0
//! Test harness: starts real components (system users, swtpm, dbus-daemon, stand-ins) for tests.
