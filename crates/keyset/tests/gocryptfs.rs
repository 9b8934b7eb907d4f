// SPDX-License-Identifier: Apache-2.0
//! A real gocryptfs volume (FUSE) survives export -> import into a fresh state dir: the
//! imported ciphertext mounts with gocryptfs and shows the same plaintext, symlinks included.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{FAST, pw};
use piccolo_keyset::{ExportKind, ImportLimits, Keyset, import, write_export};

/// Unmounts on drop so a failed assertion leaves no FUSE mount behind.
struct FuseMount(PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
    }
}

fn gocryptfs(args: &[&str], extra: &[&Path]) {
    // gocryptfs daemonises and the daemon inherits stdio: with pipes, waiting for output would
    // hang until unmount. Send stderr to a file instead.
    let log = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("gocryptfs")
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .status()
        .expect("gocryptfs is installed");
    assert!(status.success(), "gocryptfs {args:?}: {}", fs::read_to_string(log.path()).unwrap_or_default());
}

fn mount(cipher: &Path, plain: &Path, passfile: &Path) -> FuseMount {
    fs::create_dir_all(plain).unwrap();
    gocryptfs(&["-q", "-nosyslog", "-passfile"], &[passfile, cipher, plain]);
    FuseMount(plain.to_path_buf())
}

#[test]
fn gocryptfs_volume_round_trips_through_export_and_import() {
    let work = tempfile::tempdir().unwrap();
    let passfile = work.path().join("volume-pass");
    fs::write(&passfile, "volume password for the test\n").unwrap();

    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    Keyset::create(&src, &pw("admin password 1"), FAST).unwrap();
    let cipher = src.join("ciphertext/control");
    fs::create_dir_all(&cipher).unwrap();
    gocryptfs(&["-init", "-q", "-nosyslog", "-scryptn", "10", "-passfile"], &[&passfile, &cipher]);
    let long_name = "n".repeat(200);
    let big: Vec<u8> = (0..200_000u32).map(|i| u8::try_from(i * 7 % 256).unwrap()).collect();
    {
        let plain = src.join("mounts/control");
        let _m = mount(&cipher, &plain, &passfile);
        fs::write(plain.join("a.txt"), b"hello from the control volume").unwrap();
        fs::create_dir_all(plain.join("apps/demo")).unwrap();
        fs::write(plain.join("apps/demo/big.bin"), &big).unwrap();
        fs::write(plain.join(&long_name), b"long").unwrap();
        std::os::unix::fs::symlink("../apps/demo/big.bin", plain.join("enabled-demo")).unwrap();
    }
    let has_longname = fs::read_dir(&cipher)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("gocryptfs.longname."));
    assert!(has_longname, "the fixture exercises gocryptfs long names");

    let mut archive = Vec::new();
    let summary = write_export(&src, ExportKind::Full, &["control"], &mut archive).unwrap();
    assert_eq!(summary.symlinks, 1, "the plaintext symlink is a ciphertext symlink");

    let dst = work.path().join("dst");
    fs::create_dir_all(&dst).unwrap();
    import(&archive[..], &dst, &ImportLimits::default()).unwrap();
    Keyset::read(&dst).unwrap().unlock_with_password(&pw("admin password 1")).unwrap();

    let plain = dst.join("mounts/control");
    let _m = mount(&dst.join("ciphertext/control"), &plain, &passfile);
    assert_eq!(fs::read(plain.join("a.txt")).unwrap(), b"hello from the control volume");
    assert_eq!(fs::read(plain.join("apps/demo/big.bin")).unwrap(), big);
    assert_eq!(fs::read(plain.join(&long_name)).unwrap(), b"long");
    assert_eq!(fs::read_link(plain.join("enabled-demo")).unwrap(), Path::new("../apps/demo/big.bin"));
}
