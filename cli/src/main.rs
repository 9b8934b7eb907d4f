// SPDX-License-Identifier: Apache-2.0
//! Operator CLI.

fn main() {}
