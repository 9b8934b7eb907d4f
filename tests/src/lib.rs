// SPDX-License-Identifier: Apache-2.0
//! Integration tests and the harness that starts real components (users, swtpm, dbus, update_engine stand-in).
