// SPDX-License-Identifier: Apache-2.0
//! Disk images made with real `sgdisk`/`cgpt`, and loop devices detached on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flatcar's `/usr` partition type.
pub const USR_TYPE: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
/// Partition numbers as on Flatcar: EFI-SYSTEM 1, USR-A 3, USR-B 4, ROOT 9.
pub const USR_A: u32 = 3;
/// See [`USR_A`].
pub const USR_B: u32 = 4;

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse OS image of `total_mib`: EFI-SYSTEM (`efi_mib`), USR-A and USR-B (`usr_mib`
/// each), ROOT (the rest). USR-A is the booted, good slot (P1 T0 S1); USR-B is P0 T0 S0.
/// Takes about a second (sgdisk waits after writing).
pub fn os_image(dir: &Path, name: &str, total_mib: u64, efi_mib: u64, usr_mib: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).and_then(|f| f.set_len(total_mib << 20)).expect("create image");
    run(Command::new("sgdisk")
        .args(["-o", "-n", &format!("1:2048:+{efi_mib}M"), "-t", "1:ef00", "-c", "1:EFI-SYSTEM"])
        .args(["-n", &format!("3:0:+{usr_mib}M"), "-t", &format!("3:{USR_TYPE}"), "-c", "3:USR-A"])
        .args(["-n", &format!("4:0:+{usr_mib}M"), "-t", &format!("4:{USR_TYPE}"), "-c", "4:USR-B"])
        .args(["-n", "9:0:0", "-t", "9:8300", "-c", "9:ROOT"])
        .arg(&p));
    cgpt_set(&p, USR_A, 1, 0, true);
    p
}

/// `cgpt add -i N -P p -T t -S s`.
pub fn cgpt_set(img: &Path, n: u32, p: u8, t: u8, s: bool) {
    run(Command::new("cgpt")
        .args(["add", "-i", &n.to_string(), "-P", &p.to_string(), "-T", &t.to_string()])
        .args(["-S", if s { "1" } else { "0" }])
        .arg(img));
}

fn cgpt_field(img: &Path, n: u32, flag: &str) -> u64 {
    let out = run(Command::new("cgpt").args(["show", "-i", &n.to_string(), flag]).arg(img));
    let t = out.trim();
    match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex"),
        None => t.parse().unwrap_or_else(|_| panic!("cgpt {flag}: {t:?}")),
    }
}

/// (priority, tries, successful) from real `cgpt show -i N -P/-T/-S`.
pub fn cgpt_show(img: &Path, n: u32) -> (u8, u8, bool) {
    let nibble = |v: u64| u8::try_from(v).unwrap_or_else(|_| panic!("cgpt printed {v} for a 4-bit field"));
    (nibble(cgpt_field(img, n, "-P")), nibble(cgpt_field(img, n, "-T")), cgpt_field(img, n, "-S") == 1)
}

/// `cgpt show -i N -A` (attributes >> 48).
pub fn cgpt_attrs(img: &Path, n: u32) -> u64 {
    cgpt_field(img, n, "-A")
}

/// Real `sgdisk -v` finds no problems.
pub fn sgdisk_ok(img: &Path) {
    let out = run(Command::new("sgdisk").arg("-v").arg(img));
    assert!(out.contains("No problems found"), "sgdisk -v {}:\n{out}", img.display());
}

/// Bytes `[off, off + len)` of a file or device.
pub fn bytes_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path).and_then(|f| f.read_exact_at(&mut b, off)).expect("read");
    b
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDev {
    /// `losetup -f --show file`, checking the device is backed by this file (parallel tests
    /// attach loop devices too).
    pub fn attach(file: &Path) -> LoopDev {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(file));
        let lo = LoopDev { dev: PathBuf::from(out.trim()) };
        let backing = std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", lo.name())).expect("sysfs");
        assert_eq!(Path::new(backing.trim()), file.canonicalize().expect("canonical"), "loop device not ours");
        lo
    }

    /// Kernel name (`loop3`).
    pub fn name(&self) -> String {
        self.dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
