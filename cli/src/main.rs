// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl`: the operator's view of the broker and its audit log.
//!
//! Owns: argument parsing, output formatting, exit codes. Must never: talk to anything but
//! the broker socket and the audit files, or print a secret it was given.

mod audit;
mod boot;
mod broker;
mod disks;
mod efi;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "piccoloctl", version, about = "Operate a piccolo box")]
struct Cli {
    /// Broker socket (default: $PICCOLO_BROKER_SOCKET or /run/piccolo/broker.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Broker version, uptime, backends and policy digest.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Who the broker thinks you are and what the policy allows you.
    Whoami {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// The A/B boot slots: status, rollback, mark the running boot good.
    #[command(subcommand)]
    Boot(boot::BootCmd),
    /// Whole disks and whether they hold the running system.
    Disks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Install an OS image onto another disk (dry run with --plan).
    Install(disks::InstallArgs),
    /// EFI variables the broker policy allows (BootNext, LoaderEntryOneShot, ...).
    #[command(subcommand)]
    Efi(efi::EfiCmd),
}

/// A failure to report: message on stderr, exit status.
pub struct Failure {
    /// What went wrong, for a person.
    pub message: String,
    /// Exit status (1 general, 2 usage, 3 denied, 4 broker unreachable, 5 audit chain broken).
    pub code: u8,
}

impl Failure {
    /// A failure with exit status `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure { message: message.into(), code }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.unwrap_or_else(piccolo_proto::client::default_socket);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("piccoloctl: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Info { json } => broker::info(&socket, json).await,
            Cmd::Whoami { json } => broker::whoami(&socket, json).await,
            Cmd::Audit(cmd) => audit::run(cmd),
            Cmd::Boot(cmd) => boot::run(&socket, cmd).await,
            Cmd::Disks { json } => disks::list(&socket, json).await,
            Cmd::Install(a) => disks::install(&socket, a).await,
            Cmd::Efi(cmd) => efi::run(&socket, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("piccoloctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
