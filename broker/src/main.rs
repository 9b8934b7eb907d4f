// SPDX-License-Identifier: Apache-2.0
//! `piccolo-broker` entry point: the start-up order is the security argument, so it is
//! all in [`run`], one step after another.

use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use piccolo_audit::{AuditConfig, AuditLog, Entry};
use piccolo_broker::config::{Args, Command, Config, USAGE};
use piccolo_broker::guard::Ctx;
use piccolo_broker::{backends, caps, reload, server};
use tracing_subscriber::filter::LevelFilter;

fn main() -> ExitCode {
    // A plain level from RUST_LOG (`error` … `trace`, `off`; default `info`), not an
    // EnvFilter: its directive parser pulls regex into the broker's resident text.
    let rust_log = std::env::var("RUST_LOG").ok();
    let level = rust_log.as_deref().map(|v| v.trim().parse::<LevelFilter>().ok());
    tracing_subscriber::fmt()
        .with_max_level(level.flatten().unwrap_or(LevelFilter::INFO))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if level == Some(None) {
        tracing::warn!(
            rust_log = rust_log.as_deref().unwrap_or_default(),
            "RUST_LOG is not a plain level; logging at info"
        );
    }
    let args = match Args::parse_from(std::env::args_os().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("piccolo-broker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("piccolo-broker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(file) = &args.check_policy {
        return check_policy(file);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let mut source = e.source();
            while let Some(s) = source {
                tracing::error!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn check_policy(file: &std::path::Path) -> ExitCode {
    match reload::load_policy(file) {
        Ok(p) => {
            println!("{}: ok (sha256 {})\n", file.display(), p.sha256());
            print!("{}", p.render_table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn group_id(name: &Option<String>) -> Result<Option<u32>, Box<dyn std::error::Error>> {
    match name {
        None => Ok(None),
        Some(n) => match nix::unistd::Group::from_name(n)? {
            Some(g) => Ok(Some(g.gid.as_raw())),
            None => Err(format!("group {n:?} does not exist").into()),
        },
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(&args)?;

    // 1. Capabilities first: everything after runs with only what KEEP lists.
    if nix::unistd::geteuid().is_root() {
        caps::drop_to_kept()?;
    } else {
        tracing::warn!("not running as root: privileged verbs will fail (development mode)");
    }
    // 2. 1,000+ idle clients must not exhaust descriptors: raise the soft limit to the hard one.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    // 3. Policy and audit log before the socket exists: no call can arrive unguarded.
    let policy = reload::load_policy(&config.policy)?;
    let audit = AuditLog::open(AuditConfig {
        path: config.audit_log.clone(),
        max_bytes: config.audit_max_bytes,
        keep: config.audit_keep,
        preallocate: config.audit_preallocate,
        group: group_id(&config.audit_group)?,
    })
    .map_err(|e| format!("refusing to start without an audit log: {e}"))?;
    audit.append_blocking(Entry::event(
        "broker.start",
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "policy_sha256": policy.sha256(),
            "pid": std::process::id(),
        }),
    ))?;
    // An import a crash interrupted is finished (journal written) or discarded before any
    // call can see the state dir; a failure is recorded, not fatal (the other verbs still work).
    match piccolo_broker::handlers::archive::recover_at_start(&config.file.volumes.state_dir) {
        Ok(0) => {}
        Ok(n) => {
            audit.append_blocking(Entry::event("archive.recovered", serde_json::json!({ "staging_dirs": n })))?;
        }
        Err(e) => {
            tracing::error!(error = %e, "recovering an interrupted import failed");
            audit.append_blocking(Entry::event("archive.recovery_failed", serde_json::json!({ "error": e })))?;
        }
    }
    let socket_gid = group_id(&config.socket_group)?;
    let ctx = Arc::new(Ctx {
        policy: RwLock::new(Arc::new(policy)),
        policy_path: config.policy.clone(),
        audit,
        started: Instant::now(),
        config,
        stopping: tokio::sync::Notify::new(),
        backends: Default::default(),
        in_flight: Default::default(),
        last_overlap_us: Default::default(),
    });

    // 4. One async thread: the broker's work is I/O; slow backend calls (TPM, disks) go to
    //    the blocking pool, audit commits to the writer thread unless a call is alone
    //    (guard::Ctx::write_audit). Fewer threads means fewer cross-CPU wake-ups per call.
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(16)
        .thread_name("broker")
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        // 5. Socket with its final owner and mode, then serve (which signals READY).
        let listener = server::bind_socket(&ctx.config.socket, socket_gid).await?;
        // Backend availability for GetInfo, probed in the background from here on.
        backends::spawn(&ctx);
        server::serve(ctx.clone(), listener).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    // 6. Drained: record the stop, flush the audit log, remove the socket.
    let _ = std::fs::remove_file(&ctx.config.socket);
    let stop = ctx.audit.append_blocking(Entry::event("broker.stop", serde_json::json!({"clean": result.is_ok()})));
    ctx.audit.close();
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    stop?;
    Ok(())
}
