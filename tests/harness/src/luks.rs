// SPDX-License-Identifier: Apache-2.0
//! LUKS2 volumes on loop devices for TPM enrollment tests, and the two ways of proving a
//! TPM2 keyslot opens: systemd-cryptsetup itself, and re-doing its unseal with tpm2-tools.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::disks::{LoopDev, run};
use crate::swtpm::Swtpm;

/// A 32 MiB LUKS2 image file attached to a loop device; detached and removed on drop.
pub struct Luks2 {
    /// The loop device (drop it before `dir`).
    pub lo: LoopDev,
    /// Holds the image and key files.
    pub dir: tempfile::TempDir,
    /// The image file.
    pub img: PathBuf,
}

impl Luks2 {
    /// Formats a LUKS2 volume whose keyslot 0 opens with `key` (fast PBKDF2 for tests).
    pub fn create(key: &[u8]) -> Luks2 {
        let dir = tempfile::Builder::new().prefix("piccolo-luks-").tempdir().expect("tempdir");
        let img = dir.path().join("luks.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(32 << 20)).expect("image");
        let kf = dir.path().join("key0");
        std::fs::write(&kf, key).expect("key file");
        run(Command::new("cryptsetup")
            .args(["luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(&kf)
            .arg(&img));
        let lo = LoopDev::attach(&img);
        Luks2 { lo, dir, img }
    }

    /// The loop device's name (`loopN`), as the broker's `partitions` constraint sees it.
    pub fn name(&self) -> String {
        self.lo.name()
    }

    /// `cryptsetup luksDump` text.
    pub fn dump(&self) -> String {
        run(Command::new("cryptsetup").arg("luksDump").arg(&self.lo.dev))
    }

    /// `cryptsetup luksDump --dump-json-metadata` text.
    pub fn metadata_json(&self) -> String {
        run(Command::new("cryptsetup").args(["luksDump", "--dump-json-metadata"]).arg(&self.lo.dev))
    }

    /// Does `passphrase` open some keyslot (`cryptsetup open --test-passphrase`)?
    pub fn opens_with(&self, passphrase: &[u8]) -> bool {
        let kf = self.dir.path().join("probe-key");
        std::fs::write(&kf, passphrase).expect("key file");
        let st = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&kf)
            .arg(&self.lo.dev)
            .stderr(Stdio::null())
            .status()
            .expect("cryptsetup");
        let _ = std::fs::remove_file(&kf);
        st.success()
    }

    /// `systemd-cryptsetup attach` with the TPM (headless, no password fallback); returns
    /// its output and detaches again. This kernel has no device-mapper, so the mapping
    /// itself fails; the messages show whether the TPM released the key.
    pub fn systemd_attach(&self, tpm: &Swtpm) -> Output {
        tpm.flush_all();
        let name = format!("piccolo-test-{}", self.name());
        let out = Command::new("/usr/lib/systemd/systemd-cryptsetup")
            .args(["attach", &name])
            .arg(&self.lo.dev)
            .arg("-")
            .arg(format!("tpm2-device=swtpm:port={},headless=1", tpm.port))
            .env("SYSTEMD_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .output()
            .expect("systemd-cryptsetup");
        let _ = Command::new("/usr/lib/systemd/systemd-cryptsetup").args(["detach", &name]).output();
        tpm.flush_all();
        out
    }
}

impl Swtpm {
    /// Does what systemd-cryptsetup 252 does with a `systemd-tpm2` token's `tpm2-blob`
    /// (TPM2B_PRIVATE || TPM2B_PUBLIC): create its ECC storage key, load the object,
    /// unseal it through a PolicyPCR session over sha256 `pcrs` (e.g. "7"). Returns the
    /// secret, or None if the TPM refused (PCR mismatch).
    pub fn unseal_systemd_blob(&self, blob: &[u8], pcrs: &str) -> Option<Vec<u8>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = usize::from(u16::from_be_bytes([blob[0], blob[1]]));
        let (p, q) = (dir.path().join("priv"), dir.path().join("pub"));
        std::fs::write(&p, &blob[..2 + n]).expect("priv");
        std::fs::write(&q, &blob[2 + n..]).expect("pub");
        let prim = dir.path().join("prim.ctx");
        let obj = dir.path().join("obj.ctx");
        let s = |p: &PathBuf| p.display().to_string();
        self.flush_all();
        let attrs = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth";
        let o = self.tool(&[
            "tpm2_createprimary",
            "-Q",
            "-C",
            "o",
            "-G",
            "ecc256:aes128cfb",
            "-g",
            "sha256",
            "-a",
            attrs,
            "-c",
            &s(&prim),
        ]);
        assert!(o.status.success(), "tpm2_createprimary: {}", String::from_utf8_lossy(&o.stderr));
        self.flush_all();
        let o = self.tool(&["tpm2_load", "-Q", "-C", &s(&prim), "-u", &s(&q), "-r", &s(&p), "-c", &s(&obj)]);
        assert!(o.status.success(), "tpm2_load: {}", String::from_utf8_lossy(&o.stderr));
        self.flush_all();
        let o = self.tool(&["tpm2_unseal", "-c", &s(&obj), "-p", &format!("pcr:sha256:{pcrs}")]);
        self.flush_all();
        o.status.success().then_some(o.stdout)
    }
}
