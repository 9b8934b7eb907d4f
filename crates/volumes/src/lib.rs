// SPDX-License-Identifier: Apache-2.0
//! gocryptfs volumes: create, mount with a key on stdin, verify, unmount, state journal.
