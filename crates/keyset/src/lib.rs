// SPDX-License-Identifier: Apache-2.0
//! Argon2id-sealed key set (SDEK), recovery key, atomic key-set writes, export/import archives.
