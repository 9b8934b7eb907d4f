// SPDX-License-Identifier: Apache-2.0
//! SQLite control store: migrations, repositories, revision journal, lock and follower gating.
