// SPDX-License-Identifier: Apache-2.0
//! gocryptfs volumes, root side: create, mount with the key on stdin, verify, unmount, status.
//!
//! **Owns:** `ciphertext/<id>/` (the volume: `piccolo.volume.json` with class and key check,
//! and `data/`, the gocryptfs directory with `gocryptfs.conf`) and `mounts/<id>/` (the
//! plaintext mountpoint) under the configured state directory, and every gocryptfs process
//! serving them. Used by the broker, which authorises callers; this crate trusts its caller.
//!
//! **Must never:** put a key in argv, the environment, a file, a log line or an error (keys
//! live in [`Key`], zeroed on drop, and reach gocryptfs only on stdin); build a path from
//! anything but the state dir and a validated [`VolumeId`]; report a mount as done before the
//! key was verified and the mount is in the mount table; hide files that sit in an
//! unmounted mountpoint by mounting over them.
//!
//! Layout (`$PICCOLO_STATE_DIR`, default `/var/lib/piccolo`):
//! ```text
//! ciphertext/                 0700 root
//!   <id>/                     0700 root
//!     piccolo.volume.json     0600 root   format, id, class, owner, created, key check
//!     data/                   0700 owner  gocryptfs -init'ed; its mode is the mount root's;
//!                                         files inside are created as the owner
//! mounts/                     0755 root
//!   <id>/                     0700 owner  empty unless mounted
//! ```
//! The owner is the user that created the volume; only it may mount it. A volume may be
//! created *presented* as another user (application volumes: created and mounted by the
//! persistence owner, which holds the keys, used by the apps worker): `data/`, the
//! mountpoint and every file then appear as that user's, recorded in the metadata. gocryptfs runs as
//! root with `-allow_other` (so other users can reach the mount at all, and the kernel
//! checks permissions with `default_permissions`) and then creates every file as the
//! calling user (per-thread setreuid, which needs CAP_SETUID/CAP_SETGID), so the ciphertext
//! tree belongs to the owner; `ciphertext/<id>/` stays root's 0700, so no one else reaches it.
//! The gocryptfs password of a volume is the lowercase hex of its 32-byte key, so an
//! operator can open it by hand: `gocryptfs ciphertext/<id>/data /mnt` and type the hex.

mod error;
mod gocryptfs;
mod id;
pub mod meta;
pub mod observe;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use error::{Code, Error};
pub use gocryptfs::Runner;
pub use id::{APP_PREFIX, Class, Key, VolumeId};
use meta::Meta;

/// Directory of the sealed volumes under the state dir.
pub const CIPHERTEXT_DIR: &str = "ciphertext";
/// Directory of the mountpoints under the state dir.
pub const MOUNTS_DIR: &str = "mounts";
/// The gocryptfs directory inside `ciphertext/<id>/`.
pub const DATA_DIR: &str = "data";

/// What status reports about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Id.
    pub id: VolumeId,
    /// Class recorded at creation.
    pub class: Class,
    /// A gocryptfs mount is on `mounts/<id>`.
    pub mounted: bool,
    /// `mounts/<id>`.
    pub mountpoint: PathBuf,
    /// The live gocryptfs process serving it.
    pub pid: Option<u32>,
    /// Mounted but no gocryptfs serves it (killed): the mount is dead and needs repair.
    pub needs_repair: bool,
    /// The uid files are presented as (from the serving process; unmounted: the recorded
    /// presented user, else the owner).
    pub owner_uid: Option<u32>,
}

/// The volumes under one state directory.
pub struct Volumes {
    state_dir: PathBuf,
    runner: Runner,
    /// Serialises every create/mount/unmount: each takes tens of milliseconds, and two
    /// interleaved mounts of one volume must not race on the mountpoint.
    lock: Mutex<()>,
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(Error::io("fsync", dir))
}

/// Makes `path` a real directory (not a symlink), created with `mode` if missing; with
/// `enforce`, an existing one gets `mode` too.
fn ensure_root_dir(path: &Path, mode: u32, enforce: bool) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && !enforce => return Ok(()),
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::NotADirectory(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(mode).create(path).map_err(Error::io("mkdir", path))?;
            if let Some(parent) = path.parent() {
                fsync_dir(parent)?;
            }
        }
        Err(e) => return Err(Error::io("stat", path)(e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", path))
}

impl Volumes {
    /// Volumes under `state_dir` (absolute), run with `runner`.
    pub fn new(state_dir: impl Into<PathBuf>, runner: Runner) -> Volumes {
        Volumes { state_dir: state_dir.into(), runner, lock: Mutex::new(()) }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `ciphertext/<id>`.
    pub fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.state_dir.join(CIPHERTEXT_DIR).join(id.as_str())
    }

    /// `ciphertext/<id>/data`, the gocryptfs directory.
    pub fn data_dir(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join(DATA_DIR)
    }

    /// `mounts/<id>`.
    pub fn mountpoint(&self, id: &VolumeId) -> PathBuf {
        self.state_dir.join(MOUNTS_DIR).join(id.as_str())
    }

    /// Takes the lock every create/mount/unmount takes, for a caller that reads or replaces
    /// ciphertext itself (the broker's export and import) and must not race a mount.
    pub fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.guard()
    }

    /// The metadata of volume `id` ([`Error::NotFound`] if it does not exist).
    pub fn metadata(&self, id: &VolumeId) -> Result<Meta, Error> {
        self.meta(id)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data, only ordering: a poisoned one is still usable.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ensure_layout(&self) -> Result<(), Error> {
        if !self.state_dir.is_absolute() {
            return Err(Error::NotADirectory(self.state_dir.clone()));
        }
        // The state dir is shared with the persistence owner: created if missing, else left
        // as the image (tmpfiles.d) made it. Workers must be able to traverse it to reach
        // their mountpoints.
        ensure_root_dir(&self.state_dir, 0o755, false)?;
        ensure_root_dir(&self.state_dir.join(CIPHERTEXT_DIR), 0o700, true)?;
        ensure_root_dir(&self.state_dir.join(MOUNTS_DIR), 0o755, true)
    }

    fn meta(&self, id: &VolumeId) -> Result<Meta, Error> {
        let dir = self.volume_dir(id);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Meta::read(&dir, id),
            Ok(_) => Err(Error::NotADirectory(dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(id.to_string())),
            Err(e) => Err(Error::io("stat", dir)(e)),
        }
    }

    /// Creates volume `id` owned by `uid:gid`: `gocryptfs -init` under `key` in a staging
    /// directory, the metadata beside it, then one rename into `ciphertext/<id>` (all
    /// fsynced), so a crash leaves either no volume or a complete one.
    pub fn create(&self, id: &VolumeId, class: Class, key: &Key, uid: u32, gid: u32) -> Result<(), Error> {
        self.create_presented(id, class, key, (uid, gid), None)
    }

    /// [`Volumes::create`] with the files presented as `presented` (uid, gid) when mounted
    /// (`None`: the owner). The owner alone may mount it; `data/` and the mountpoint belong
    /// to the presented user, so files it creates through the mount are its own.
    pub fn create_presented(
        &self,
        id: &VolumeId,
        class: Class,
        key: &Key,
        (uid, gid): (u32, u32),
        presented: Option<(u32, u32)>,
    ) -> Result<(), Error> {
        self.create_presented_as(id, class, key, (uid, gid), presented.map(|(u, g)| (u, g, None)))
    }

    /// [`Volumes::create_presented`] that also records the presented user's name (so an
    /// import on other hardware can re-resolve its uid:gid).
    pub fn create_presented_as(
        &self,
        id: &VolumeId,
        class: Class,
        key: &Key,
        (uid, gid): (u32, u32),
        presented: Option<(u32, u32, Option<&str>)>,
    ) -> Result<(), Error> {
        let presented_user = presented.and_then(|(_, _, n)| n).map(str::to_string);
        let presented = presented.map(|(u, g, _)| (u, g));
        class.check_id(id)?;
        let _g = self.guard();
        self.ensure_layout()?;
        let dir = self.volume_dir(id);
        match std::fs::symlink_metadata(&dir) {
            Ok(_) => return Err(Error::AlreadyExists(id.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", dir)(e)),
        }
        let parent = self.state_dir.join(CIPHERTEXT_DIR);
        // A leftover from a crash during an earlier create of this id (never a live volume:
        // the name cannot be a valid id because of the leading dot).
        let staging = parent.join(format!(".creating-{id}"));
        if std::fs::symlink_metadata(&staging).is_ok() {
            std::fs::remove_dir_all(&staging).map_err(Error::io("remove stale", &staging))?;
        }
        let result = (|| {
            std::fs::DirBuilder::new().mode(0o700).create(&staging).map_err(Error::io("mkdir", &staging))?;
            let data = staging.join(DATA_DIR);
            std::fs::DirBuilder::new().mode(0o700).create(&data).map_err(Error::io("mkdir", &data))?;
            self.runner.init(&data, key)?;
            for f in ["gocryptfs.conf", "gocryptfs.diriv"] {
                let p = data.join(f);
                std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(Error::io("fsync", &p))?;
            }
            let (puid, pgid) = presented.unwrap_or((uid, gid));
            std::os::unix::fs::chown(&data, Some(puid), Some(pgid)).map_err(Error::io("chown", &data))?;
            fsync_dir(&data)?;
            let mut meta = Meta::new(id, class, key, uid, gid);
            meta.presented = presented.filter(|p| *p != (uid, gid));
            meta.presented_user = presented_user.filter(|_| meta.presented.is_some());
            meta.write(&staging)?;
            std::fs::rename(&staging, &dir).map_err(Error::io("rename", &dir))?;
            fsync_dir(&parent)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    /// Mounts volume `id` for its owner `uid` (files presented as the recorded presented
    /// user, else the owner) and returns the mountpoint and gocryptfs pid.
    ///
    /// Another uid is [`Error::NotOwner`]. The key is checked against the metadata first,
    /// then gocryptfs checks it again (a wrong password exits 12); either way
    /// [`Error::WrongKey`] and nothing mounted.
    /// Already mounted for the same uid by a live gocryptfs: returns it as is. A dead mount
    /// (gocryptfs gone) is detached first. `mounts/<id>` is made 0700 `uid:gid` and must be
    /// empty.
    pub fn mount(&self, id: &VolumeId, key: &Key, uid: u32) -> Result<(PathBuf, Option<u32>), Error> {
        let _g = self.guard();
        let meta = self.meta(id)?;
        if meta.owner_uid != uid {
            return Err(Error::NotOwner { id: id.to_string(), owner: meta.owner_uid });
        }
        if !meta.key_matches(key, id) {
            return Err(Error::WrongKey);
        }
        let (puid, pgid) = meta.presented_as();
        self.ensure_layout()?;
        let mnt = self.mountpoint(id);
        let data = self.data_dir(id);
        let st = self.observe(id, &meta);
        if st.mounted && !st.needs_repair {
            return match st.owner_uid {
                Some(o) if o == puid => Ok((mnt, st.pid)),
                o => Err(Error::MountedForOther { id: id.to_string(), owner: o.unwrap_or(u32::MAX) }),
            };
        }
        self.detach(id, &st)?;
        prepare_mountpoint(&mnt, puid, pgid)?;
        if let Err(e) = self.runner.mount(&data, &mnt, puid, pgid, key) {
            // Whatever half-happened (a timeout, a daemon that mounted late) is undone.
            let st = self.observe(id, &meta);
            let _ = self.detach(id, &st);
            return Err(e);
        }
        let st = self.observe(id, &meta);
        if !st.mounted || st.needs_repair {
            let _ = self.detach(id, &st);
            return Err(Error::MountMissing(mnt));
        }
        Ok((mnt, st.pid))
    }

    /// Unmounts volume `id`; an unmounted volume is not an error. A dead mount is detached
    /// lazily (nothing can serve plaintext through it); a live one that is busy is refused.
    pub fn unmount(&self, id: &VolumeId) -> Result<(), Error> {
        let _g = self.guard();
        let meta = self.meta(id)?;
        let st = self.observe(id, &meta);
        self.detach(id, &st)
    }

    /// Observed state of volume `id`.
    pub fn status(&self, id: &VolumeId) -> Result<Status, Error> {
        let meta = self.meta(id)?;
        Ok(self.observe(id, &meta))
    }

    /// Every volume under `ciphertext/` (entries that are not valid ids are skipped).
    pub fn list(&self) -> Result<Vec<Status>, Error> {
        let parent = self.state_dir.join(CIPHERTEXT_DIR);
        let rd = match std::fs::read_dir(&parent) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", parent)(e)),
        };
        let mut ids: Vec<VolumeId> = rd.filter_map(|e| VolumeId::parse(e.ok()?.file_name().to_str()?).ok()).collect();
        ids.sort();
        ids.iter().map(|id| self.status(id)).collect()
    }

    fn observe(&self, id: &VolumeId, meta: &Meta) -> Status {
        let mnt = self.mountpoint(id);
        let data = self.data_dir(id);
        let mounted = observe::mounts_on(&mnt).iter().any(|m| m.fstype == observe::FSTYPE);
        let daemon = observe::daemons(&data, &mnt).into_iter().next();
        let owner_uid = daemon.as_ref().and_then(|d| d.owner_uid).or(Some(meta.presented_as().0));
        Status {
            id: id.clone(),
            class: meta.class,
            mounted,
            needs_repair: mounted && daemon.is_none(),
            pid: daemon.map(|d| d.pid),
            mountpoint: mnt,
            owner_uid,
        }
    }

    /// Unmounts whatever is on `mounts/<id>` and stops stray gocryptfs processes for it.
    fn detach(&self, id: &VolumeId, st: &Status) -> Result<(), Error> {
        use nix::mount::{MntFlags, umount2};
        let mnt = &st.mountpoint;
        // Stacked mounts (should not happen) are peeled one at a time.
        let mut busy_retries = 0;
        while !observe::mounts_on(mnt).is_empty() {
            let flags = if st.needs_repair { MntFlags::MNT_DETACH } else { MntFlags::empty() };
            match umount2(mnt.as_path(), flags) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
                // A reference can be transient (a file closed a moment ago, a process forked
                // while holding one): retry for about a second before calling it busy.
                Err(nix::errno::Errno::EBUSY) if busy_retries < 20 => {
                    busy_retries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(nix::errno::Errno::EBUSY) => return Err(Error::Busy(id.to_string())),
                Err(source) => return Err(Error::Unmount { path: mnt.clone(), source }),
            }
        }
        // gocryptfs exits by itself once unmounted; wait for it, then stop any straggler
        // (e.g. one whose mount never came up).
        let data = self.data_dir(id);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = observe::daemons(&data, mnt);
            if left.is_empty() {
                break;
            }
            let sig = if Instant::now() >= deadline {
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            if Instant::now() >= deadline + Duration::from_secs(2) {
                tracing::warn!(volume = %id, "gocryptfs did not exit after SIGKILL");
                break;
            }
            if observe::mounts_on(mnt).is_empty() {
                for d in &left {
                    if let Ok(pid) = i32::try_from(d.pid) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Makes `mnt` a real, empty directory, 0700 and owned by `uid:gid`. The parent
/// (`mounts/`) is root's 0755, so the owner cannot swap the directory for a symlink; the
/// owner and mode are set through a no-follow handle anyway.
fn prepare_mountpoint(mnt: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(mnt) {
        Ok(()) => {
            if let Some(p) = mnt.parent() {
                fsync_dir(p)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("mkdir", mnt)(e)),
    }
    let flags = (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_DIRECTORY).bits();
    let dir =
        std::fs::OpenOptions::new().read(true).custom_flags(flags).open(mnt).map_err(|e| match e.raw_os_error() {
            Some(libc_eloop) if libc_eloop == nix::errno::Errno::ELOOP as i32 => {
                Error::NotADirectory(mnt.to_path_buf())
            }
            Some(enotdir) if enotdir == nix::errno::Errno::ENOTDIR as i32 => Error::NotADirectory(mnt.to_path_buf()),
            _ => Error::io("open", mnt)(e),
        })?;
    std::os::unix::fs::fchown(&dir, Some(uid), Some(gid)).map_err(Error::io("chown", mnt))?;
    dir.set_permissions(std::fs::Permissions::from_mode(0o700)).map_err(Error::io("chmod", mnt))?;
    if std::fs::read_dir(mnt).map_err(Error::io("list", mnt))?.next().is_some() {
        return Err(Error::MountpointNotEmpty(mnt.to_path_buf()));
    }
    Ok(())
}
