// SPDX-License-Identifier: Apache-2.0
//! Shared test helpers: state-dir fixtures, a byte-exact tree snapshot, and a raw tar crafter
//! for building malicious archives the tar crate's builder would refuse to write.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use piccolo_keyset::{CreatedKeyset, KdfParams, Keyset, Password};
use sha2::{Digest, Sha256};

/// Smallest accepted KDF parameters, for speed.
pub const FAST: KdfParams = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };
pub const PASSWORD: &str = "export password 1";

pub fn pw(s: &str) -> Password {
    Password::new(s.to_string()).unwrap()
}

/// Every entry under `root` (not following symlinks): type, mode and content digest or target.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut items: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    items.sort();
    for p in items {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let m = fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        if m.file_type().is_symlink() {
            out.insert(rel, format!("link -> {}", fs::read_link(&p).unwrap().display()));
        } else if m.is_dir() {
            out.insert(rel, format!("dir {mode:o}"));
            walk(root, &p, out);
        } else {
            let digest = hex::encode(Sha256::digest(fs::read(&p).unwrap()));
            out.insert(rel, format!("file {mode:o} {} {digest}", m.len()));
        }
    }
}

/// Restricts a snapshot to the paths an archive carries for `volumes` (and the key set).
pub fn archived_part(snap: &BTreeMap<String, String>, volumes: &[&str], with_keyset: bool) -> BTreeMap<String, String> {
    snap.iter()
        .filter(|(k, _)| {
            (with_keyset && k.as_str() == "crypto/keyset.json")
                || volumes.iter().any(|v| {
                    let c = format!("ciphertext/{v}");
                    let j = format!("volumes/{v}");
                    **k == c || k.starts_with(&format!("{c}/")) || **k == j || k.starts_with(&format!("{j}/"))
                })
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn write_mode(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A state dir with a key set and a gocryptfs-shaped tree for `control` and `bootstrap`:
/// nested and empty dirs, empty and 1 MiB files, a 0400 file, names long enough to need GNU
/// long-name records, a ciphertext symlink, a journal, plus things outside the export.
pub fn make_state(root: &Path, seed: u8) -> CreatedKeyset {
    let created = Keyset::create(root, &pw(PASSWORD), FAST).unwrap();
    for vol in ["control", "bootstrap"] {
        let c = root.join("ciphertext").join(vol);
        write_mode(&c.join("gocryptfs.conf"), format!("{{\"vol\":\"{vol}\",\"seed\":{seed}}}").as_bytes(), 0o400);
        write_mode(&c.join("gocryptfs.diriv"), &[seed; 16], 0o444);
        let long = "A".repeat(150) + &seed.to_string();
        write_mode(&c.join(&long).join("x".repeat(120)), b"deep", 0o600);
        write_mode(&c.join("FPZpO9CAf4kqJAbo5U21YQ").join("empty"), b"", 0o600);
        fs::create_dir_all(c.join("emptydir")).unwrap();
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect();
        write_mode(&c.join("big"), &big, 0o600);
        std::os::unix::fs::symlink(
            "YGhHJuVREHvR2NovjstG5LE22YCRTwATkz7ena0qY5Hohy60PFacnuTxnQ",
            c.join("NHvzIFEkMLO1y0_5JcXhCg"),
        )
        .unwrap();
        write_mode(
            &root.join("volumes").join(vol).join("state.json"),
            format!("{{\"seed\":{seed}}}").as_bytes(),
            0o600,
        );
        fs::create_dir_all(root.join("mounts").join(vol)).unwrap();
    }
    write_mode(&root.join("exports/full/old.pcv"), b"not part of any export", 0o600);
    created
}

/// One raw tar member for [`craft`].
#[derive(Clone, Debug)]
pub struct Member {
    pub path: Vec<u8>,
    pub kind: u8,
    pub data: Vec<u8>,
    /// Size written in the header (defaults to `data.len()`).
    pub header_size: Option<u64>,
    pub link: Vec<u8>,
    pub mode: u32,
}

impl Member {
    pub fn file(path: &str, data: &[u8]) -> Member {
        Member {
            path: path.as_bytes().to_vec(),
            kind: b'0',
            data: data.to_vec(),
            header_size: None,
            link: vec![],
            mode: 0o600,
        }
    }

    pub fn dir(path: &str) -> Member {
        Member { kind: b'5', mode: 0o700, ..Member::file(path, b"") }
    }
}

fn raw_member(out: &mut Vec<u8>, m: &Member) {
    let path = if m.path.len() > 100 {
        // GNU long-name record, as the tar crate writes it.
        let mut name = m.path.clone();
        name.push(0);
        raw_member(
            out,
            &Member {
                path: b"././@LongLink".to_vec(),
                kind: b'L',
                data: name,
                header_size: None,
                link: vec![],
                mode: 0o644,
            },
        );
        &m.path[..100]
    } else {
        &m.path[..]
    };
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.as_old_mut().linkname[..m.link.len()].copy_from_slice(&m.link);
    h.set_entry_type(tar::EntryType::new(m.kind));
    h.set_size(m.header_size.unwrap_or(m.data.len() as u64));
    h.set_mode(m.mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&m.data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Writes `manifest` then `members`, then a trailer with the correct overall checksum, then
/// the end-of-archive marker. Nothing is validated: that is the point.
pub fn craft(manifest: &serde_json::Value, members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    raw_member(&mut out, &Member::file("manifest.json", &serde_json::to_vec(manifest).unwrap()));
    for m in members {
        raw_member(&mut out, m);
    }
    let trailer =
        serde_json::json!({ "archive_sha256": hex::encode(Sha256::digest(&out)), "archive_bytes": out.len() });
    raw_member(&mut out, &Member::file("trailer.json", &serde_json::to_vec(&trailer).unwrap()));
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Splits an archive into its manifest and members (trailer dropped), resolving long names.
pub fn dissect(archive: &[u8]) -> (serde_json::Value, Vec<Member>) {
    let mut ar = tar::Archive::new(archive);
    let mut manifest = None;
    let mut members = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path_bytes().into_owned();
        let kind = e.header().entry_type().as_byte();
        let mode = e.header().mode().unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        match &path[..] {
            b"manifest.json" => manifest = Some(serde_json::from_slice(&data).unwrap()),
            b"trailer.json" => {}
            _ => members.push(Member { path, kind, data, header_size: None, link: vec![], mode }),
        }
    }
    (manifest.unwrap(), members)
}
