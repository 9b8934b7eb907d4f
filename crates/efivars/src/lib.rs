// SPDX-License-Identifier: Apache-2.0
//! UEFI variables through efivarfs: codec and the safe-write algorithm.
