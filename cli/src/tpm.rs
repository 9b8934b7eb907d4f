// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl tpm identity|pcrs|seal|unseal`: the TPM as the broker sees it.
//!
//! Secrets go in through a file or stdin and come out to a file (0600) or stdout; they are
//! never taken from argv (where `ps` would show them) and never printed in messages.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use piccolo_proto::v1::tpm_client::TpmClient;
use piccolo_proto::v1::{GetDeviceIdentityRequest, ReadPcrsRequest, SealSecretRequest, UnsealSecretRequest};

use crate::Failure;
use crate::broker::channel;
use crate::output::{status_failure, table};

/// Inputs larger than this are refused before they reach the broker.
const MAX_INPUT: u64 = 64 << 10;

/// `piccoloctl tpm ...`
#[derive(Subcommand)]
pub enum TpmCmd {
    /// The device id (tpm-ek-<sha256 of the EK>) and the EK public key.
    Identity {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// PCR values.
    Pcrs {
        /// Bank: sha256 or sha1.
        #[arg(long, default_value = "sha256")]
        bank: String,
        /// PCR index (repeat; default: all 24).
        #[arg(long = "index", value_name = "N")]
        indices: Vec<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Seal a secret (at most 128 bytes, from --in or stdin) to the current PCR values.
    Seal {
        /// PCR index to bind (repeat; default 7).
        #[arg(long = "pcr", value_name = "N")]
        pcrs: Vec<u32>,
        /// Read the secret from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the sealed blob to this file; default: base64 on stdout.
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Unseal a blob (raw or base64, from --in or stdin); fails if the PCRs changed.
    Unseal {
        /// Read the sealed blob from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the secret to this file (created 0600); default: stdout.
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn read_input(path: &Option<PathBuf>) -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    let r = match path {
        Some(p) => std::fs::File::open(p).and_then(|f| f.take(MAX_INPUT + 1).read_to_end(&mut buf)),
        None => std::io::stdin().take(MAX_INPUT + 1).read_to_end(&mut buf),
    };
    r.map_err(|e| Failure::new(1, format!("cannot read input: {e}")))?;
    if buf.len() as u64 > MAX_INPUT {
        return Err(Failure::new(2, format!("input larger than {MAX_INPUT} bytes")));
    }
    Ok(buf)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), Failure> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| Failure::new(1, format!("cannot write {}: {e}", path.display())))
}

/// A blob file holds the raw blob (starts with "PCSB") or its base64 text.
fn decode_blob(raw: Vec<u8>) -> Vec<u8> {
    if raw.starts_with(b"PCSB") {
        return raw;
    }
    let text: Vec<u8> = raw.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    B64.decode(&text).unwrap_or(raw)
}

/// Runs a `tpm` subcommand.
pub async fn run(socket: &Path, cmd: TpmCmd) -> Result<(), Failure> {
    let mut c = TpmClient::new(channel(socket).await?);
    match cmd {
        TpmCmd::Identity { json } => {
            let id = c.get_device_identity(GetDeviceIdentityRequest {}).await.map_err(|s| status_failure(&s))?;
            let id = id.into_inner();
            if json {
                println!("{}", serde_json::json!({ "device_id": id.device_id, "ek_public_pem": id.ek_public_pem }));
            } else {
                println!("device id  {}", id.device_id);
                print!("EK public key (RSA 2048, TCG default template):\n{}", id.ek_public_pem);
            }
        }
        TpmCmd::Pcrs { bank, indices, json } => {
            let r = c.read_pcrs(ReadPcrsRequest { bank, indices }).await.map_err(|s| status_failure(&s))?;
            let r = r.into_inner();
            if json {
                let pcrs: Vec<_> =
                    r.pcrs.iter().map(|p| serde_json::json!({ "index": p.index, "value": hex(&p.digest) })).collect();
                println!("{}", serde_json::json!({ "bank": r.bank, "pcrs": pcrs }));
            } else {
                let rows: Vec<Vec<String>> = r.pcrs.iter().map(|p| vec![p.index.to_string(), hex(&p.digest)]).collect();
                table(&["PCR", &r.bank.to_ascii_uppercase()], &rows);
            }
        }
        TpmCmd::Seal { pcrs, input, output } => {
            let secret = zeroize::Zeroizing::new(read_input(&input)?);
            let req = SealSecretRequest { secret: secret.to_vec(), pcrs };
            let blob = c.seal_secret(req).await.map_err(|s| status_failure(&s))?.into_inner().sealed_blob;
            match output {
                Some(p) => {
                    write_private(&p, &blob)?;
                    eprintln!("sealed {} bytes into {} ({} bytes)", secret.len(), p.display(), blob.len());
                }
                None => println!("{}", B64.encode(&blob)),
            }
        }
        TpmCmd::Unseal { input, output } => {
            let blob = decode_blob(read_input(&input)?);
            let r = c.unseal_secret(UnsealSecretRequest { sealed_blob: blob }).await.map_err(|s| status_failure(&s))?;
            let secret = zeroize::Zeroizing::new(r.into_inner().secret);
            match output {
                Some(p) => write_private(&p, &secret)?,
                None => std::io::stdout()
                    .write_all(&secret)
                    .map_err(|e| Failure::new(1, format!("cannot write stdout: {e}")))?,
            }
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
