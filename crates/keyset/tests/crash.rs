// SPDX-License-Identifier: Apache-2.0
//! Crash tests (own `main`, `harness = false`): the writer runs in a child process (this same
//! executable, role chosen by an environment variable), stops at a crash point and is killed
//! with SIGKILL there. Checked for every step of a durable key-set write (password change and
//! recovery-key rotation) and every step of an import swap.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{FAST, make_state, pw, snapshot};
use piccolo_keyset::hooks::{CRASH_AT_ENV, CRASH_BANNER, CrashPoint};
use piccolo_keyset::{Error, ExportKind, ImportLimits, Keyset, RecoveryKey, import, recover_interrupted_import};

const ROLE_ENV: &str = "PICCOLO_KEYSET_TEST_ROLE";
const STATE_ENV: &str = "PICCOLO_KEYSET_TEST_STATE";
const ARCHIVE_ENV: &str = "PICCOLO_KEYSET_TEST_ARCHIVE";
const OLD_PW: &str = "old password 1";
const NEW_PW: &str = "new password 2";

fn main() {
    match std::env::var(ROLE_ENV).ok().as_deref() {
        None => {}
        Some(role) => return child(role),
    }
    let mut checked = 0;
    for step in CrashPoint::WRITE_STEPS {
        crash_password_change(*step);
        crash_recovery_rotation(*step);
        checked += 2;
    }
    for step in CrashPoint::IMPORT_STEPS {
        crash_import(*step);
        checked += 1;
    }
    println!("crash: {checked} kill -9 scenarios passed");
}

/// The child roles: do one write and get killed at the crash point on the way.
fn child(role: &str) {
    let state = PathBuf::from(std::env::var(STATE_ENV).unwrap());
    match role {
        "change-password" => {
            let mut ks = Keyset::read(&state).unwrap();
            let sdek = ks.unlock_with_password(&pw(OLD_PW)).unwrap();
            ks.change_password(&sdek, &pw(NEW_PW)).unwrap();
        }
        "rotate-recovery" => {
            let mut ks = Keyset::read(&state).unwrap();
            let sdek = ks.unlock_with_password(&pw(OLD_PW)).unwrap();
            let pending = ks.prepare_recovery_key_rotation(&sdek).unwrap();
            // Shown to the admin before the commit, as an interactive flow would.
            println!("NEW-RECOVERY-KEY {}", pending.recovery_key().expose_secret());
            ks.commit_recovery_key_rotation(pending).unwrap();
        }
        "import" => {
            let archive = std::fs::read(std::env::var(ARCHIVE_ENV).unwrap()).unwrap();
            import(&archive[..], &state, &ImportLimits::default()).unwrap();
        }
        other => panic!("unknown role {other}"),
    }
    panic!("{role}: finished without reaching the crash point");
}

/// Runs a child role with the crash point set, waits until it reports the point, kills it
/// with SIGKILL. Returns what the child printed on stdout.
fn run_and_kill(role: &str, state: &Path, step: CrashPoint, archive: Option<&Path>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE_ENV, role).env(STATE_ENV, state).env(CRASH_AT_ENV, step.name());
    if let Some(a) = archive {
        cmd.env(ARCHIVE_ENV, a);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let want = format!("{CRASH_BANNER} {}", step.name());
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line == want => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("{role}: child never reached {}: {seen:?}", step.name());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{role} at {}: {status:?}", step.name());
    stdout
}

fn renamed(step: CrashPoint) -> bool {
    matches!(step, CrashPoint::AfterRename | CrashPoint::AfterDirFsync)
}

fn crash_password_change(step: CrashPoint) {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw(OLD_PW), FAST).unwrap();
    run_and_kill("change-password", dir.path(), step, None);

    // The key set is never torn: it parses, and exactly one of the passwords opens it.
    let ks = Keyset::read(dir.path()).unwrap_or_else(|e| panic!("{}: key set unreadable: {e}", step.name()));
    let old = ks.unlock_with_password(&pw(OLD_PW));
    let new = ks.unlock_with_password(&pw(NEW_PW));
    assert!(old.is_ok() || new.is_ok(), "{}: neither password works", step.name());
    assert_eq!(new.is_ok(), renamed(step), "{}: new password state", step.name());
    assert_eq!(old.is_ok(), !renamed(step), "{}: old password state", step.name());
    let sdek = old.or(new).unwrap();
    assert_eq!(sdek.expose_secret(), created.sdek.expose_secret());
    let rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert!(ks.unlock_with_recovery_key(&rk).is_ok(), "{}: recovery wrap touched", step.name());

    // The next write succeeds and sweeps the torn temp file.
    let mut ks = ks;
    ks.change_password(&sdek, &pw("third password")).unwrap();
    let litter: Vec<_> = std::fs::read_dir(dir.path().join("crypto"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "keyset.json")
        .collect();
    assert!(litter.is_empty(), "{}: left {litter:?}", step.name());
    println!("crash: password change killed at {:<18} ok", step.name());
}

fn crash_recovery_rotation(step: CrashPoint) {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw(OLD_PW), FAST).unwrap();
    let out = run_and_kill("rotate-recovery", dir.path(), step, None);
    let new_text = out.lines().find_map(|l| l.strip_prefix("NEW-RECOVERY-KEY ")).expect("child showed the new key");

    let ks = Keyset::read(dir.path()).unwrap_or_else(|e| panic!("{}: key set unreadable: {e}", step.name()));
    let old = ks.unlock_with_recovery_key(&RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap());
    let new = ks.unlock_with_recovery_key(&RecoveryKey::parse(new_text).unwrap());
    assert!(old.is_ok() || new.is_ok(), "{}: neither recovery key works", step.name());
    assert_eq!(new.is_ok(), renamed(step), "{}", step.name());
    if let Err(e) = &old {
        assert!(matches!(e, Error::WrongRecoveryKey), "{e}");
    }
    assert!(ks.unlock_with_password(&pw(OLD_PW)).is_ok(), "{}: password wrap touched", step.name());
    println!("crash: recovery rotation killed at {:<15} ok", step.name());
}

fn crash_import(step: CrashPoint) {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    let reference = work.path().join("reference");
    for d in [&src, &dst, &reference] {
        std::fs::create_dir_all(d).unwrap();
    }
    make_state(&src, 21);
    make_state(&dst, 22);
    make_state(&reference, 22);
    let archive_path = work.path().join("full.pcv");
    let mut archive = Vec::new();
    piccolo_keyset::write_export(&src, ExportKind::Full, &["control", "bootstrap"], &mut archive).unwrap();
    std::fs::write(&archive_path, &archive).unwrap();

    // What a completed import looks like (the reference got the same fixture as dst).
    import(&archive[..], &reference, &ImportLimits::default()).unwrap();
    let completed = snapshot(&reference);
    let untouched = snapshot(&dst);

    run_and_kill("import", &dst, step, Some(&archive_path));
    let handled = recover_interrupted_import(&dst).unwrap();
    assert_eq!(handled, 1, "{}: one staging dir to recover", step.name());
    let after = snapshot(&dst);
    if step == CrashPoint::ImportBeforeJournal {
        assert_eq!(after, untouched, "{}: uncommitted import must vanish", step.name());
    } else {
        assert_eq!(after, completed, "{}: committed import must complete", step.name());
        let ks = Keyset::read(&dst).unwrap();
        ks.unlock_with_password(&pw(common::PASSWORD)).unwrap();
    }
    println!("crash: import killed at {:<25} ok", step.name());
}
