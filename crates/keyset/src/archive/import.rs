// SPDX-License-Identifier: Apache-2.0
//! The importer: validates the whole archive into a staging dir, then swaps it into place.

use std::cell::RefCell;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::rc::Rc;

use super::hashio::{ChecksumReader, ChecksumState, copy_hashed};
use super::manifest::{
    EntryKind, ExportKind, MANIFEST_NAME, MAX_PATH_BYTES, MAX_TRAILER_BYTES, Manifest, TRAILER_NAME, Trailer,
    VersionProbe, check_path_syntax, printable,
};
use super::swap::{Staging, recover_interrupted_import};
use super::{ARCHIVE_FORMAT, ARCHIVE_VERSION};
use crate::durable::fsync_dir;
use crate::error::{Error, Result};
use crate::keyset::{KEYSET_RELATIVE_PATH, Keyset};

/// Restored modes never grant group or other write: an archive must not be able to open the
/// ciphertext to tampering by other local users.
const RESTORED_MODE_MASK: u32 = 0o755;

/// Caps an import enforces before and while reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLimits {
    /// Most manifest entries (files, dirs, symlinks).
    pub max_entries: u64,
    /// Largest single file.
    pub max_file_bytes: u64,
    /// Largest sum of file sizes.
    pub max_total_bytes: u64,
    /// Largest `manifest.json`.
    pub max_manifest_bytes: u64,
}

impl Default for ImportLimits {
    fn default() -> ImportLimits {
        ImportLimits {
            max_entries: 200_000,
            max_file_bytes: 64 << 30,
            max_total_bytes: 256 << 30,
            max_manifest_bytes: 64 << 20,
        }
    }
}

/// What an import put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// `control` or `full`.
    pub kind: ExportKind,
    /// The volumes replaced.
    pub volumes: Vec<String>,
    /// When the export was made (RFC 3339, from the manifest).
    pub created: String,
    /// Fingerprint of the key set the imported volumes need.
    pub key_id: String,
    /// Regular files written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Whether `crypto/keyset.json` was replaced (full exports).
    pub keyset_replaced: bool,
    /// Live volumes not in a full archive that were encrypted under the replaced key set:
    /// their SDEK is gone, so they can no longer be opened.
    pub orphaned_volumes: Vec<String>,
    /// Always true: the caller must zero any SDEK it holds, keep the store locked and unlock
    /// again with the export's password or recovery key (or, for `control`, the live one).
    pub requires_unlock: bool,
}

/// Imports an archive written by [`crate::write_export`] into `state_dir`.
///
/// Everything is checked before live state changes: format version, manifest fields and paths,
/// caps, entry types (only files and dirs in the tar stream), each entry against the manifest,
/// each file against its SHA-256, the overall checksum, and the key set. The content is
/// unpacked into `<state>/.import-*/new` and swapped in by renames behind a journal. On any
/// error before the swap the state dir is left as it was. The volumes must be unmounted and
/// the store locked; after success the caller must unlock again (see [`ImportReport`]).
pub fn import<R: Read>(reader: R, state_dir: &Path, limits: &ImportLimits) -> Result<ImportReport> {
    import_with_hooks(reader, state_dir, limits, &mut NoHooks)
}

/// What an [`ImportHooks`] callback learns about the archive (from its validated manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// `control` or `full`.
    pub kind: ExportKind,
    /// The volumes the archive replaces, in archive order.
    pub volumes: Vec<String>,
    /// Fingerprint of the key set the volumes are encrypted under.
    pub key_id: String,
    /// When the export was made (RFC 3339).
    pub created: String,
}

/// Callbacks into [`import_with_hooks`], for a caller that must judge or adjust an import
/// before it is swapped in (the broker: policy per volume id, ownership of the staged tree).
/// An error refuses the import with nothing changed; wrap foreign errors in
/// [`Error::Refused`].
pub trait ImportHooks {
    /// After the manifest is validated and before anything is staged.
    fn manifest(&mut self, _info: &ManifestInfo) -> Result<()> {
        Ok(())
    }
    /// After every entry is staged and verified, before the journal (the commit point).
    /// `staged` mirrors the state-dir layout (`crypto/keyset.json`, `ciphertext/<id>`,
    /// `volumes/<id>`); whatever the hook changes there must be durable when it returns.
    fn staged(&mut self, _staged: &Path, _info: &ManifestInfo) -> Result<()> {
        Ok(())
    }
}

struct NoHooks;
impl ImportHooks for NoHooks {}

/// Reads the first tar entry of an archive (which must be `manifest.json`, at most
/// `max_manifest_bytes`) and returns what it says, with every byte consumed, so the caller can
/// send those bytes on followed by the rest of the stream. Nothing is trusted: the importer
/// validates the whole archive again; this only lets a client declare the archive's volumes
/// up front (the broker's policy decides on them before it reads the rest).
pub fn peek_manifest<R: Read>(reader: &mut R, max_manifest_bytes: u64) -> Result<(ManifestInfo, Vec<u8>)> {
    let mut prefix = vec![0u8; 512];
    reader.read_exact(&mut prefix).map_err(read_err)?;
    let header = tar::Header::from_byte_slice(&prefix);
    let path = header.path_bytes();
    if &path[..] != MANIFEST_NAME.as_bytes() || !matches!(header.entry_type().as_byte(), b'0' | b'\0') {
        return Err(rejected(format!("first entry must be {MANIFEST_NAME}")));
    }
    let size = header.entry_size().map_err(read_err)?;
    if size > max_manifest_bytes {
        return Err(Error::LimitExceeded { what: "manifest size", limit: max_manifest_bytes });
    }
    let padded = size.div_ceil(512) * 512;
    let start = prefix.len();
    prefix.resize(start + usize::try_from(padded).map_err(|_| truncated("the manifest is too large"))?, 0);
    reader.read_exact(&mut prefix[start..]).map_err(|_| truncated("the manifest ends early"))?;
    let body = &prefix[start..start + usize::try_from(size).unwrap_or(0)];
    let probe: VersionProbe =
        serde_json::from_slice(body).map_err(|e| rejected(format!("manifest is not valid JSON: {e}")))?;
    if probe.format != ARCHIVE_FORMAT || probe.version != ARCHIVE_VERSION {
        return Err(Error::UnsupportedArchiveVersion { format: printable(&probe.format), version: probe.version });
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|e| rejected(format!("manifest is malformed: {e}")))?;
    Ok((m.info(), prefix))
}

impl Manifest {
    fn info(&self) -> ManifestInfo {
        ManifestInfo {
            kind: self.kind,
            volumes: self.volumes.clone(),
            key_id: self.key_id.clone(),
            created: self.created.clone(),
        }
    }
}

/// [`import`] with callbacks before staging and before the swap.
pub fn import_with_hooks<R: Read>(
    reader: R,
    state_dir: &Path,
    limits: &ImportLimits,
    hooks: &mut dyn ImportHooks,
) -> Result<ImportReport> {
    recover_interrupted_import(state_dir)?;
    let state = Rc::new(RefCell::new(ChecksumState::default()));
    let reader = ChecksumReader::new(BufReader::with_capacity(256 * 1024, reader), Rc::clone(&state));
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(read_err)?.raw(true);

    let (path, mut entry) = next_item(&mut entries)?.ok_or_else(|| truncated("the archive is empty"))?;
    if path != MANIFEST_NAME || entry_kind(&entry, &path)? != EntryKind::File {
        return Err(rejected(format!("first entry must be {MANIFEST_NAME}, found {:?}", printable(&path))));
    }
    let manifest = read_manifest(&mut entry, limits)?;
    drop(entry);
    manifest.validate(limits)?;
    let live_keyset = Keyset::read(state_dir).ok();
    if manifest.kind == ExportKind::Control
        && live_keyset.as_ref().map(Keyset::key_id) != Some(manifest.key_id.as_str())
    {
        return Err(Error::KeysetMismatch);
    }
    check_not_mounted(state_dir, &manifest.volumes)?;
    let info = manifest.info();
    hooks.manifest(&info)?;

    let staging = Staging::create(state_dir)?;
    let new_root = staging.new_dir();
    let (mut files, mut bytes) = (0u64, 0u64);
    for e in &manifest.entries {
        let dest = new_root.join(&e.path);
        let stage_err = |source| Error::Stage { path: dest.clone(), source };
        if e.kind == EntryKind::Symlink {
            // Manifest-only entry; its target was checked to be a single base64url name.
            let target = e.target.as_deref().unwrap_or_default();
            std::os::unix::fs::symlink(target, &dest).map_err(stage_err)?;
            continue;
        }
        let (path, mut entry) = next_item(&mut entries)?.ok_or_else(|| truncated("entries are missing"))?;
        check_path_syntax(&path)?;
        let kind = entry_kind(&entry, &path)?;
        if path != e.path || kind != e.kind {
            return Err(rejected(format!(
                "entry {:?} does not match the manifest, expected {:?}",
                printable(&path),
                printable(&e.path)
            )));
        }
        if kind == EntryKind::Dir {
            if entry.size() != 0 {
                return Err(rejected(format!("directory entry {:?} carries data", printable(&path))));
            }
            create_staged_parents(&new_root, &e.path).map_err(stage_err)?;
            DirBuilder::new().mode(0o700).create(&dest).map_err(stage_err)?;
            continue;
        }
        if entry.size() != e.size {
            return Err(rejected(format!("entry {:?} size differs from the manifest", printable(&path))));
        }
        create_staged_parents(&new_root, &e.path).map_err(stage_err)?;
        let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dest).map_err(stage_err)?;
        let (sha, n) = copy_hashed(&mut entry, Some(&mut out)).map_err(read_err)?;
        if n != e.size {
            return Err(truncated("a file ends early"));
        }
        if Some(sha) != e.sha256 {
            return Err(Error::DigestMismatch { path: printable(&e.path) });
        }
        out.set_permissions(fs::Permissions::from_mode(e.mode & RESTORED_MODE_MASK)).map_err(stage_err)?;
        out.sync_all().map_err(stage_err)?;
        files += 1;
        bytes += n;
    }
    check_trailer(&mut entries, &state)?;
    archive.into_inner().drain_zero_padding(1 << 20).map_err(read_err)?;

    let keyset_replaced = manifest.kind == ExportKind::Full;
    if keyset_replaced {
        let staged = Keyset::read_file(&new_root.join(KEYSET_RELATIVE_PATH))?;
        if staged.key_id() != manifest.key_id {
            return Err(rejected("the key set in the archive does not match the manifest key_id".into()));
        }
    }
    finish_dirs(&new_root, &manifest)?;
    hooks.staged(&new_root, &info)?;
    let orphaned_volumes = match (&live_keyset, keyset_replaced) {
        (Some(live), true) if live.key_id() != manifest.key_id => orphans(state_dir, &manifest.volumes),
        _ => Vec::new(),
    };
    let mut targets = Vec::new();
    if keyset_replaced {
        targets.push(KEYSET_RELATIVE_PATH.to_string());
    }
    for id in &manifest.volumes {
        targets.push(format!("ciphertext/{id}"));
        targets.push(format!("volumes/{id}"));
    }
    staging.commit(state_dir, &targets)?;
    Ok(ImportReport {
        kind: manifest.kind,
        volumes: manifest.volumes,
        created: manifest.created,
        key_id: manifest.key_id,
        files,
        bytes,
        keyset_replaced,
        orphaned_volumes,
        requires_unlock: true,
    })
}

type Entries<'a, R> = tar::Entries<'a, ChecksumReader<BufReader<R>>>;
type TarEntry<'a, R> = tar::Entry<'a, ChecksumReader<BufReader<R>>>;

/// The next real entry and its path, resolving (bounded) GNU long-name records ourselves, since
/// the archive is read raw so that the tar crate interprets no extension headers.
fn next_item<'a, R: Read>(entries: &mut Entries<'a, R>) -> Result<Option<(String, TarEntry<'a, R>)>> {
    let mut long_name: Option<String> = None;
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(read_err)?;
        if entry.header().entry_type().as_byte() != b'L' {
            let path = match long_name {
                Some(p) => p,
                None => String::from_utf8(entry.path_bytes().into_owned())
                    .map_err(|_| Error::PathRejected { path: "<non-UTF-8>".into(), reason: "is not UTF-8" })?,
            };
            return Ok(Some((path, entry)));
        }
        if long_name.is_some() {
            return Err(rejected("two long-name records in a row".into()));
        }
        if entry.size() > MAX_PATH_BYTES as u64 + 1 {
            return Err(Error::PathRejected { path: "<long name>".into(), reason: "is too long" });
        }
        let mut buf = Vec::new();
        entry.read_to_end(&mut buf).map_err(read_err)?;
        if buf.len() as u64 != entry.size() {
            return Err(truncated("a long-name record ends early"));
        }
        while buf.last() == Some(&0) {
            buf.pop();
        }
        let name = String::from_utf8(buf)
            .map_err(|_| Error::PathRejected { path: "<non-UTF-8>".into(), reason: "is not UTF-8" })?;
        long_name = Some(name);
    }
    match long_name {
        Some(_) => Err(truncated("a long-name record has no entry")),
        None => Ok(None),
    }
}

/// Only regular files and directories may appear in the tar stream.
fn entry_kind<R: Read>(entry: &TarEntry<'_, R>, path: &str) -> Result<EntryKind> {
    let kind = match entry.header().entry_type().as_byte() {
        b'0' | b'\0' => return Ok(EntryKind::File),
        b'5' => return Ok(EntryKind::Dir),
        b'1' => "hard link".to_string(),
        b'2' => "symlink".to_string(),
        b'3' => "character device".to_string(),
        b'4' => "block device".to_string(),
        b'6' => "fifo".to_string(),
        b'7' => "contiguous file".to_string(),
        b'x' | b'g' => "pax extended header".to_string(),
        b'K' => "GNU long link".to_string(),
        b'S' => "GNU sparse file".to_string(),
        other => format!("type byte {other:#04x}"),
    };
    Err(Error::EntryTypeRejected { path: printable(path), kind })
}

fn read_manifest<R: Read>(entry: &mut TarEntry<'_, R>, limits: &ImportLimits) -> Result<Manifest> {
    if entry.size() > limits.max_manifest_bytes {
        return Err(Error::LimitExceeded { what: "manifest size", limit: limits.max_manifest_bytes });
    }
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 != entry.size() {
        return Err(truncated("the manifest ends early"));
    }
    let probe: VersionProbe =
        serde_json::from_slice(&bytes).map_err(|e| rejected(format!("manifest is not valid JSON: {e}")))?;
    if probe.format != ARCHIVE_FORMAT || probe.version != ARCHIVE_VERSION {
        return Err(Error::UnsupportedArchiveVersion { format: printable(&probe.format), version: probe.version });
    }
    serde_json::from_slice(&bytes).map_err(|e| rejected(format!("manifest is malformed: {e}")))
}

/// The entry after the last manifest entry must be the trailer, starting exactly where the
/// checksummed bytes end, and nothing but the end-of-archive marker may follow it.
fn check_trailer<R: Read>(entries: &mut Entries<'_, R>, state: &Rc<RefCell<ChecksumState>>) -> Result<()> {
    let (path, mut entry) = next_item(entries)?.ok_or_else(|| truncated("the trailer is missing"))?;
    let (digest, hashed) = state.borrow().digest_so_far();
    if path != TRAILER_NAME || entry_kind(&entry, &path)? != EntryKind::File {
        return Err(rejected(format!(
            "expected {TRAILER_NAME} after the last manifest entry, found {:?}",
            printable(&path)
        )));
    }
    if entry.raw_header_position() != hashed || entry.size() > MAX_TRAILER_BYTES {
        return Err(rejected("the trailer is malformed".into()));
    }
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(read_err)?;
    let trailer: Trailer =
        serde_json::from_slice(&bytes).map_err(|e| rejected(format!("trailer is malformed: {e}")))?;
    if trailer.archive_bytes != hashed || trailer.archive_sha256 != digest {
        return Err(Error::ChecksumMismatch);
    }
    drop(entry);
    if let Some((path, _)) = next_item(entries)? {
        return Err(rejected(format!("entry {:?} follows the trailer", printable(&path))));
    }
    Ok(())
}

/// Directory entries were validated to come before their contents; parents of a volume root
/// (`ciphertext/`, `volumes/`, `crypto/`) are implicit and created here.
fn create_staged_parents(new_root: &Path, rel: &str) -> io::Result<()> {
    if let Some(parent) = Path::new(rel).parent().filter(|p| p.components().count() == 1) {
        let dir = new_root.join(parent);
        if !dir.is_dir() {
            DirBuilder::new().mode(0o700).create(dir)?;
        }
    }
    Ok(())
}

/// fsyncs every staged directory and gives it its manifest mode, deepest first.
fn finish_dirs(new_root: &Path, manifest: &Manifest) -> Result<()> {
    for e in manifest.entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        let dir = new_root.join(&e.path);
        let stage_err = |source| Error::Stage { path: dir.clone(), source };
        fsync_dir(&dir).map_err(stage_err)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(e.mode & RESTORED_MODE_MASK)).map_err(stage_err)?;
    }
    for top in ["crypto", "ciphertext", "volumes"] {
        let dir = new_root.join(top);
        if dir.is_dir() {
            fsync_dir(&dir).map_err(|source| Error::Stage { path: dir.clone(), source })?;
        }
    }
    fsync_dir(new_root).map_err(|source| Error::Stage { path: new_root.to_path_buf(), source })
}

/// Refuses while any `mounts/<id>` of an imported volume is a mount point (other st_dev).
fn check_not_mounted(state_dir: &Path, volumes: &[String]) -> Result<()> {
    let root_dev =
        fs::metadata(state_dir).map_err(|source| Error::Stage { path: state_dir.to_path_buf(), source })?.dev();
    for id in volumes {
        let mnt = state_dir.join("mounts").join(id);
        let mounted = match fs::symlink_metadata(&mnt) {
            Ok(m) => m.dev() != root_dev,
            // A FUSE mount whose daemon died answers ENOTCONN: it is still a mount point.
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        };
        if mounted {
            return Err(Error::VolumeMounted { path: mnt });
        }
    }
    Ok(())
}

/// Live `ciphertext/<id>` dirs a full import does not replace.
fn orphans(state_dir: &Path, imported: &[String]) -> Vec<String> {
    let Ok(items) = fs::read_dir(state_dir.join("ciphertext")) else {
        return Vec::new();
    };
    let mut out: Vec<String> =
        items.filter_map(|i| i.ok()?.file_name().into_string().ok()).filter(|name| !imported.contains(name)).collect();
    out.sort();
    out
}

fn read_err(source: io::Error) -> Error {
    Error::ReadArchive { source }
}

fn truncated(what: &str) -> Error {
    Error::ReadArchive { source: io::Error::new(io::ErrorKind::UnexpectedEof, format!("archive truncated: {what}")) }
}

fn rejected(reason: String) -> Error {
    Error::ArchiveRejected { reason }
}
