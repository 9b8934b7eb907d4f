// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl efi get|set|delete`: EFI variables through the broker (which allows only
//! the variables its policy names).
//!
//! Values are given and shown by type: `BootNext`/`BootCurrent` as a boot number
//! (`Boot0003` or `3`), `BootOrder` as a comma-separated list, systemd-boot's `Loader*`
//! variables as strings (UTF-16LE with a NUL on the wire); anything else as hex.

use std::path::Path;

use clap::{Args, Subcommand};
use piccolo_efivars::{GLOBAL_GUID, SYSTEMD_BOOT_GUID, codec};
use piccolo_proto::v1::efi_client::EfiClient;
use piccolo_proto::v1::{DeleteEfiVariableRequest, GetEfiVariableRequest, SetEfiVariableRequest};

use crate::Failure;
use crate::broker::channel;
use crate::output::status_failure;

/// `piccoloctl efi ...`
#[derive(Subcommand)]
pub enum EfiCmd {
    /// Print a variable's attributes and value.
    Get {
        #[command(flatten)]
        var: VarArgs,
        /// Print JSON (attributes, data as hex, decoded value).
        #[arg(long)]
        json: bool,
    },
    /// Create or replace a variable.
    Set {
        #[command(flatten)]
        var: VarArgs,
        /// The value: a boot number (BootNext), a list (BootOrder), a string (Loader*).
        #[arg(conflicts_with = "hex")]
        value: Option<String>,
        /// The raw data as hex instead of a typed value.
        #[arg(long)]
        hex: Option<String>,
        /// Attribute word (default 0x7: NON_VOLATILE|BOOTSERVICE_ACCESS|RUNTIME_ACCESS).
        #[arg(long, value_parser = parse_u32)]
        attributes: Option<u32>,
    },
    /// Delete a variable.
    Delete {
        #[command(flatten)]
        var: VarArgs,
    },
}

/// Which variable.
#[derive(Args)]
pub struct VarArgs {
    /// Variable name (BootNext, BootOrder, LoaderEntryOneShot, ...).
    name: String,
    /// Vendor GUID, or `global` / `systemd-boot`. Default: systemd-boot for names starting
    /// with `Loader`, global otherwise.
    #[arg(long)]
    guid: Option<String>,
}

impl VarArgs {
    fn guid(&self) -> String {
        match self.guid.as_deref() {
            Some("global") => GLOBAL_GUID.into(),
            Some("systemd-boot") => SYSTEMD_BOOT_GUID.into(),
            Some(g) => g.into(),
            None if self.name.starts_with("Loader") => SYSTEMD_BOOT_GUID.into(),
            None => GLOBAL_GUID.into(),
        }
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

/// How a variable's data is typed, from its name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    BootNumber,
    BootList,
    Text,
    Bytes,
}

fn kind_of(name: &str) -> Kind {
    match name {
        "BootNext" | "BootCurrent" => Kind::BootNumber,
        "BootOrder" => Kind::BootList,
        n if n.starts_with("Loader") => Kind::Text,
        _ => Kind::Bytes,
    }
}

fn usage(message: String) -> Failure {
    Failure::new(2, message)
}

/// `Boot0003`, `0003` (hex, as UEFI names them) or `3`.
fn boot_number(s: &str) -> Result<u16, Failure> {
    let hex = s.strip_prefix("Boot").unwrap_or(s);
    u16::from_str_radix(hex, 16).map_err(|_| usage(format!("{s:?} is not a boot number (e.g. Boot0003 or 3)")))
}

fn from_hex(s: &str) -> Result<Vec<u8>, Failure> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(usage("--hex needs an even number of hex digits".into()));
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| usage(e.to_string()))).collect()
}

fn to_hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(name: &str, value: Option<&str>, hex: Option<&str>) -> Result<Vec<u8>, Failure> {
    match (value, hex) {
        (_, Some(h)) => from_hex(h),
        (None, None) => Err(usage("give a value (or --hex)".into())),
        (Some(v), None) => match kind_of(name) {
            Kind::BootNumber => Ok(codec::encode_u16(boot_number(v)?)),
            Kind::BootList => {
                let nums: Result<Vec<u16>, Failure> = v.split(',').map(|p| boot_number(p.trim())).collect();
                Ok(codec::encode_u16_list(&nums?))
            }
            Kind::Text => codec::encode_utf16(v).map_err(|e| usage(e.to_string())),
            Kind::Bytes => Err(usage(format!("{name} has no known type: give the data with --hex"))),
        },
    }
}

/// The typed value, or `None` when the data does not decode as the name's type.
fn decode(name: &str, data: &[u8]) -> Option<String> {
    match kind_of(name) {
        Kind::BootNumber => codec::decode_u16(data).ok().map(|n| format!("Boot{n:04X}")),
        Kind::BootList => codec::decode_u16_list(data)
            .ok()
            .map(|v| v.iter().map(|n| format!("Boot{n:04X}")).collect::<Vec<_>>().join(",")),
        Kind::Text => codec::decode_utf16(data).ok(),
        Kind::Bytes => None,
    }
}

/// Runs an `efi` subcommand.
pub async fn run(socket: &Path, cmd: EfiCmd) -> Result<(), Failure> {
    let mut c = EfiClient::new(channel(socket).await?);
    match cmd {
        EfiCmd::Get { var, json } => {
            let req = GetEfiVariableRequest { name: var.name.clone(), vendor_guid: var.guid() };
            let v = c.get_efi_variable(req).await.map_err(|s| status_failure(&s))?.into_inner();
            let value = decode(&var.name, &v.data);
            if json {
                let out = serde_json::json!({
                    "name": var.name, "guid": var.guid(), "attributes": v.attributes,
                    "data_hex": to_hex(&v.data), "value": value,
                });
                println!("{out}");
            } else {
                println!("{}-{}", var.name, var.guid());
                println!("attributes  {:#x}", v.attributes);
                println!("size        {}", v.data.len());
                match value {
                    Some(s) => println!("value       {s}"),
                    None => println!("data        {}", to_hex(&v.data)),
                }
            }
        }
        EfiCmd::Set { var, value, hex, attributes } => {
            let data = encode(&var.name, value.as_deref(), hex.as_deref())?;
            let req = SetEfiVariableRequest { name: var.name.clone(), vendor_guid: var.guid(), attributes, data };
            c.set_efi_variable(req).await.map_err(|s| status_failure(&s))?;
            println!("set {}-{}", var.name, var.guid());
        }
        EfiCmd::Delete { var } => {
            let req = DeleteEfiVariableRequest { name: var.name.clone(), vendor_guid: var.guid() };
            c.delete_efi_variable(req).await.map_err(|s| status_failure(&s))?;
            println!("deleted {}-{}", var.name, var.guid());
        }
    }
    Ok(())
}
