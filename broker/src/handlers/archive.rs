// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Archive`: export and import of volumes with the existing archive code
//! (`piccolo_keyset::write_export` / `import_with_hooks`), run as root because `ciphertext/`
//! is root's and ciphertext files belong to whichever uid wrote them through FUSE.
//!
//! The caller names volume ids only. Every id must be allowed by the policy's `volumes`
//! constraint (the guard gets the first id the policy refuses, so a refusal is a `deny`
//! record), belong to the caller and be unmounted. The root side parses and validates the
//! whole archive itself: the worker can never name a path, and a crafted archive meets the
//! same checks as on the command line. An import is judged before anything is staged
//! (ids against the header and the policy, `crypto/` and `volumes/` owned by the caller) and
//! its staged tree is re-owned before the swap: volume metadata and journals to the caller,
//! `data/` to the presented user re-resolved by name on this machine.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use piccolo_audit::Entry;
use piccolo_keyset::{ExportKind, ImportHooks, ManifestInfo};
use piccolo_proto::Rpc;
use piccolo_proto::v1::archive_server::Archive;
use piccolo_proto::v1::export_archive_response::Msg as ExportMsg;
use piccolo_proto::v1::import_archive_request::Msg as ImportMsg;
use piccolo_proto::v1::{
    self as pb, ArchiveSummary, ExportArchiveRequest, ExportArchiveResponse, ImportArchiveRequest,
    ImportArchiveResponse,
};
use piccolo_volumes::meta::Meta;
use piccolo_volumes::{self as vol, VolumeId};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::boot::{HEADER_TIMEOUT, blocking, forward_chunks};
use crate::error::{Error, chain_message};
use crate::guard::{Shared, run};
use crate::identity::Identity;

/// Largest export chunk.
pub const EXPORT_CHUNK: usize = 64 << 10;
/// Export chunks in flight: with [`EXPORT_CHUNK`] the broker holds at most ~320 KiB per export.
const CHUNKS_IN_FLIGHT: usize = 4;
/// A client that reads nothing for this long is cut off (the export holds the volumes' lock).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most volumes in one archive (the format's cap).
const MAX_IDS: usize = 64;

fn backend(code: Code, message: impl Into<String>) -> Error {
    Error::Backend { code, message: message.into() }
}

/// The one mapping of archive errors to gRPC codes. Messages name steps, ids and archive
/// paths; the archive code never puts key material in them.
fn keyset_error(e: piccolo_keyset::Error) -> Error {
    use piccolo_keyset::Error as K;
    // A hook's refusal carries the broker's own error (policy, ownership): pass it through.
    let e = match e {
        K::Refused(inner) => {
            return match inner.downcast::<Error>() {
                Ok(err) => *err,
                Err(other) => backend(Code::Internal, other.to_string()),
            };
        }
        other => other,
    };
    let code = match &e {
        e if e.is_archive_rejection() => Code::InvalidArgument,
        K::VolumeIds { .. } => Code::InvalidArgument,
        K::MissingVolume { .. } => Code::NotFound,
        K::VolumeMounted { .. } | K::TreeChanged { .. } | K::UnsupportedFile { .. } | K::ReadKeyset { .. } => {
            Code::FailedPrecondition
        }
        K::WriteArchive { .. } => Code::Cancelled,
        _ => Code::Internal,
    };
    let message = chain_message(&e);
    if code == Code::Internal {
        tracing::error!(error = %message, "archive operation failed");
    }
    backend(code, message)
}

fn kind_of(k: i32) -> Result<ExportKind, Error> {
    match pb::ExportKind::try_from(k) {
        Ok(pb::ExportKind::Control) => Ok(ExportKind::Control),
        Ok(pb::ExportKind::Full) => Ok(ExportKind::Full),
        _ => Err(Error::InvalidArgument("kind: give control or full".into())),
    }
}

fn kind_pb(k: ExportKind) -> pb::ExportKind {
    match k {
        ExportKind::Control => pb::ExportKind::Control,
        ExportKind::Full => pb::ExportKind::Full,
    }
}

/// The ids as audited: at most 64, each cut to 64 characters.
fn ids_arg(ids: &[String]) -> Vec<String> {
    ids.iter().take(MAX_IDS).map(|i| i.chars().take(64).collect()).collect()
}

/// The value the guard checks against `volumes`: the first id the policy refuses this caller
/// (so the guard denies and records it), else the first id; "" for an empty list.
fn constraint_of(ctx: &Shared, who: &Identity, rpc: Rpc, ids: &[String]) -> Option<String> {
    let policy = ctx.policy();
    let refused = ids.iter().find(|id| !policy.allows(who, rpc, Some(id)));
    Some(refused.or(ids.first()).cloned().unwrap_or_default())
}

/// 1..=64 distinct valid ids, each allowed by the policy in force now (it may have been
/// reloaded since the guard looked).
fn check_ids(ctx: &Shared, who: &Identity, rpc: Rpc, ids: &[String]) -> Result<Vec<VolumeId>, Error> {
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(Error::InvalidArgument(format!("volume_ids: need 1..={MAX_IDS}, got {}", ids.len())));
    }
    let policy = ctx.policy();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for id in ids {
        let v = VolumeId::parse(id)?;
        if !seen.insert(id.as_str()) {
            return Err(Error::InvalidArgument(format!("volume_ids: {id} is listed twice")));
        }
        if !policy.allows(who, rpc, Some(id)) {
            return Err(backend(Code::PermissionDenied, format!("volume {id} is not allowed for this caller")));
        }
        out.push(v);
    }
    Ok(out)
}

/// `dir` must be a real directory owned by the caller (the persistence owner's `crypto/`
/// and `volumes/`): imported files land in it and must stay the caller's to manage.
fn check_owned_dir(dir: &Path, who: &Identity) -> Result<(), Error> {
    let ok = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == who.uid);
    if ok {
        Ok(())
    } else {
        Err(backend(
            Code::FailedPrecondition,
            format!("{} must be a directory owned by uid {}", dir.display(), who.uid),
        ))
    }
}

/// An existing volume must belong to the caller; `Ok(false)` if it does not exist.
fn check_owner(vols: &vol::Volumes, id: &VolumeId, who: &Identity) -> Result<bool, Error> {
    match vols.metadata(id) {
        Ok(m) if m.owner_uid == who.uid => Ok(true),
        Ok(m) => Err(vol::Error::NotOwner { id: id.to_string(), owner: m.owner_uid }.into()),
        Err(vol::Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn check_unmounted(vols: &vol::Volumes, id: &VolumeId) -> Result<(), Error> {
    if vols.status(id)?.mounted {
        return Err(backend(Code::FailedPrecondition, format!("volume {id} is mounted: quiesce first")));
    }
    Ok(())
}

/// A `Write` that cuts the archive into chunks for the response stream, hashing and counting
/// what it sends. The bounded channel gives constant memory and back pressure from the client.
struct ChunkWriter {
    tx: mpsc::Sender<Result<ExportArchiveResponse, Status>>,
    rt: tokio::runtime::Handle,
    buf: Vec<u8>,
    hasher: Sha256,
    bytes: u64,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(EXPORT_CHUNK));
        self.hasher.update(&chunk);
        self.bytes += chunk.len() as u64;
        let msg = Ok(ExportArchiveResponse { msg: Some(ExportMsg::Chunk(chunk)) });
        // This runs on a blocking-pool thread, so waiting on the runtime here is allowed.
        self.rt.block_on(self.tx.send_timeout(msg, STALL_TIMEOUT)).map_err(|e| match e {
            mpsc::error::SendTimeoutError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, "client stalled"),
            mpsc::error::SendTimeoutError::Closed(_) => io::Error::new(io::ErrorKind::BrokenPipe, "client went away"),
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(EXPORT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == EXPORT_CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn chown_durably(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() || meta.is_dir() {
        // The new owner is inode metadata: durable only after an fsync of the inode.
        std::fs::File::open(path)?.sync_all()?;
    }
    Ok(())
}

/// Gives `root` and everything below it to `uid:gid` (lchown: links are never followed),
/// keeping modes.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.is_dir() {
        for item in std::fs::read_dir(root)? {
            chown_tree(&item?.path(), uid, gid)?;
        }
    }
    chown_durably(root, uid, gid)
}

/// The broker's side of an import: policy and ownership before staging, re-owning after.
struct Hooks<'a> {
    ctx: &'a Shared,
    who: &'a Identity,
    vols: &'a vol::Volumes,
    declared: Vec<String>,
}

fn refuse(e: Error) -> piccolo_keyset::Error {
    piccolo_keyset::Error::Refused(Box::new(e))
}

impl Hooks<'_> {
    fn judge(&self, info: &ManifestInfo) -> Result<(), Error> {
        let mut got = info.volumes.clone();
        let mut want = self.declared.clone();
        got.sort();
        want.sort();
        if got != want {
            return Err(Error::InvalidArgument(format!(
                "the archive holds volumes {:?}, the header declared {:?}",
                ids_arg(&info.volumes),
                ids_arg(&self.declared)
            )));
        }
        let ids = check_ids(self.ctx, self.who, Rpc::ImportArchive, &info.volumes)?;
        let state = self.vols.state_dir();
        check_owned_dir(&state.join("volumes"), self.who)?;
        if info.kind == ExportKind::Full {
            check_owned_dir(&state.join("crypto"), self.who)?;
        }
        for id in &ids {
            check_owner(self.vols, id, self.who)?;
        }
        Ok(())
    }

    fn reown(&self, staged: &Path, info: &ManifestInfo) -> Result<(), Error> {
        let (uid, gid) = (self.who.uid, self.who.gid);
        let io_err = |what: &str, p: &Path| {
            let what = what.to_string();
            let p = p.to_path_buf();
            move |e: io::Error| backend(Code::Internal, format!("{what} {}: {e}", p.display()))
        };
        for id in &info.volumes {
            let vid = VolumeId::parse(id)?;
            let dir = staged.join("ciphertext").join(id);
            let mut meta = Meta::read(&dir, &vid)
                .map_err(|e| Error::InvalidArgument(format!("volume {id}: {}", chain_message(&e))))?;
            meta.class.check_id(&vid)?;
            let presented = match (meta.presented, meta.presented_user.as_deref()) {
                (None, _) => None,
                (Some(_), None) => {
                    return Err(Error::InvalidArgument(format!(
                        "volume {id} is presented as another user but records no user name, so it cannot be \
                         re-resolved on this machine"
                    )));
                }
                (Some(_), Some(name)) => {
                    let user = nix::unistd::User::from_name(name).ok().flatten().ok_or_else(|| {
                        backend(Code::FailedPrecondition, format!("volume {id} is presented as {name:?}: no such user"))
                    })?;
                    let puid = user.uid.as_raw();
                    if !self.ctx.policy().allows_present_as(self.who, id, puid) {
                        return Err(backend(
                            Code::PermissionDenied,
                            format!("volume {id}: presenting it as {name:?} is not allowed for this caller"),
                        ));
                    }
                    Some((puid, user.gid.as_raw(), name.to_string()))
                }
            };
            meta.owner_uid = uid;
            meta.owner_gid = gid;
            meta.presented = presented.as_ref().map(|(u, g, _)| (*u, *g)).filter(|p| *p != (uid, gid));
            meta.presented_user = presented.map(|(_, _, n)| n).filter(|_| meta.presented.is_some());
            // Root's 0600, as CreateVolume writes it.
            meta.write(&dir)?;
            let (duid, dgid) = meta.presented_as();
            let data = dir.join("data");
            if data.is_dir() {
                chown_tree(&data, duid, dgid).map_err(io_err("chown", &data))?;
            }
            let journal = staged.join("volumes").join(id);
            if journal.is_dir() {
                chown_tree(&journal, uid, gid).map_err(io_err("chown", &journal))?;
            }
        }
        let keyset = staged.join(piccolo_keyset::KEYSET_RELATIVE_PATH);
        if info.kind == ExportKind::Full {
            chown_durably(&keyset, uid, gid).map_err(io_err("chown", &keyset))?;
        }
        Ok(())
    }
}

impl ImportHooks for Hooks<'_> {
    fn manifest(&mut self, info: &ManifestInfo) -> piccolo_keyset::Result<()> {
        self.judge(info).map_err(refuse)
    }
    fn staged(&mut self, staged: &Path, info: &ManifestInfo) -> piccolo_keyset::Result<()> {
        self.reown(staged, info).map_err(refuse)
    }
}

/// Finishes or discards an import a crash interrupted (called at start, before serving).
pub fn recover_at_start(state_dir: &Path) -> Result<usize, String> {
    if !state_dir.is_dir() {
        return Ok(0);
    }
    piccolo_keyset::recover_interrupted_import(state_dir).map_err(|e| chain_message(&e))
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportArchiveResponse, Status>> + Send>>;

/// The `Archive` service.
pub struct ArchiveSvc {
    ctx: Shared,
    vols: Arc<vol::Volumes>,
}

impl ArchiveSvc {
    /// Shares the `Volumes` (and its lock) of the Volumes service.
    pub fn new(ctx: Shared, vols: Arc<vol::Volumes>) -> Self {
        ArchiveSvc { ctx, vols }
    }
}

fn export_blocking(
    vols: &vol::Volumes,
    ctx: &Shared,
    who: &Identity,
    req: &ExportArchiveRequest,
    mut out: ChunkWriter,
) -> Result<ArchiveSummary, Error> {
    let kind = kind_of(req.kind)?;
    let ids = check_ids(ctx, who, Rpc::ExportArchive, &req.volume_ids)?;
    // No mount may start while the ciphertext is read.
    let _x = vols.exclusive();
    let state = vols.state_dir().to_path_buf();
    check_owned_dir(&state.join("crypto"), who)?;
    for id in &ids {
        if !check_owner(vols, id, who)? {
            return Err(vol::Error::NotFound(id.to_string()).into());
        }
        check_unmounted(vols, id)?;
    }
    let names: Vec<&str> = ids.iter().map(VolumeId::as_str).collect();
    let s = piccolo_keyset::write_export(&state, kind, &names, &mut out).map_err(keyset_error)?;
    out.flush().map_err(|source| keyset_error(piccolo_keyset::Error::WriteArchive { source }))?;
    Ok(ArchiveSummary {
        kind: kind_pb(kind).into(),
        volume_ids: s.volumes,
        key_id: s.key_id,
        files: s.files,
        dirs: s.dirs,
        symlinks: s.symlinks,
        content_bytes: s.content_bytes,
        archive_bytes: out.bytes,
        archive_sha256: hex::encode(out.hasher.clone().finalize()),
        trailer_sha256: s.archive_sha256,
    })
}

fn state_dir_of(vols: &vol::Volumes) -> PathBuf {
    vols.state_dir().to_path_buf()
}

#[tonic::async_trait]
impl Archive for ArchiveSvc {
    type ExportArchiveStream = ExportStream;

    async fn export_archive(
        &self,
        req: Request<ExportArchiveRequest>,
    ) -> Result<Response<Self::ExportArchiveStream>, Status> {
        let identity = Identity::of_request(&req)?;
        let r = req.into_inner();
        let args = json!({
            "kind": pb::ExportKind::try_from(r.kind).map(|k| k.as_str_name()).unwrap_or("unknown"),
            "volume_ids": ids_arg(&r.volume_ids),
        });
        let constraint = constraint_of(&self.ctx, &identity, Rpc::ExportArchive, &r.volume_ids);
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (ctx, vols) = (self.ctx.clone(), self.vols.clone());
        // The guard runs the whole export; the stream returns at once so the client can read.
        tokio::spawn(async move {
            let data_tx = tx.clone();
            let result = run(&ctx, Rpc::ExportArchive, identity, args, constraint, move |ctx, who| async move {
                let rt = tokio::runtime::Handle::current();
                let out = ChunkWriter { tx: data_tx, rt, buf: Vec::new(), hasher: Sha256::new(), bytes: 0 };
                let (c, w) = (ctx.clone(), who.clone());
                let summary = blocking(move || export_blocking(&vols, &c, &w, &r, out)).await?;
                // The outcome record cannot carry results, so an event records what left.
                let rec = Entry {
                    caller: Some(who.caller()),
                    ..Entry::event(
                        "archive.exported",
                        json!({
                            "kind": pb::ExportKind::try_from(summary.kind).map(|k| k.as_str_name()).unwrap_or("unknown"),
                            "volume_ids": summary.volume_ids,
                            "bytes": summary.archive_bytes,
                            "archive_sha256": summary.archive_sha256,
                        }),
                    )
                };
                ctx.audit.append(rec).await.map_err(Error::Audit)?;
                Ok(summary)
            })
            .await;
            // Only a stream that ends in the summary is an archive.
            let last = result.map(|s| ExportArchiveResponse { msg: Some(ExportMsg::Summary(s)) });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import_archive(
        &self,
        req: Request<Streaming<ImportArchiveRequest>>,
    ) -> Result<Response<ImportArchiveResponse>, Status> {
        let identity = Identity::of_request(&req)?;
        let mut stream = req.into_inner();
        let header = match tokio::time::timeout(HEADER_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(ImportArchiveRequest { msg: Some(ImportMsg::Header(h)) }))) => Ok(h.volume_ids),
            Ok(Err(s)) => Err(Error::InvalidArgument(format!("client stream: {}", s.message()))),
            Err(_) => Err(Error::InvalidArgument("no header within 30 s".into())),
            Ok(_) => Err(Error::InvalidArgument("the first message must be the header (volume ids)".into())),
        };
        let declared = header.as_ref().map(|h| h.as_slice()).unwrap_or_default();
        let args = json!({ "volume_ids": ids_arg(declared) });
        let constraint = constraint_of(&self.ctx, &identity, Rpc::ImportArchive, declared);
        let vols = self.vols.clone();
        let resp = run(&self.ctx, Rpc::ImportArchive, identity, args, constraint, move |ctx, who| async move {
            let declared = header?;
            check_ids(&ctx, &who, Rpc::ImportArchive, &declared)?;
            let (reader, fwd) = forward_chunks(stream, |m: ImportArchiveRequest| match m.msg {
                Some(ImportMsg::Chunk(c)) => Some(c),
                _ => None,
            });
            let limits = ctx.config.file.volumes.import_limits();
            let (c, w) = (ctx.clone(), who.clone());
            let report = blocking(move || {
                // No mount may start between the not-mounted check and the swap.
                let _x = vols.exclusive();
                let mut hooks = Hooks { ctx: &c, who: &w, vols: &vols, declared };
                piccolo_keyset::import_with_hooks(reader, &state_dir_of(&vols), &limits, &mut hooks)
                    .map_err(keyset_error)
            })
            .await;
            fwd.abort();
            let r = report?;
            let rec = Entry {
                caller: Some(who.caller()),
                ..Entry::event(
                    "archive.imported",
                    json!({
                        "kind": r.kind.name(),
                        "volume_ids": r.volumes,
                        "files": r.files,
                        "bytes": r.bytes,
                        "keyset_replaced": r.keyset_replaced,
                        "orphaned_volumes": r.orphaned_volumes,
                    }),
                )
            };
            ctx.audit.append(rec).await.map_err(Error::Audit)?;
            Ok(ImportArchiveResponse {
                kind: kind_pb(r.kind).into(),
                volume_ids: r.volumes,
                created: r.created,
                key_id: r.key_id,
                files: r.files,
                bytes: r.bytes,
                keyset_replaced: r.keyset_replaced,
                orphaned_volumes: r.orphaned_volumes,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }
}
