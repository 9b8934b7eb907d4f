// SPDX-License-Identifier: Apache-2.0
//! What `GetInfo` reports about each backend: present and usable, or why not.

use piccolo_proto::v1::Backend;

use crate::guard::Ctx;

/// Probes every backend; cheap enough to run per `GetInfo`.
pub async fn probe_all(ctx: &Ctx) -> Vec<Backend> {
    let cfg = &ctx.config.file;
    let tcti = &cfg.tpm.tcti;
    let tpm = match tcti.strip_prefix("device:") {
        Some(dev) => present("tpm", std::path::Path::new(dev), tcti),
        None => Backend { name: "tpm".into(), available: true, detail: tcti.clone() },
    };
    let efi = efi(&cfg.efi.efivars_root);
    let update_engine = Backend {
        name: "update_engine".into(),
        available: false,
        detail: "update_engine client not configured".into(),
    };
    let os_disk = match &cfg.boot.os_disk {
        Some(d) => present("os_disk", d, &d.display().to_string()),
        None => Backend { name: "os_disk".into(), available: false, detail: "no OS disk configured".into() },
    };
    let gocryptfs = present("gocryptfs", &cfg.volumes.gocryptfs, &cfg.volumes.state_dir.display().to_string());
    vec![tpm, efi, update_engine, os_disk, gocryptfs]
}

/// The efivarfs root: a real efivarfs (statfs magic), a plain directory standing in for one,
/// or "no EFI" and why.
fn efi(root: &std::path::Path) -> Backend {
    use piccolo_efivars::{Efivars, RootKind};
    let (available, detail) = match Efivars::open(root) {
        Ok(ev) if ev.kind() == RootKind::Efivarfs => (true, format!("efivarfs at {}", root.display())),
        Ok(_) => (true, format!("{}: plain directory, not efivarfs", root.display())),
        Err(e) => (false, e.to_string()),
    };
    Backend { name: "efi".into(), available, detail }
}

fn present(name: &str, path: &std::path::Path, detail: &str) -> Backend {
    let available = path.exists();
    let detail = if available { detail.to_owned() } else { format!("{} not present", path.display()) };
    Backend { name: name.into(), available, detail }
}
