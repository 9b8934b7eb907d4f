// SPDX-License-Identifier: Apache-2.0
//! `piccolo-updater [--config FILE]`: start-up in order — config, state dir, durable record,
//! control socket (so status is visible while the broker is still starting), recovery
//! against the broker's boot state, then the scheduler; SIGTERM stops it.

#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use piccolo_updater::config::{self, Config};
use piccolo_updater::control::{self, Authz, Control};
use piccolo_updater::engine::Engine;
use piccolo_updater::record::RecordStore;
use piccolo_updater::token::BrokerTokens;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "piccolo-updater", version, about = "piccolo's update worker")]
struct Args {
    /// Config file.
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("piccolo-updater: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", piccolo_updater::http::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Ok(s) = std::os::unix::net::UnixDatagram::unbound()
        && let Err(e) = s.send_to(state.as_bytes(), &path)
    {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::load(&args.config)?;
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let record = RecordStore::load(&cfg.state_dir)?;
    let gid = match &cfg.socket_group {
        None => None,
        Some(g) => {
            Some(nix::unistd::Group::from_name(g)?.ok_or_else(|| format!("unknown socket group {g:?}"))?.gid.as_raw())
        }
    };
    let tokens = Arc::new(BrokerTokens::new(
        cfg.broker_socket.clone(),
        cfg.subscription_tier.clone(),
        cfg.features.clone(),
        cfg.token_ttl_seconds,
    ));
    let socket = cfg.socket.clone();
    let engine = Engine::new(cfg, record, tokens);
    let listener = control::bind(&socket, gid).await?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let svc = Control::new(engine.clone(), Authz::system()).server();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(server);
    tracing::info!(socket = %socket.display(), "serving");
    notify("READY=1\nSTATUS=recovering");

    let e = engine.clone();
    tokio::spawn(async move {
        e.recover().await;
        notify("STATUS=running");
        e.scheduler().await;
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    notify("STOPPING=1");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
