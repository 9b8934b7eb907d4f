// SPDX-License-Identifier: Apache-2.0
//! Writer and verifier against real files: chain, tampering, rotation, torn tails.

use std::path::{Path, PathBuf};

use piccolo_audit::*;

fn entry(i: u64) -> Entry {
    Entry {
        kind: Kind::Call,
        rpc: "GetInfo".into(),
        caller: Some(Caller { uid: 1000, gid: 1000, pid: Some(42), user: Some("u".into()), exe: None, unit: None }),
        args: serde_json::json!({ "i": i }),
        decision: Some(Decision::Allow),
        outcome: Some(Outcome::ok()),
        duration_us: Some(5),
        intent_seq: None,
    }
}

fn cfg(dir: &Path, max_bytes: u64, keep: u32) -> AuditConfig {
    AuditConfig { path: dir.join("audit.jsonl"), max_bytes, keep, group: None, preallocate: true }
}

/// An open log with `n` records appended.
fn open_with(c: &AuditConfig, n: u64) -> AuditLog {
    let log = AuditLog::open(c.clone()).unwrap();
    for i in 0..n {
        log.append_blocking(entry(i)).unwrap();
    }
    log
}

fn write_n(c: &AuditConfig, n: u64) {
    open_with(c, n).close();
}

fn verify(path: &Path) -> Result<VerifySummary, VerifyError> {
    verify_files(&chain_files(path), &read_chain_state(path).unwrap())
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect()
}

fn put(p: &Path, lines: &[String]) {
    std::fs::write(p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn chain_verifies_and_continues_across_reopen() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    write_n(&c, 10);
    write_n(&c, 5);
    let s = verify(&c.path).unwrap();
    assert_eq!((s.records, s.first_seq, s.last_seq), (15, Some(0), Some(14)));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&c.path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
}

fn tampered(edit: impl Fn(&mut Vec<String>)) -> VerifyError {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    write_n(&c, 8);
    let mut l = lines(&c.path);
    edit(&mut l);
    put(&c.path, &l);
    verify(&c.path).unwrap_err()
}

#[test]
fn edited_byte_is_detected() {
    let e = tampered(|l| l[3] = l[3].replace("\"i\":3", "\"i\":4"));
    assert_eq!(e.line, 4);
    assert!(e.reason.contains("hash mismatch"), "{e}");
}

#[test]
fn deleted_line_is_detected() {
    let e = tampered(|l| {
        l.remove(2);
    });
    assert_eq!(e.line, 3);
    assert!(e.reason.contains("sequence jumps from 1 to 3"), "{e}");
}

#[test]
fn reordered_lines_are_detected() {
    let e = tampered(|l| l.swap(4, 5));
    assert_eq!(e.line, 5);
    assert!(e.reason.contains("sequence jumps"), "{e}");
}

#[test]
fn truncated_chain_is_detected() {
    // Records cut off the end after the writer checkpointed its head.
    let e = tampered(|l| l.truncate(5));
    assert!(e.reason.contains("chain truncated"), "{e}");
    // Records cut off the start.
    let e = tampered(|l| {
        l.drain(..2);
    });
    assert!(e.reason.contains("truncated at the start"), "{e}");
    // A half-written last line.
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    write_n(&c, 3);
    let mut bytes = std::fs::read(&c.path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&c.path, &bytes).unwrap();
    assert!(verify(&c.path).unwrap_err().reason.contains("truncated"));
}

#[test]
fn torn_tail_is_cut_and_recorded_on_open() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    write_n(&c, 3);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&c.path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"seq\":3,\"ts\""))
        .unwrap();
    write_n(&c, 1);
    verify(&c.path).unwrap();
    let recs: Vec<Record> = read_records(&chain_files(&c.path)).map(Result::unwrap).collect();
    assert_eq!(recs[3].entry.rpc, "audit.torn_tail_removed");
    assert_eq!(recs[3].entry.args["bytes"], 13);
    assert_eq!(recs.len(), 5);
}

#[test]
fn rotation_keeps_the_chain_and_the_anchor() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 2_000, 2);
    write_n(&c, 60);
    let files = chain_files(&c.path);
    assert_eq!(files.len(), 3, "{files:?}");
    let state = read_chain_state(&c.path).unwrap();
    assert!(state.anchor.is_some(), "oldest file was deleted, so an anchor must exist");
    let s = verify(&c.path).unwrap();
    assert_eq!(s.last_seq, Some(59));
    // The first record of each newer file links to the last record of the file before it.
    let last_of = |p: &PathBuf| serde_json::from_str::<Record>(lines(p).last().unwrap()).unwrap();
    let first_of = |p: &PathBuf| serde_json::from_str::<Record>(&lines(p)[0]).unwrap();
    let nonempty: Vec<&PathBuf> = files.iter().filter(|f| !lines(f).is_empty()).collect();
    assert!(nonempty.len() >= 2);
    for pair in nonempty.windows(2) {
        assert_eq!(first_of(pair[1]).prev, last_of(pair[0]).hash);
    }
    // Without the anchor the oldest kept file does not verify on its own.
    assert!(verify_files(&files, &ChainState::default()).is_err());
}

#[test]
fn concurrent_appends_get_unique_consecutive_seqs() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    let log = std::sync::Arc::new(AuditLog::open(c.clone()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let mut seqs: Vec<u64> = rt.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(entry(i)).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    seqs.sort_unstable();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    log.close();
    assert_eq!(verify(&c.path).unwrap().records, 200);
}

#[test]
fn open_fails_when_the_log_cannot_be_opened() {
    let d = tempfile::tempdir().unwrap();
    let c = AuditConfig { path: d.path().join("missing-dir/audit.jsonl"), ..cfg(d.path(), 1 << 20, 1) };
    assert!(matches!(AuditLog::open(c), Err(AuditError::Open { .. })));
}

#[test]
fn inline_and_queued_appends_share_one_chain() {
    let d = tempfile::tempdir().unwrap();
    // Small files, so rotation also happens under inline commits.
    let c = cfg(d.path(), 4_000, 50);
    let log = std::sync::Arc::new(AuditLog::open(c.clone()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let mut seqs: Vec<u64> = rt.block_on(async {
        // 30 callers with 10 records each, alternating paths: many commits, some inline.
        let tasks: Vec<_> = (0..30)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in t * 10..t * 10 + 10 {
                        let r = if i % 2 == 0 { log.append_inline(entry(i)).await } else { log.append(entry(i)).await };
                        seqs.push(r.unwrap());
                    }
                    seqs
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.extend(t.await.unwrap());
        }
        out
    });
    seqs.sort_unstable();
    assert_eq!(seqs, (0..300).collect::<Vec<_>>());
    assert_eq!(log.last_seq(), 299);
    log.close();
    assert!(chain_files(&c.path).len() > 2, "rotation happened: {:?}", chain_files(&c.path));
    assert_eq!(verify(&c.path).unwrap().last_seq, Some(299));
    // Every record is on disk once: the inline ones did not bypass the chain.
    let n: usize = chain_files(&c.path).iter().map(|f| lines(f).len()).sum();
    assert_eq!(n, 300);
}

/// The live file with preallocation: records, then zeros; readers stop at the zeros while the
/// writer runs, and a closed log is plain JSON Lines again.
#[test]
fn preallocated_tail_is_invisible_to_readers_and_trimmed_on_close() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    let log = open_with(&c, 20);
    let bytes = std::fs::read(&c.path).unwrap();
    let end = bytes.iter().position(|b| *b == 0).expect("zeros ahead of the records");
    assert!(bytes.len() as u64 >= PREALLOCATE, "file is {} bytes", bytes.len());
    assert!(bytes[end..].iter().all(|b| *b == 0));
    assert_eq!(bytes[end - 1], b'\n');
    assert_eq!(read_records(&chain_files(&c.path)).filter(Result::is_ok).count(), 20);
    assert_eq!(verify(&c.path).unwrap().records, 20);
    log.close();
    let bytes = std::fs::read(&c.path).unwrap();
    assert_eq!(bytes.len(), end, "close trims the zeros");
    assert!(!bytes.contains(&0));

    // Without preallocation the file is only ever records.
    let d = tempfile::tempdir().unwrap();
    let plain = AuditConfig { preallocate: false, ..cfg(d.path(), 1 << 30, 3) };
    let log = AuditLog::open(plain.clone()).unwrap();
    log.append_blocking(entry(0)).unwrap();
    assert!(!std::fs::read(&plain.path).unwrap().contains(&0));
    assert_eq!(lines(&plain.path).len(), 1);
}

/// A broker that died with zeros ahead (and a batch torn into them) restarts cleanly: the
/// fragment is reported like any torn tail, the zeros are cut, the chain continues.
#[test]
fn crash_with_a_preallocated_tail_recovers_on_open() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    let log = open_with(&c, 5);
    // The file as a crash would leave it: copied while the writer holds its zero tail.
    let crashed = d.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    let c2 = cfg(&crashed, 1 << 30, 3);
    std::fs::copy(&c.path, &c2.path).unwrap();
    log.close();
    let bytes = std::fs::read(&c2.path).unwrap();
    let end = bytes.iter().position(|b| *b == 0).unwrap() as u64;
    // A batch whose second page reached the disk and whose first did not.
    let f = std::fs::OpenOptions::new().write(true).open(&c2.path).unwrap();
    f.write_all_at(b"{\"seq\":6,\"half", end + 5000).unwrap();
    drop(f);

    write_n(&c2, 2);
    let text = std::fs::read_to_string(&c2.path).unwrap();
    assert!(!text.contains('\0'));
    let recs: Vec<Record> = read_records(&chain_files(&c2.path)).map(Result::unwrap).collect();
    assert_eq!(recs.len(), 8, "5 + the torn-tail event + 2");
    assert_eq!(recs[5].entry.rpc, "audit.torn_tail_removed");
    // From the end of the records through the fragment; the zeros after it are not counted.
    assert_eq!(recs[5].entry.args["bytes"], 5014);
    assert_eq!(verify(&c2.path).unwrap().records, 8);

    // A clean zero tail alone is not a torn tail.
    let d = tempfile::tempdir().unwrap();
    let c3 = cfg(d.path(), 1 << 30, 3);
    let log = AuditLog::open(c3.clone()).unwrap();
    log.append_blocking(entry(0)).unwrap();
    let snapshot = std::fs::read(&c3.path).unwrap();
    log.close();
    std::fs::write(&c3.path, &snapshot).unwrap();
    write_n(&c3, 1);
    let recs: Vec<Record> = read_records(&chain_files(&c3.path)).map(Result::unwrap).collect();
    assert_eq!(recs.iter().map(|r| r.entry.rpc.as_str()).collect::<Vec<_>>(), ["GetInfo", "GetInfo"]);
}

/// Zeros followed by data that is not zero is damage, and the verifier says where.
#[test]
fn bytes_after_the_zero_tail_are_detected() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1 << 30, 3);
    write_n(&c, 3);
    let len = std::fs::metadata(&c.path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&c.path).unwrap();
    f.write_all_at(&[0u8; 100], len).unwrap();
    f.write_all_at(b"x", len + 100).unwrap();
    drop(f);
    let e = verify(&c.path).unwrap_err();
    assert!(e.reason.contains(&format!("byte {} is not zero", len + 100)), "{e}");
    assert!(read_records(&chain_files(&c.path)).any(|r| r.is_err()));
}

/// Rotation leaves records only in the rotated file, and preallocation never runs past the
/// rotation size.
#[test]
fn rotated_files_hold_no_zeros() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 4096, 3);
    let log = AuditLog::open(c.clone()).unwrap();
    for i in 0..30 {
        log.append_blocking(entry(i)).unwrap();
        let len = std::fs::metadata(&c.path).unwrap().len();
        assert!(len < 4096 + 1024, "live file {len} bytes");
    }
    for f in chain_files(&c.path).iter().filter(|f| **f != c.path) {
        assert!(!std::fs::read(f).unwrap().contains(&0), "{} has zeros", f.display());
    }
    assert_eq!(verify(&c.path).unwrap().records, 30);
    log.close();
}

/// Unmounts a test filesystem when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A disk with no room for the zeros still takes records (appended), and once it is full a
/// failed commit leaves nothing behind: the file holds exactly the acknowledged records.
/// Needs root for the small tmpfs (the test suite runs as root).
#[test]
fn a_disk_too_small_for_the_zeros_still_takes_records_until_it_is_full() {
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    nix::mount::mount(Some("tmpfs"), &small, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=256k"))
        .expect("mount a 256 KiB tmpfs (run the tests as root)");
    let _unmount = Unmount(small.clone());
    let c = cfg(&small, 1 << 30, 3);
    let log = open_with(&c, 20);
    assert!(!std::fs::read(&c.path).unwrap().contains(&0), "no zeros fit: records appended");
    let mut acknowledged = 20;
    let failure = loop {
        match log.append_blocking(entry(acknowledged)) {
            Ok(_) => acknowledged += 1,
            Err(e) => break e,
        }
        assert!(acknowledged < 100_000, "a 256 KiB filesystem never filled up");
    };
    assert!(acknowledged > 200, "only {acknowledged} records fitted");
    assert!(matches!(failure, AuditError::Append { .. }), "{failure:?}");
    log.close();
    assert_eq!(read_records(&chain_files(&c.path)).filter(Result::is_ok).count() as u64, acknowledged);
    assert!(read_records(&chain_files(&c.path)).all(|r| r.is_ok()));
}
