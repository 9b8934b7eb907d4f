// SPDX-License-Identifier: Apache-2.0
//! Export/import: round trips, and malicious or damaged archives refused with the state dir
//! left byte-for-byte as it was.

mod common;

use std::path::Path;

use common::{FAST, Member, PASSWORD, archived_part, craft, dissect, make_state, pw, snapshot};
use piccolo_keyset::{
    Error, ExportKind, ImportLimits, Keyset, RecoveryKey, import, keyset_path, write_export, write_export_file,
};
use serde_json::Value;

/// The error and its sources, as a log line would show them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn export_bytes(state: &Path, kind: ExportKind, volumes: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    write_export(state, kind, volumes, &mut out).unwrap();
    out
}

#[test]
fn full_round_trip_restores_tree_and_unlocks_on_new_hardware() {
    let src = tempfile::tempdir().unwrap();
    let created = make_state(src.path(), 1);
    let mut archive = Vec::new();
    let summary = write_export(src.path(), ExportKind::Full, &["control", "bootstrap"], &mut archive).unwrap();
    assert_eq!(summary.archive_bytes, archive.len() as u64);
    assert_eq!(summary.files, 1 + 2 * 6, "keyset + 6 files per volume");
    assert_eq!(summary.symlinks, 2);
    assert_eq!(summary.key_id, created.keyset.key_id());

    let dst = tempfile::tempdir().unwrap();
    let report = import(&archive[..], dst.path(), &ImportLimits::default()).unwrap();
    assert!(report.requires_unlock && report.keyset_replaced);
    assert_eq!(report.volumes, vec!["control", "bootstrap"]);
    assert_eq!(report.files, summary.files);
    assert_eq!(report.bytes, summary.content_bytes);

    let want = archived_part(&snapshot(src.path()), &["control", "bootstrap"], true);
    let got = snapshot(dst.path());
    let got_archived = archived_part(&got, &["control", "bootstrap"], true);
    assert_eq!(got_archived, want);
    assert!(!got.keys().any(|k| k.starts_with(".import-") || k.starts_with("exports")), "{got:?}");

    // The imported key set opens with the export's password and recovery key.
    let ks = Keyset::read(dst.path()).unwrap();
    assert_eq!(ks.unlock_with_password(&pw(PASSWORD)).unwrap().expose_secret(), created.sdek.expose_secret());
    let rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert_eq!(ks.unlock_with_recovery_key(&rk).unwrap().expose_secret(), created.sdek.expose_secret());
}

#[test]
fn export_is_a_plain_tar_with_manifest_first_and_trailer_last() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 2);
    let archive = export_bytes(src.path(), ExportKind::Control, &["control"]);
    let mut ar = tar::Archive::new(&archive[..]);
    let names: Vec<String> =
        ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names.first().map(String::as_str), Some("manifest.json"));
    assert_eq!(names.last().map(String::as_str), Some("trailer.json"));
    assert!(!names.iter().any(|n| n.starts_with("crypto/")), "control exports carry no key set");
    let (manifest, _) = dissect(&archive);
    assert_eq!(manifest["format"], "piccolo-export");
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["kind"], "control");
    assert_eq!(manifest["volumes"], serde_json::json!(["control"]));
    let big = manifest["entries"].as_array().unwrap().iter().find(|e| e["path"] == "ciphertext/control/big").unwrap();
    assert_eq!(big["size"], 1 << 20);
    assert_eq!(big["sha256"].as_str().unwrap().len(), 64);
    // GNU tar agrees the stream is well formed and lists the same files.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &archive).unwrap();
    let out = std::process::Command::new("tar").arg("-tf").arg(file.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), names.len());
}

#[test]
fn control_import_replaces_only_its_volumes() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 3);
    let archive = export_bytes(src.path(), ExportKind::Control, &["control"]);

    // Same key set (same appliance), different and extra content in the live volume.
    let dst = tempfile::tempdir().unwrap();
    make_state(dst.path(), 4);
    std::fs::copy(keyset_path(src.path()), keyset_path(dst.path())).unwrap();
    std::fs::write(dst.path().join("ciphertext/control/stale-extra"), b"x").unwrap();
    let before = snapshot(dst.path());

    let report = import(&archive[..], dst.path(), &ImportLimits::default()).unwrap();
    assert!(!report.keyset_replaced && report.requires_unlock);
    let after = snapshot(dst.path());
    assert_eq!(archived_part(&after, &["control"], false), archived_part(&snapshot(src.path()), &["control"], false));
    assert_eq!(archived_part(&after, &["bootstrap"], true), archived_part(&before, &["bootstrap"], true));
    assert_eq!(after["exports/full/old.pcv"], before["exports/full/old.pcv"]);
    assert!(!after.contains_key("ciphertext/control/stale-extra"));
}

#[test]
fn full_import_reports_volumes_orphaned_by_the_new_key_set() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 5);
    let archive = export_bytes(src.path(), ExportKind::Full, &["control"]);
    let dst = tempfile::tempdir().unwrap();
    make_state(dst.path(), 6);
    let report = import(&archive[..], dst.path(), &ImportLimits::default()).unwrap();
    assert_eq!(report.orphaned_volumes, vec!["bootstrap"]);
}

/// A live state dir to import into, and what it looked like before.
struct Target {
    dir: tempfile::TempDir,
    before: std::collections::BTreeMap<String, String>,
}

impl Target {
    fn new() -> Target {
        let dir = tempfile::tempdir().unwrap();
        make_state(dir.path(), 9);
        let before = snapshot(dir.path());
        Target { dir, before }
    }

    /// Imports `archive` expecting failure; asserts nothing changed and returns the error.
    fn refuse(&self, archive: &[u8], limits: &ImportLimits) -> Error {
        let err = import(archive, self.dir.path(), limits).expect_err("import must fail");
        assert!(!err.to_string().is_empty());
        assert_eq!(snapshot(self.dir.path()), self.before, "state dir changed after: {err}");
        err
    }
}

/// A valid full archive of a source state, as manifest + members for tampering.
fn source() -> (Value, Vec<Member>) {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 7);
    dissect(&export_bytes(src.path(), ExportKind::Full, &["control", "bootstrap"]))
}

fn member_index(members: &[Member], path: &str) -> usize {
    members.iter().position(|m| m.path == path.as_bytes()).unwrap()
}

#[test]
fn crafted_baseline_imports() {
    // The crafter reproduces a valid archive, so each malicious case below fails for its own reason.
    let (manifest, members) = source();
    let t = Target::new();
    import(&craft(&manifest, &members)[..], t.dir.path(), &ImportLimits::default()).unwrap();
}

#[test]
fn traversal_and_absolute_paths_are_refused() {
    let (manifest, members) = source();
    let t = Target::new();
    for bad in ["../evil", "ciphertext/control/../../evil", "/etc/evil", "ciphertext/./control"] {
        // In a tar header, at the position of a legitimate file.
        let mut m = members.clone();
        let i = member_index(&m, "ciphertext/control/big");
        m[i].path = bad.as_bytes().to_vec();
        let err = t.refuse(&craft(&manifest, &m), &ImportLimits::default());
        assert!(matches!(err, Error::PathRejected { .. }), "{bad}: {err}");
        // In the manifest.
        let mut man = manifest.clone();
        let e =
            man["entries"].as_array_mut().unwrap().iter_mut().find(|e| e["path"] == "ciphertext/control/big").unwrap();
        e["path"] = bad.into();
        let err = t.refuse(&craft(&man, &members), &ImportLimits::default());
        assert!(matches!(err, Error::PathRejected { .. }), "{bad}: {err}");
    }
    // Paths outside the layout (e.g. into mounts/ or a volume not listed).
    let mut man = manifest.clone();
    man["entries"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"path": "mounts/control", "type": "dir", "mode": 448}));
    assert!(matches!(t.refuse(&craft(&man, &members), &ImportLimits::default()), Error::PathRejected { .. }));
}

#[test]
fn links_devices_and_extension_headers_are_refused() {
    let (manifest, members) = source();
    let t = Target::new();
    for (kind, name) in [
        (b'2', "symlink"),
        (b'1', "hard link"),
        (b'3', "character device"),
        (b'4', "block device"),
        (b'6', "fifo"),
        (b'x', "pax"),
    ] {
        let mut m = members.clone();
        let i = member_index(&m, "ciphertext/control/big");
        m[i].kind = kind;
        m[i].data.clear();
        m[i].link = b"/etc/shadow".to_vec();
        let err = t.refuse(&craft(&manifest, &m), &ImportLimits::default());
        assert!(matches!(err, Error::EntryTypeRejected { .. }), "{name}: {err}");
    }
    // A manifest symlink whose target leaves its directory.
    let mut man = manifest.clone();
    let e = man["entries"].as_array_mut().unwrap().iter_mut().find(|e| e["type"] == "symlink").unwrap();
    e["target"] = "../../../etc/shadow".into();
    assert!(matches!(t.refuse(&craft(&man, &members), &ImportLimits::default()), Error::PathRejected { .. }));
}

#[test]
fn truncated_streams_are_refused() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 8);
    let archive = export_bytes(src.path(), ExportKind::Full, &["control", "bootstrap"]);
    let t = Target::new();
    for cut in [0, 100, 512, 4096, archive.len() / 2, archive.len() - 2048] {
        let err = t.refuse(&archive[..cut], &ImportLimits::default());
        assert!(matches!(err, Error::ReadArchive { .. } | Error::ArchiveRejected { .. }), "cut {cut}: {err}");
    }
    // Cut exactly before the trailer: everything validates except the trailer is missing.
    let (manifest, members) = dissect(&archive);
    let mut no_trailer = Vec::new();
    {
        let full = craft(&manifest, &members);
        let trailer_at = full.len() - 1024 - 1024;
        no_trailer.extend_from_slice(&full[..trailer_at]);
        no_trailer.extend_from_slice(&[0u8; 1024]);
    }
    let err = t.refuse(&no_trailer, &ImportLimits::default());
    assert!(matches!(err, Error::ReadArchive { .. }) && chain(&err).contains("trailer is missing"), "{}", chain(&err));
}

#[test]
fn wrong_digests_and_checksums_are_refused() {
    let (manifest, members) = source();
    let t = Target::new();
    // Content changed, manifest digest not.
    let mut m = members.clone();
    let i = member_index(&m, "ciphertext/control/big");
    m[i].data[1000] ^= 1;
    assert!(matches!(t.refuse(&craft(&manifest, &m), &ImportLimits::default()), Error::DigestMismatch { .. }));
    // Header metadata changed after the trailer was computed: only the overall checksum sees it.
    let mut archive = craft(&manifest, &members);
    let first_member = 512 + serde_json::to_vec(&manifest).unwrap().len().div_ceil(512) * 512;
    archive[first_member + 136] = b'1'; // mtime field of the first member's header
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&archive[first_member..first_member + 512]);
    h.set_cksum();
    archive[first_member..first_member + 512].copy_from_slice(h.as_bytes());
    assert!(matches!(t.refuse(&archive, &ImportLimits::default()), Error::ChecksumMismatch));
    // Garbage after the end-of-archive marker.
    let mut archive = craft(&manifest, &members);
    archive.extend_from_slice(b"trailing garbage");
    assert!(matches!(t.refuse(&archive, &ImportLimits::default()), Error::ReadArchive { .. }));
}

#[test]
fn oversized_entries_and_caps_are_refused() {
    let (manifest, members) = source();
    let t = Target::new();
    let archive = craft(&manifest, &members);
    let small_files = ImportLimits { max_file_bytes: 4096, ..ImportLimits::default() };
    assert!(matches!(t.refuse(&archive, &small_files), Error::LimitExceeded { what: "file size", .. }));
    let small_total = ImportLimits { max_total_bytes: 1 << 20, ..ImportLimits::default() };
    assert!(matches!(t.refuse(&archive, &small_total), Error::LimitExceeded { what: "total size", .. }));
    let few = ImportLimits { max_entries: 5, ..ImportLimits::default() };
    assert!(matches!(t.refuse(&archive, &few), Error::LimitExceeded { what: "entry count", .. }));
    let tiny_manifest = ImportLimits { max_manifest_bytes: 100, ..ImportLimits::default() };
    assert!(matches!(t.refuse(&archive, &tiny_manifest), Error::LimitExceeded { what: "manifest size", .. }));
    // A header that claims more bytes than the manifest allows for that entry.
    let mut m = members.clone();
    let i = member_index(&m, "ciphertext/control/gocryptfs.conf");
    m[i].header_size = Some(1 << 40);
    let err = t.refuse(&craft(&manifest, &m), &ImportLimits::default());
    assert!(matches!(err, Error::ArchiveRejected { .. }), "{err}");
}

#[test]
fn unknown_versions_and_structural_lies_are_refused() {
    let (manifest, members) = source();
    let t = Target::new();
    let mut man = manifest.clone();
    man["version"] = 2.into();
    assert!(matches!(
        t.refuse(&craft(&man, &members), &ImportLimits::default()),
        Error::UnsupportedArchiveVersion { version: 2, .. }
    ));
    let mut man = manifest.clone();
    man["format"] = "something-else".into();
    assert!(matches!(
        t.refuse(&craft(&man, &members), &ImportLimits::default()),
        Error::UnsupportedArchiveVersion { .. }
    ));
    // An entry the manifest does not list.
    let mut m = members.clone();
    m.insert(3, Member::file("ciphertext/control/smuggled", b"x"));
    assert!(matches!(t.refuse(&craft(&manifest, &m), &ImportLimits::default()), Error::ArchiveRejected { .. }));
    // Members out of manifest order.
    let mut m = members.clone();
    let len = m.len();
    m.swap(len - 1, len - 2);
    assert!(matches!(t.refuse(&craft(&manifest, &m), &ImportLimits::default()), Error::ArchiveRejected { .. }));
    // A full archive whose key set is not the one the manifest names.
    let other = tempfile::tempdir().unwrap();
    Keyset::create(other.path(), &pw("another password"), FAST).unwrap();
    let mut m = members.clone();
    let i = member_index(&m, "crypto/keyset.json");
    m[i].data = std::fs::read(keyset_path(other.path())).unwrap();
    let mut man = manifest.clone();
    let e = man["entries"].as_array_mut().unwrap().iter_mut().find(|e| e["path"] == "crypto/keyset.json").unwrap();
    let old_size = e["size"].as_u64().unwrap();
    e["size"] = m[i].data.len().into();
    e["sha256"] = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&m[i].data)).into();
    // Keep the totals consistent so only the key-set mismatch is wrong.
    man["total_bytes"] = (man["total_bytes"].as_u64().unwrap() - old_size + m[i].data.len() as u64).into();
    let err = t.refuse(&craft(&man, &m), &ImportLimits::default());
    assert!(err.to_string().contains("key set"), "{err}");
}

#[test]
fn control_import_under_a_foreign_key_set_is_refused() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 10);
    let archive = export_bytes(src.path(), ExportKind::Control, &["control"]);
    let t = Target::new();
    assert!(matches!(t.refuse(&archive, &ImportLimits::default()), Error::KeysetMismatch));
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn import_refuses_while_a_volume_is_mounted() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 11);
    let archive = export_bytes(src.path(), ExportKind::Full, &["control"]);
    let t = Target::new();
    let mnt = t.dir.path().join("mounts/control");
    let st =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs (tests run as root)");
    let _guard = Mount(mnt);
    let err = import(&archive[..], t.dir.path(), &ImportLimits::default()).unwrap_err();
    assert!(matches!(err, Error::VolumeMounted { .. }), "{err}");
    drop(_guard);
    assert_eq!(snapshot(t.dir.path()), t.before);
}

#[test]
fn export_refuses_unsupported_trees_and_bad_ids() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 12);
    let mut sink = Vec::new();
    for ids in [vec![], vec!["control", "control"], vec!["../etc"], vec!["Control"]] {
        let err = write_export(src.path(), ExportKind::Full, &ids, &mut sink).unwrap_err();
        assert!(matches!(err, Error::VolumeIds { .. }), "{ids:?}: {err}");
    }
    assert!(matches!(
        write_export(src.path(), ExportKind::Full, &["nope"], &mut sink),
        Err(Error::MissingVolume { .. })
    ));
    // A symlink that is not a ciphertext link (absolute target) cannot be carried.
    std::os::unix::fs::symlink("/etc/shadow", src.path().join("ciphertext/control/evil")).unwrap();
    let err = write_export(src.path(), ExportKind::Full, &["control"], &mut sink).unwrap_err();
    assert!(matches!(err, Error::UnsupportedFile { .. }), "{err}");
    std::fs::remove_file(src.path().join("ciphertext/control/evil")).unwrap();
    // Nor a fifo.
    nix_mkfifo(&src.path().join("ciphertext/control/fifo"));
    let err = write_export(src.path(), ExportKind::Full, &["control"], &mut sink).unwrap_err();
    assert!(matches!(err, Error::UnsupportedFile { .. }), "{err}");
}

fn nix_mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

#[test]
fn export_file_is_written_atomically_under_exports_and_imports() {
    let src = tempfile::tempdir().unwrap();
    make_state(src.path(), 13);
    let (path, summary) = write_export_file(src.path(), ExportKind::Full, &["control"]).unwrap();
    assert_eq!(path, src.path().join("exports/full/full-data.pcv"));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), summary.archive_bytes);
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    let litter: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(litter.is_empty(), "{litter:?}");
    let dst = tempfile::tempdir().unwrap();
    import(std::fs::File::open(&path).unwrap(), dst.path(), &ImportLimits::default()).unwrap();
}

#[test]
fn restored_modes_never_grant_group_or_other_write() {
    let (mut manifest, members) = source();
    for e in manifest["entries"].as_array_mut().unwrap() {
        if e["type"] != "symlink" {
            e["mode"] = 0o777.into();
        }
    }
    let dst = tempfile::tempdir().unwrap();
    import(&craft(&manifest, &members)[..], dst.path(), &ImportLimits::default()).unwrap();
    for (path, desc) in snapshot(dst.path()) {
        if path.starts_with("ciphertext/control/") && !desc.starts_with("link") {
            assert!(desc.starts_with("dir 755") || desc.starts_with("file 755"), "{path}: {desc}");
        }
    }
}
