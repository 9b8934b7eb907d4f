// SPDX-License-Identifier: Apache-2.0
//! `piccolo-health [--config FILE] [--no-mark]`: the boot health gate (see `health`).
//! Exit status: 0 all checks passed (and the boot was marked good), 1 a check failed,
//! 2 bad configuration, 3 the checks passed but MarkBootSuccessful failed.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use piccolo_updater::health::{self, HealthConfig};

#[derive(Parser)]
#[command(name = "piccolo-health", version, about = "Check piccolo is up, then mark the boot good")]
struct Args {
    /// Config file (default /etc/piccolo/health.toml; absent means the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run the checks only.
    #[arg(long)]
    no_mark: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (path, must) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(health::DEFAULT_CONFIG), false),
    };
    let mut cfg = match HealthConfig::load(&path, must) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("piccolo-health: {e}");
            return ExitCode::from(2);
        }
    };
    if args.no_mark {
        cfg.mark = false;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("piccolo-health: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let results = health::run_checks(&cfg).await;
        let mut ok = true;
        for r in &results {
            match &r.failure {
                None => println!("ok    {}: {}", r.name, r.detail),
                Some(f) => {
                    ok = false;
                    println!("FAIL  {}: {f}", r.name);
                }
            }
        }
        if !ok {
            eprintln!("piccolo-health: a required check failed; the boot is NOT marked good");
            return ExitCode::FAILURE;
        }
        if !cfg.mark {
            return ExitCode::SUCCESS;
        }
        match health::mark_good(&cfg.broker_socket).await {
            Ok(slot) => {
                println!("marked {slot} good");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("piccolo-health: {e}");
                ExitCode::from(3)
            }
        }
    })
}
