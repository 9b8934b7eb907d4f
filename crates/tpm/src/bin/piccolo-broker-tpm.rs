// SPDX-License-Identifier: Apache-2.0
//! `piccolo-broker-tpm`: runs one TPM operation for the broker and exits.
//!
//! The broker starts it per Tpm call, after authorising and auditing the call, so the
//! long-lived root process never maps the TPM stack (tss-esapi, libtss2, libcrypto). Reads
//! one `TpmHelperRequest` from stdin (to EOF, at most `TPM_HELPER_MAX_BYTES`), writes
//! one `TpmHelperResponse` to stdout, logs to stderr (the broker's journal). Exit 0 whenever
//! an answer was written, failures included; 2 when the exchange itself failed.

use std::io::{Read, Write};
use std::process::ExitCode;

use piccolo_proto::paths::TPM_HELPER_MAX_BYTES;
use piccolo_tpm::helper;
use tracing_subscriber::filter::LevelFilter;
use zeroize::Zeroizing;

fn main() -> ExitCode {
    let level = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<LevelFilter>().ok());
    tracing_subscriber::fmt()
        .with_max_level(level.unwrap_or(LevelFilter::WARN))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut input = Zeroizing::new(Vec::new());
    if let Err(e) = std::io::stdin().lock().take(TPM_HELPER_MAX_BYTES + 1).read_to_end(&mut input) {
        tracing::error!(error = %e, "cannot read the request from stdin");
        return ExitCode::from(2);
    }
    if input.len() as u64 > TPM_HELPER_MAX_BYTES {
        tracing::error!(limit = TPM_HELPER_MAX_BYTES, "request larger than the limit");
        return ExitCode::from(2);
    }
    let output = helper::serve(&input);
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(&output).and_then(|()| out.flush()) {
        tracing::error!(error = %e, "cannot write the answer to stdout");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
