// SPDX-License-Identifier: Apache-2.0
//! Hash-chained, append-only audit log: writer with group commit, reader, verifier.
