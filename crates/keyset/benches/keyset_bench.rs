// SPDX-License-Identifier: Apache-2.0
//! Informational benchmark (`harness = false`):
//!
//! 1. unlock time with the production Argon2id parameters ([`KdfParams::RECOMMENDED`]);
//! 2. export of a generated ciphertext-like tree (default 1 GiB, `PICCOLO_BENCH_TREE_MIB`)
//!    against `tar -cf -` of the same tree in the same run: throughput and peak RSS. Both run as
//!    child processes writing to a pipe the parent drains; each child's peak RSS is reported by
//!    GNU `time -f %M` wrapped around it;
//! 3. import of that archive into a state dir with the same key set (throughput, peak RSS).
//!
//! Run: `CARGO_TARGET_DIR=/work/target-keyset cargo bench -p piccolo-keyset --bench keyset_bench`

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use piccolo_keyset::{ExportKind, KdfParams, Keyset, Password, write_export};

const ROLE_ENV: &str = "PICCOLO_KEYSET_BENCH_ROLE";
const STATE_ENV: &str = "PICCOLO_KEYSET_BENCH_STATE";

fn main() {
    if std::env::var(ROLE_ENV).ok().as_deref() == Some("export") {
        let state = std::env::var(STATE_ENV).expect("state dir");
        let stdout = std::io::stdout();
        let mut out = BufWriter::with_capacity(256 * 1024, stdout.lock());
        write_export(Path::new(&state), ExportKind::Control, &["control"], &mut out).expect("export");
        out.flush().expect("flush");
        return;
    }
    if std::env::var(ROLE_ENV).ok().as_deref() == Some("import") {
        let state = std::env::var(STATE_ENV).expect("state dir");
        let stdin = std::io::stdin();
        piccolo_keyset::import(stdin.lock(), Path::new(&state), &piccolo_keyset::ImportLimits::default())
            .expect("import");
        return;
    }
    // `cargo bench` passes `--bench`; anything else (e.g. a filter) is ignored.
    bench_unlock();
    bench_export();
}

fn bench_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let password = || Password::new("benchmark password".into()).unwrap();
    let p = KdfParams::RECOMMENDED;
    let t0 = Instant::now();
    let created = Keyset::create(dir.path(), &password(), p).unwrap();
    let create = t0.elapsed();
    let ks = created.keyset;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        ks.unlock_with_password(&password()).unwrap();
        times.push(t.elapsed());
    }
    let mean = times.iter().sum::<Duration>() / 5;
    let min = times.iter().min().unwrap();
    println!(
        "unlock (argon2id m={} MiB t={} p={}): mean {:.0} ms, min {:.0} ms over 5; create {:.0} ms",
        p.m_cost_kib / 1024,
        p.t_cost,
        p.p_cost,
        mean.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3,
        create.as_secs_f64() * 1e3
    );
}

/// xorshift64*: fast incompressible filler (ciphertext does not compress either).
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `ciphertext/control` with 16 dirs x 16 files of `total_mib / 256` MiB each, plus a key set.
fn make_tree(root: &Path, total_mib: u64) -> u64 {
    let fast = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };
    Keyset::create(root, &Password::new("benchmark password".into()).unwrap(), fast).unwrap();
    let per_file = (total_mib << 20) / 256;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for d in 0..16 {
        let dir = root.join(format!("ciphertext/control/d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..16 {
            let mut file = BufWriter::new(fs::File::create(dir.join(format!("f{f:02}"))).unwrap());
            let mut left = per_file;
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64)).unwrap();
                fill(&mut buf[..n], &mut seed);
                file.write_all(&buf[..n]).unwrap();
                left -= n as u64;
            }
            total += per_file;
        }
    }
    fs::write(root.join("ciphertext/control/gocryptfs.conf"), b"{}").unwrap();
    total
}

struct Run {
    bytes: u64,
    wall: Duration,
    max_rss_kib: u64,
}

/// Runs `program args` under GNU time (`-f %M`) with stdout piped, drains the pipe, and reads
/// the child's peak RSS from time's report. The intermediate process matters: Linux seeds a
/// child's `ru_maxrss` with its parent's RSS at fork, so measuring a direct child of this
/// (Argon2-sized) process would report our RSS, not the child's.
fn measure(program: &Path, args: &[&std::ffi::OsStr], envs: &[(&str, &Path)]) -> Run {
    measure_with_stdin(program, args, envs, Stdio::null())
}

fn measure_with_stdin(program: &Path, args: &[&std::ffi::OsStr], envs: &[(&str, &Path)], stdin: Stdio) -> Run {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"]).arg(report.path()).arg(program).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("/usr/bin/time (package `time`)");
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    let status = child.wait().unwrap();
    let wall = start.elapsed();
    assert!(status.success(), "{program:?} failed: {status}");
    let text = fs::read_to_string(report.path()).unwrap();
    let max_rss_kib = text.trim().lines().last().and_then(|l| l.trim().parse().ok()).expect("time -f %M output");
    Run { bytes, wall, max_rss_kib }
}

fn bench_export() {
    let mib: u64 = std::env::var("PICCOLO_BENCH_TREE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir_in(std::env::var("PICCOLO_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let state = dir.path();
    let t = Instant::now();
    let content = make_tree(state, mib);
    println!(
        "tree: {} MiB of file content in 256 files, generated in {:.1} s",
        content >> 20,
        t.elapsed().as_secs_f64()
    );

    let tar_bin = Path::new("tar");
    let tar_args: Vec<&std::ffi::OsStr> =
        vec!["-cf".as_ref(), "-".as_ref(), "-C".as_ref(), state.as_os_str(), "ciphertext/control".as_ref()];
    let exe = std::env::current_exe().unwrap();
    let tar = || measure(tar_bin, &tar_args, &[]);
    let export = || measure(&exe, &[], &[(ROLE_ENV, Path::new("export")), (STATE_ENV, state)]);
    // Warm the page cache once so neither side pays for cold reads.
    tar();
    let mut best_tar: Option<Run> = None;
    let mut best_exp: Option<Run> = None;
    for _ in 0..2 {
        for (which, run) in [(0, tar()), (1, export())] {
            let slot = if which == 0 { &mut best_tar } else { &mut best_exp };
            if slot.as_ref().is_none_or(|b| run.wall < b.wall) {
                *slot = Some(run);
            }
        }
    }
    let (t, e) = (best_tar.unwrap(), best_exp.unwrap());
    let mibps = |r: &Run| (r.bytes as f64 / (1u64 << 20) as f64) / r.wall.as_secs_f64();
    println!(
        "tar -cf -      : {:>6} MiB in {:>6.2} s = {:>7.1} MiB/s, peak RSS {:>7} KiB",
        t.bytes >> 20,
        t.wall.as_secs_f64(),
        mibps(&t),
        t.max_rss_kib
    );
    println!(
        "piccolo export : {:>6} MiB in {:>6.2} s = {:>7.1} MiB/s, peak RSS {:>7} KiB (hash pass + stream pass)",
        e.bytes >> 20,
        e.wall.as_secs_f64(),
        mibps(&e),
        e.max_rss_kib
    );
    println!(
        "ratio export/tar: time x{:.2}, throughput x{:.2}, peak RSS x{:.2}",
        e.wall.as_secs_f64() / t.wall.as_secs_f64(),
        mibps(&e) / mibps(&t),
        e.max_rss_kib as f64 / t.max_rss_kib as f64
    );

    // Import of the same archive (from a file on stdin) into a state dir holding the same key set.
    let archive = dir.path().join("bench-export.pcv");
    let mut f = BufWriter::new(fs::File::create(&archive).unwrap());
    write_export(state, ExportKind::Control, &["control"], &mut f).unwrap();
    f.into_inner().unwrap().sync_all().unwrap();
    let target = tempfile::tempdir_in(dir.path()).unwrap();
    fs::create_dir_all(target.path().join("crypto")).unwrap();
    fs::copy(state.join("crypto/keyset.json"), target.path().join("crypto/keyset.json")).unwrap();
    let stdin = Stdio::from(fs::File::open(&archive).unwrap());
    let envs = [(ROLE_ENV, Path::new("import")), (STATE_ENV, target.path())];
    let i = measure_with_stdin(&exe, &[], &envs, stdin);
    let mib = fs::metadata(&archive).unwrap().len() as f64 / (1u64 << 20) as f64;
    println!(
        "piccolo import : {:>6.0} MiB in {:>6.2} s = {:>7.1} MiB/s, peak RSS {:>7} KiB (validate, stage, fsync, swap)",
        mib,
        i.wall.as_secs_f64(),
        mib / i.wall.as_secs_f64(),
        i.max_rss_kib
    );
}
