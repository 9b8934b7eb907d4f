// SPDX-License-Identifier: Apache-2.0
//! TPM 2.0 backend for the broker (tss-esapi): identity, PCRs, sealing, device-token key, disk enrollment.
