// SPDX-License-Identifier: Apache-2.0
//! `piccolo-api` entry point: parse flags, build the persistence state machine over the
//! broker, reconcile and try TPM auto-unlock, publish the setup code on a fresh box, take the
//! listening sockets, serve until SIGTERM (then lock).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use piccolo_api::backend::{LockState, Persistence};
use piccolo_api::error::ErrorChain;
use piccolo_api::events::Event;
use piccolo_api::listen::Scheme;
use piccolo_api::ratelimit::LimitConfig;
use piccolo_api::setup::SetupCode;
use piccolo_api::state::{AppConfig, AppState, SharedState};
use piccolo_api::tls::{CertSource, Tls};
use piccolo_keyset::KdfParams;
use piccolo_persistence::Config;

/// piccolo's HTTP API worker.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on when not socket-activated (repeatable). Production gets its
    /// sockets from piccolo-api.socket instead.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,
    /// Address to serve HTTPS on when not socket-activated (repeatable; default none).
    /// Production gets it from piccolo-api-tls.socket (descriptor named "https").
    #[arg(long)]
    listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for HTTPS (with --tls-key). Without both, a self-signed
    /// certificate is made at start, kept in memory only, new at every restart.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS (with --tls-cert); refused if every user may read it.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// State directory, shared with the broker's volumes (`[volumes] state_dir`): the API
    /// writes `crypto/`, `volumes/`, `exports/`; the broker owns `ciphertext/` and `mounts/`.
    #[arg(long, env = "PICCOLO_STATE_DIR", default_value = "/var/lib/piccolo")]
    state_dir: PathBuf,
    /// Where the first-run setup code file is written (mode 0600). systemd's
    /// RuntimeDirectory= sets RUNTIME_DIRECTORY.
    #[arg(long, env = "RUNTIME_DIRECTORY", default_value = "/run/piccolo-api")]
    runtime_dir: PathBuf,
    /// The broker's socket (volumes, TPM sealing, boot state).
    #[arg(long, env = "PICCOLO_BROKER_SOCKET", default_value = piccolo_proto::paths::BROKER_SOCKET)]
    broker_socket: PathBuf,
    /// The update worker's control socket (updates, update events).
    #[arg(long, env = piccolo_proto::paths::UPDATER_SOCKET_ENV, default_value = piccolo_proto::paths::UPDATER_SOCKET)]
    updater_socket: PathBuf,
    /// Mark the session cookie Secure on plain HTTP too (behind a TLS-terminating proxy);
    /// cookies answered on the HTTPS listeners are always Secure.
    #[arg(long)]
    secure_cookies: bool,
    /// Session lifetime in seconds.
    #[arg(long, default_value_t = 12 * 3600)]
    session_ttl_secs: u64,
    /// Largest JSON request body in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_json_bytes: usize,
    /// Argon2id memory (KiB) for a new key set. Production keeps the default; tests and
    /// benchmarks lower it (at least 8192).
    #[arg(long, default_value_t = KdfParams::RECOMMENDED.m_cost_kib)]
    kdf_memory_kib: u32,
    /// Argon2id passes for a new key set.
    #[arg(long, default_value_t = KdfParams::RECOMMENDED.t_cost)]
    kdf_passes: u32,
    /// Failed credential checks per client before back-off starts.
    #[arg(long, default_value_t = LimitConfig::default().client_free)]
    client_free_attempts: u32,
    /// Failed credential checks over all clients before global back-off starts.
    #[arg(long, default_value_t = LimitConfig::default().global_free)]
    global_free_attempts: u32,
    /// Seconds between boot-state polls for the event stream (0: never).
    #[arg(long, default_value_t = 10)]
    boot_poll_secs: u64,
    /// Seconds between volume reconciliations (dead gocryptfs, stray mounts).
    #[arg(long, default_value_t = 30)]
    reconcile_secs: u64,
    /// Seconds between control-store maintenance runs (quick_check, WAL checkpoint).
    #[arg(long, default_value_t = 3600)]
    maintenance_secs: u64,
    /// Do not try TPM auto-unlock (nor offer enrolment): no TPM on this box.
    #[arg(long)]
    no_tpm: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in the journal (stderr is a socket there); only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // Two worker threads: KDF work runs on the blocking pool, so two are enough for serving.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %ErrorChain(&*e), "piccolo-api failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let kdf = KdfParams { m_cost_kib: args.kdf_memory_kib, t_cost: args.kdf_passes, p_cost: 1 };
    kdf.validate()?;
    // Before anything is mounted or written: under systemd, refuse a namespace the broker's
    // volume mounts cannot reach (the store would land in plaintext on the bare directory).
    piccolo_api::mounts::check(&args.state_dir.join("mounts"))?;
    let broker = piccolo_api::backend::broker(&args.broker_socket)?;
    let sealer: Option<Arc<dyn piccolo_persistence::SealBackend>> =
        if args.no_tpm { None } else { Some(broker.clone()) };
    let mut config = Config::new(&args.state_dir);
    config.kdf = kdf;
    let persistence = Persistence::new(config, broker, sealer).await?;
    let startup = piccolo_api::backend::start(&persistence).await;
    // The code file exists before the socket is bound, so whoever can connect can find it.
    let (setup, code) = if piccolo_api::backend::lock_state(&persistence) == LockState::Uninitialised {
        let (setup, code) = SetupCode::generate(&args.runtime_dir)?;
        (setup, Some(code))
    } else {
        (SetupCode::none(), None)
    };
    let listeners = piccolo_api::listen::listeners(&args.listen, &args.listen_tls).await?;
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr()).collect();
    let https: Vec<SocketAddr> =
        listeners.iter().filter(|l| l.scheme == Scheme::Https).filter_map(|l| l.local_addr()).collect();
    let tls = if https.is_empty() {
        if args.tls_cert.is_some() {
            tracing::warn!(
                "--tls-cert/--tls-key given but no HTTPS listener (--listen-tls or a socket named \"https\"): not used"
            );
        }
        None
    } else {
        let files = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        let tls = Tls::load(files, &piccolo_api::tls::self_signed_names(&https))?;
        if matches!(tls.source, CertSource::SelfSigned) {
            // Printed like the setup code, so a user can compare it with the browser's warning.
            println!(
                "piccolo-api: HTTPS uses a self-signed certificate made for this run (new at every restart); SHA-256 fingerprint {}",
                tls.fingerprint
            );
        }
        tracing::info!(source = ?tls.source, fingerprint = %tls.fingerprint, "TLS certificate loaded");
        Some(tls)
    };
    if let Some(code) = code {
        let file = args.runtime_dir.join(piccolo_api::setup::SETUP_CODE_FILE);
        let url = match https.first() {
            Some(a) => format!("https://{a}/"),
            None => addrs.first().map(|a| format!("http://{a}/")).unwrap_or_default(),
        };
        // stdout goes to the journal and the console (piccolo-api.service).
        println!("piccolo-api: first-run setup code: {code} (also in {}); open {url} to set up", file.display());
        tracing::warn!(file = %file.display(), "first-run setup pending; the setup code is on stdout and in the file");
    }
    let limits = LimitConfig {
        client_free: args.client_free_attempts,
        global_free: args.global_free_attempts,
        ..LimitConfig::default()
    };
    let cfg = AppConfig {
        secure_cookies: args.secure_cookies,
        session_ttl: Duration::from_secs(args.session_ttl_secs),
        max_json_bytes: args.max_json_bytes,
        broker_socket: args.broker_socket.clone(),
        updater_socket: args.updater_socket.clone(),
    };
    let state = AppState::new(persistence.clone(), setup, limits, cfg);
    state.set_tpm_error(startup.tpm_error);
    if startup.tpm_unlocked {
        if let Err(e) = state.sessions.load_key(&persistence.store()).await {
            tracing::error!(error = %e, "loading the token key after TPM unlock failed");
        }
        tracing::info!("unlocked with the TPM (PCR 7 unchanged)");
    }
    piccolo_api::backend::spawn_lock_events(state.clone());
    let _reconciler = persistence.spawn_reconciler(Duration::from_secs(args.reconcile_secs.max(1)));
    let _maintenance = persistence.store().spawn_maintenance(Duration::from_secs(args.maintenance_secs.max(1)));
    let (router, _doc) = piccolo_api::routes::router(state.clone());
    if args.boot_poll_secs > 0 {
        tokio::spawn(poll_boot(state.clone(), Duration::from_secs(args.boot_poll_secs)));
    }

    tokio::spawn(piccolo_api::updates::Updater::new(&args.updater_socket).watch(state.events.clone()));

    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    // While HTTPS is served, plain HTTP sends browsers there (health checks stay on HTTP).
    let http_router = match https.first() {
        Some(a) => {
            router.clone().layer(axum::middleware::from_fn_with_state(a.port(), piccolo_api::tls::redirect_browsers))
        }
        None => router.clone(),
    };
    for l in listeners {
        let stop = shutdown.clone();
        match (l.scheme, &tls) {
            (Scheme::Https, Some(tls)) => {
                servers.spawn(piccolo_api::tls::serve(l.socket, tls.clone(), router.clone(), stop));
            }
            _ => {
                let app = http_router.clone().into_make_service_with_connect_info::<SocketAddr>();
                servers.spawn(async move {
                    if let Err(e) = axum::serve(l.socket, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                        tracing::error!(error = %e, "HTTP listener failed");
                    }
                });
            }
        }
    }
    tracing::info!(listen = ?addrs, https = ?https, state_dir = %args.state_dir.display(), "piccolo-api serving");
    piccolo_api::listen::notify("READY=1\nSTATUS=serving");
    wait_for_signal().await?;
    piccolo_api::listen::notify("STOPPING=1");
    shutdown.cancel();
    // SSE streams never end by themselves: give in-flight requests 5 s, then exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while servers.join_next().await.is_some() {} }).await;
    // Leave nothing mounted behind: close the store, unmount control and app volumes.
    if let Err(e) = persistence.lock().await {
        tracing::error!(error = %ErrorChain(&e), "locking at shutdown failed");
    }
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Publishes a `boot` event whenever the broker's boot state changes (only while someone
/// listens, and only while a session can exist, i.e. unlocked).
async fn poll_boot(state: SharedState, every: Duration) {
    let mut last = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if state.events.receiver_count() == 0 || state.lock_state() != LockState::Unlocked {
            continue;
        }
        if let Ok(view) = piccolo_api::boot::fetch(&state.cfg.broker_socket).await
            && last.as_ref() != Some(&view)
        {
            last = Some(view.clone());
            state.publish(Event::Boot { boot: view });
        }
    }
}
