// SPDX-License-Identifier: Apache-2.0
//! Boot control for the broker: GPT A/B slots, EFI variables, update_engine client, disks and installer.
