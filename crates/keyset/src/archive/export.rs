// SPDX-License-Identifier: Apache-2.0
//! The export writer: pass 1 hashes the quiesced tree into a manifest, pass 2 streams it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::hashio::{CountingReader, HashingWriter, copy_hashed};
use super::import::ImportLimits;
use super::manifest::{
    Area, Entry, EntryKind, ExportKind, MANIFEST_NAME, Manifest, TRAILER_NAME, Trailer, check_path_syntax,
    check_symlink_target, validate_volume_ids,
};
use super::{ARCHIVE_FORMAT, ARCHIVE_VERSION};
use crate::durable::{fsync_dir, temp_path};
use crate::error::{Error, Result};
use crate::keyset::{KEYSET_RELATIVE_PATH, Keyset, MAX_KEYSET_BYTES, create_private_dir, keyset_path};

/// What an export contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// `control` or `full`.
    pub kind: ExportKind,
    /// The volumes exported, in archive order.
    pub volumes: Vec<String>,
    /// Fingerprint of the key set the volumes are encrypted under.
    pub key_id: String,
    /// Regular files (including the key set in a full export).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Ciphertext symlinks (manifest-only entries).
    pub symlinks: u64,
    /// Sum of file sizes.
    pub content_bytes: u64,
    /// Archive length in bytes.
    pub archive_bytes: u64,
    /// The overall checksum recorded in the trailer (SHA-256 hex of the bytes before it).
    pub archive_sha256: String,
}

/// Writes a `kind` export of `volume_ids` under `state_dir` to `writer` as a tar stream.
///
/// The caller must quiesce the volumes first (store locked, volumes unmounted or frozen): a file
/// that changes between the two passes fails the export with [`Error::TreeChanged`]. On any
/// error the bytes already written are not a valid archive and must be discarded.
pub fn write_export<S: AsRef<str>, W: Write>(
    state_dir: &Path,
    kind: ExportKind,
    volume_ids: &[S],
    writer: W,
) -> Result<ExportSummary> {
    let ids: Vec<String> = volume_ids.iter().map(|s| s.as_ref().to_string()).collect();
    validate_volume_ids(&ids)?;
    let plan = plan(state_dir, kind, ids)?;
    stream(state_dir, &plan, writer)
}

/// Writes the export atomically to `exports/<kind>/{control-plane,full-data}.pcv` under
/// `state_dir` (temp file, fsync, rename, fsync dir) and returns its path.
pub fn write_export_file<S: AsRef<str>>(
    state_dir: &Path,
    kind: ExportKind,
    volume_ids: &[S],
) -> Result<(PathBuf, ExportSummary)> {
    let dir = state_dir.join("exports").join(kind.name());
    let name = match kind {
        ExportKind::Control => "control-plane.pcv",
        ExportKind::Full => "full-data.pcv",
    };
    let path = dir.join(name);
    let werr = |source| Error::WriteArchive { source };
    create_private_dir(&state_dir.join("exports")).map_err(werr)?;
    create_private_dir(&dir).map_err(werr)?;
    let tmp = temp_path(&dir, name).map_err(werr)?;
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(werr)?;
    let result = (|| {
        let mut out = BufWriter::new(file);
        let summary = write_export(state_dir, kind, volume_ids, &mut out)?;
        let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        fs::rename(&tmp, &path).map_err(werr)?;
        fsync_dir(&dir).map_err(werr)?;
        Ok(summary)
    })();
    if result.is_err() {
        // Unique, never-read temp name: removing it is tidy-up only.
        let _ = fs::remove_file(&tmp);
    }
    result.map(|summary| (path, summary))
}

/// The manifest plus what the streaming pass needs to notice a changed tree.
struct Plan {
    manifest: Manifest,
    /// `stamps[i]` is the pass-1 identity of `manifest.entries[i]` when it is a tree file.
    stamps: Vec<Option<FileStamp>>,
    /// The key set as read once, so the manifest digest and the streamed bytes agree.
    keyset_bytes: Option<Vec<u8>>,
    mtime: u64,
}

/// Identity and change stamps of a file. The kernel bumps ctime on every write, truncate,
/// rename or chmod, so an equal stamp before and after a read means the read saw one version.
/// Pass 2 compares stamps instead of re-hashing (one SHA-256 pass less). Timestamps have the
/// kernel's coarse-clock granularity, so a same-size rewrite within one tick of the hashing could
/// slip past; the importer's per-file digest check would then refuse the archive, never restore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(f: &File) -> io::Result<FileStamp> {
        let m = f.metadata()?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Manifest entries and their stamps, built side by side.
#[derive(Default)]
struct Collected {
    entries: Vec<Entry>,
    stamps: Vec<Option<FileStamp>>,
}

impl Collected {
    fn push(&mut self, entry: Entry, stamp: Option<FileStamp>) {
        self.entries.push(entry);
        self.stamps.push(stamp);
    }
}

fn plan(state_dir: &Path, kind: ExportKind, ids: Vec<String>) -> Result<Plan> {
    let now = OffsetDateTime::now_utc();
    let ks_path = keyset_path(state_dir);
    let ks_bytes = read_bounded(&ks_path, MAX_KEYSET_BYTES)
        .map_err(|source| Error::ReadKeyset { path: ks_path.clone(), source })?;
    let keyset = Keyset::from_bytes(&ks_path, &ks_bytes)?;
    let mut out = Collected::default();
    if kind == ExportKind::Full {
        let (sha, size) = copy_hashed::<_, io::Sink>(&mut &ks_bytes[..], None)
            .map_err(|source| Error::ReadTree { path: ks_path.clone(), source })?;
        let entry = Entry {
            path: KEYSET_RELATIVE_PATH.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size,
            sha256: Some(sha),
            target: None,
        };
        out.push(entry, None);
    }
    for id in &ids {
        let root = state_dir.join("ciphertext").join(id);
        match fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(Error::MissingVolume { id: id.clone(), path: root }),
        }
        walk(&root, format!("ciphertext/{id}"), Area::Ciphertext, &mut out)?;
        let journal = state_dir.join("volumes").join(id);
        match fs::symlink_metadata(&journal) {
            Ok(m) if m.is_dir() => walk(&journal, format!("volumes/{id}"), Area::Volumes, &mut out)?,
            Ok(_) => return Err(Error::UnsupportedFile { path: journal, reason: "is not a directory" }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::ReadTree { path: journal, source }),
        }
    }
    let Collected { entries, stamps } = out;
    let total_bytes = entries.iter().map(|e| e.size).sum();
    let manifest = Manifest {
        format: ARCHIVE_FORMAT.into(),
        version: ARCHIVE_VERSION,
        kind,
        created: now.format(&Rfc3339).unwrap_or_default(),
        key_id: keyset.key_id().to_string(),
        volumes: ids,
        total_bytes,
        entries,
    };
    // An export the default importer would refuse is useless: fail now, not at restore time.
    manifest.validate(&ImportLimits::default())?;
    let keyset_bytes = (kind == ExportKind::Full).then_some(ks_bytes);
    let mtime = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    Ok(Plan { manifest, stamps, keyset_bytes, mtime })
}

/// Appends `dir` (as `rel`) and everything below it, sorted by name, dirs before contents.
fn walk(dir: &Path, rel: String, area: Area, out: &mut Collected) -> Result<()> {
    let read_err = |path: &Path, source| Error::ReadTree { path: path.to_path_buf(), source };
    let meta = fs::symlink_metadata(dir).map_err(|e| read_err(dir, e))?;
    let entry = Entry {
        path: rel.clone(),
        kind: EntryKind::Dir,
        mode: meta.mode() & 0o777,
        size: 0,
        sha256: None,
        target: None,
    };
    out.push(entry, None);
    let mut names = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        names.push(item.map_err(|e| read_err(dir, e))?.file_name());
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let unsupported = |reason| Error::UnsupportedFile { path: path.clone(), reason };
        let name = name.to_str().ok_or_else(|| unsupported("has a non-UTF-8 name"))?;
        let child = format!("{rel}/{name}");
        check_path_syntax(&child).map_err(|_| unsupported("has a name the archive format cannot carry"))?;
        let meta = fs::symlink_metadata(&path).map_err(|e| read_err(&path, e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            walk(&path, child, area, out)?;
        } else if ft.is_file() {
            let mut f = open_nofollow(&path).map_err(|e| read_err(&path, e))?;
            let stamp = FileStamp::of(&f).map_err(|e| read_err(&path, e))?;
            let (sha, size) = copy_hashed::<_, io::Sink>(&mut f, None).map_err(|e| read_err(&path, e))?;
            if size != stamp.size || FileStamp::of(&f).ok() != Some(stamp) {
                return Err(Error::TreeChanged { path });
            }
            let mode = meta.mode() & 0o777;
            let entry = Entry { path: child, kind: EntryKind::File, mode, size, sha256: Some(sha), target: None };
            out.push(entry, Some(stamp));
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| read_err(&path, e))?;
            let target = target.to_str().filter(|t| area == Area::Ciphertext && check_symlink_target(t));
            let target = target.ok_or_else(|| unsupported("is a symlink that is not a gocryptfs ciphertext link"))?;
            let entry = Entry {
                path: child,
                kind: EntryKind::Symlink,
                mode: 0o777,
                size: 0,
                sha256: None,
                target: Some(target.into()),
            };
            out.push(entry, None);
        } else {
            return Err(unsupported("is a device, fifo or socket"));
        }
    }
    Ok(())
}

fn stream<W: Write>(state_dir: &Path, plan: &Plan, writer: W) -> Result<ExportSummary> {
    let werr = |source| Error::WriteArchive { source };
    let m = &plan.manifest;
    let mut builder = tar::Builder::new(HashingWriter::new(writer));
    let manifest_bytes = serde_json::to_vec_pretty(m).map_err(|e| werr(io::Error::other(e)))?;
    append(
        &mut builder,
        MANIFEST_NAME,
        tar::EntryType::Regular,
        0o600,
        plan.mtime,
        &manifest_bytes[..],
        manifest_bytes.len() as u64,
    )
    .map_err(werr)?;
    let (mut files, mut dirs, mut symlinks) = (0u64, 0u64, 0u64);
    for (e, stamp) in m.entries.iter().zip(&plan.stamps) {
        match e.kind {
            EntryKind::Dir => {
                dirs += 1;
                append(&mut builder, &e.path, tar::EntryType::Directory, e.mode, plan.mtime, io::empty(), 0)
                    .map_err(werr)?;
            }
            EntryKind::Symlink => symlinks += 1,
            EntryKind::File => {
                files += 1;
                let abs = state_dir.join(&e.path);
                let changed = || Error::TreeChanged { path: abs.clone() };
                let mut file = None;
                let source: Box<dyn Read> = match (&plan.keyset_bytes, e.path == KEYSET_RELATIVE_PATH) {
                    (Some(bytes), true) => Box::new(&bytes[..]),
                    _ => {
                        let f = open_nofollow(&abs).map_err(|_| changed())?;
                        if FileStamp::of(&f).ok() != *stamp {
                            return Err(changed());
                        }
                        let source = Box::new(f.try_clone().map_err(|_| changed())?.take(e.size));
                        file = Some(f);
                        source
                    }
                };
                let mut counted = CountingReader::new(source);
                append(&mut builder, &e.path, tar::EntryType::Regular, e.mode, plan.mtime, &mut counted, e.size)
                    .map_err(werr)?;
                let unchanged = file.is_none_or(|f| FileStamp::of(&f).ok() == *stamp);
                if counted.count() != e.size || !unchanged {
                    return Err(changed());
                }
            }
        }
    }
    let (archive_sha256, archive_bytes) = builder.get_ref().digest_so_far();
    let trailer = Trailer { archive_sha256: archive_sha256.clone(), archive_bytes };
    let trailer_bytes = serde_json::to_vec(&trailer).map_err(|e| werr(io::Error::other(e)))?;
    append(
        &mut builder,
        TRAILER_NAME,
        tar::EntryType::Regular,
        0o600,
        plan.mtime,
        &trailer_bytes[..],
        trailer_bytes.len() as u64,
    )
    .map_err(werr)?;
    let hashing = builder.into_inner().map_err(werr)?;
    let (_, total) = hashing.digest_so_far();
    hashing.into_inner().flush().map_err(werr)?;
    Ok(ExportSummary {
        kind: m.kind,
        volumes: m.volumes.clone(),
        key_id: m.key_id.clone(),
        files,
        dirs,
        symlinks,
        content_bytes: m.total_bytes,
        archive_bytes: total,
        archive_sha256,
    })
}

/// Appends one entry with a GNU header (long paths use GNU long-name records).
fn append<W: Write, R: Read>(
    builder: &mut tar::Builder<W>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    mtime: u64,
    data: R,
    size: u64,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    builder.append_data(&mut header, path, data)
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_nofollow(path)?.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file too large"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KdfParams, Password};

    fn state_with_volume() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let fast = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };
        Keyset::create(dir.path(), &Password::new("a test password".into()).unwrap(), fast).unwrap();
        fs::create_dir_all(dir.path().join("ciphertext/control")).unwrap();
        fs::write(dir.path().join("ciphertext/control/data"), vec![1u8; 100_000]).unwrap();
        dir
    }

    #[test]
    fn a_file_changed_between_passes_fails_the_export() {
        for change in ["rewrite same size", "append", "replace"] {
            let dir = state_with_volume();
            let plan = plan(dir.path(), ExportKind::Control, vec!["control".into()]).unwrap();
            let data = dir.path().join("ciphertext/control/data");
            match change {
                "rewrite same size" => {
                    // Timestamps come from the kernel's coarse clock (a few ms): step past a tick,
                    // as any real writer after the hashing pass would be.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    fs::write(&data, vec![2u8; 100_000]).unwrap();
                }
                "append" => fs::OpenOptions::new().append(true).open(&data).unwrap().write_all(b"x").unwrap(),
                _ => {
                    let tmp = dir.path().join("ciphertext/control/tmp");
                    fs::write(&tmp, vec![1u8; 100_000]).unwrap();
                    fs::rename(&tmp, &data).unwrap();
                }
            }
            let err = stream(dir.path(), &plan, io::sink()).unwrap_err();
            assert!(matches!(err, Error::TreeChanged { .. }), "{change}: {err}");
        }
    }

    #[test]
    fn an_unchanged_tree_streams() {
        let dir = state_with_volume();
        let plan = plan(dir.path(), ExportKind::Control, vec!["control".into()]).unwrap();
        let summary = stream(dir.path(), &plan, io::sink()).unwrap();
        assert_eq!(summary.files, 1);
        assert_eq!(summary.content_bytes, 100_000);
    }
}
