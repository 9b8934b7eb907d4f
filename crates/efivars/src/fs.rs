// SPDX-License-Identifier: Apache-2.0
//! Reading, writing and deleting variables under an efivarfs root (or a plain directory
//! standing in for one), with the careful write algorithm of rhboot/efivar:
//!
//! 1. names longer than 1024 bytes are refused ([`crate::VarName`]);
//! 2. `open(O_RDONLY)` first; if the variable exists, `fstat` records (dev, ino) and
//!    `FS_IMMUTABLE_FL` is cleared on this fd (the flag can only be cleared read-only);
//! 3. `open(O_WRONLY | (append? O_APPEND) | (new? O_CREAT|O_EXCL))`;
//! 4. new file: clear the immutable flag the kernel may have set on create; existing file:
//!    compare (dev, ino) of both fds, so a file replaced in between is never written;
//! 5. one `write()` of attributes ‖ data (the kernel wants the whole variable at once);
//! 6. on failure, `unlink` the file if this call created it;
//! 7. restore the original flags.
//!
//! Deleting clears the immutable flag and unlinks. Every path is resolved relative to one
//! directory fd opened at [`Efivars::open`], with `O_NOFOLLOW`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::codec::{self, Attributes, MAX_DATA_BYTES, Variable};
use crate::{Error, VarId};

/// `EFIVARFS_MAGIC` from `linux/magic.h`.
pub const EFIVARFS_MAGIC: u32 = 0xde5e_81e4;
/// `SYSFS_MAGIC`: `/sys/firmware/efi/efivars` without efivarfs mounted on it.
const SYSFS_MAGIC: u32 = 0x6265_6572;
/// `FS_IMMUTABLE_FL` from `linux/fs.h`.
const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Serialises writes and deletes within this process: two writers of one variable would
/// otherwise see each other's cleared flag, and the second could fail to open it for
/// writing once the first restored the flag.
static WRITERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn writer_lock() -> std::sync::MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic in another writer leaves nothing inconsistent here.
    WRITERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the root turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// A mounted efivarfs (statfs magic `EFIVARFS_MAGIC`): writes reach the firmware.
    Efivarfs,
    /// Any other directory (test machines, development): same file format and algorithm;
    /// the file is also cut to the new length after a write, which efivarfs does itself.
    PlainDirectory,
}

/// An opened efivarfs root.
#[derive(Debug)]
pub struct Efivars {
    root: PathBuf,
    dir: OwnedFd,
    kind: RootKind,
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `FS_IOC_GETFLAGS`; `None` on a filesystem without inode flags (nothing can be immutable).
fn get_flags(fd: BorrowedFd<'_>) -> Result<Option<libc::c_int>, Errno> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's `put_user(flags, (int __user *)arg)`,
    // despite the `long` in its _IOR definition) to the pointer, which points at a live c_int;
    // the fd is borrowed and open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags as *mut libc::c_int) };
    match Errno::result(r) {
        Ok(_) => Ok(Some(flags)),
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `FS_IOC_SETFLAGS`.
fn set_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer, which points at a live c_int;
    // the fd is borrowed and open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags as *const libc::c_int) };
    Errno::result(r).map(drop)
}

/// Test points inside [`Efivars::set`]: tests stand in for a concurrent writer or for the
/// kernel there. Production code passes [`Hooks::none`].
pub(crate) struct Hooks<'a> {
    /// After step 2, before step 3.
    pub between_opens: &'a mut dyn FnMut(),
    /// Right after step 3 created a new file, before step 4 (the kernel may set the
    /// immutable flag there).
    pub after_create: &'a mut dyn FnMut(),
}

impl Hooks<'_> {
    fn none(f: impl FnOnce(&mut Hooks<'_>) -> Result<(), Error>) -> Result<(), Error> {
        f(&mut Hooks { between_opens: &mut || (), after_create: &mut || () })
    }
}

/// What steps 3 to 6 write, and where.
#[derive(Clone, Copy)]
struct WritePlan<'a> {
    name: &'a str,
    path: &'a Path,
    /// (dev, ino) recorded in step 2; `None` if the variable did not exist.
    existing: Option<(u64, u64)>,
    buf: &'a [u8],
    append: bool,
}

/// Flags to put back on an inode whose immutable flag this call cleared.
struct Cleared {
    fd: OwnedFd,
    flags: libc::c_int,
}

impl Efivars {
    /// Opens the root. A missing root, a non-directory, or the empty sysfs mount point of
    /// a machine whose efivarfs is not mounted is [`Error::NoEfi`].
    pub fn open(root: &Path) -> Result<Efivars, Error> {
        let no_efi = |reason| Error::NoEfi { root: root.to_path_buf(), reason };
        let dir = match nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(no_efi("does not exist")),
            Err(Errno::ENOTDIR) => return Err(no_efi("is not a directory")),
            Err(e) => return Err(Error::OpenRoot { root: root.to_path_buf(), source: io_err(e) }),
        };
        let fs = nix::sys::statfs::fstatfs(&dir)
            .map_err(|e| Error::OpenRoot { root: root.to_path_buf(), source: io_err(e) })?;
        // f_type's width and sign differ between architectures; the magic is 32 bits.
        let magic = i128::from(fs.filesystem_type().0) & 0xffff_ffff;
        let kind = if magic == i128::from(EFIVARFS_MAGIC) {
            RootKind::Efivarfs
        } else if magic == i128::from(SYSFS_MAGIC) {
            return Err(no_efi("is on sysfs: efivarfs is not mounted there"));
        } else {
            RootKind::PlainDirectory
        };
        Ok(Efivars { root: root.to_path_buf(), dir, kind })
    }

    /// Whether the root is a real efivarfs.
    pub fn kind(&self) -> RootKind {
        self.kind
    }

    /// The root path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, id: &VarId) -> PathBuf {
        self.root.join(id.file_name())
    }

    /// Opens `name` read-only without following links or blocking on a FIFO.
    fn open_ro(&self, name: &str) -> Result<OwnedFd, Errno> {
        openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    fn stat_regular(&self, fd: BorrowedFd<'_>, path: &Path) -> Result<FileStat, Error> {
        let st = fstat(fd).map_err(|e| Error::Stat { path: path.to_path_buf(), source: io_err(e) })?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(Error::NotRegularFile { path: path.to_path_buf() });
        }
        Ok(st)
    }

    /// (dev, ino) of the directory entry `name` now, not following links.
    fn entry_id(&self, name: &str, path: &Path) -> Result<(u64, u64), Error> {
        let st = fstatat(&self.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| Error::Stat { path: path.to_path_buf(), source: io_err(e) })?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Clears `FS_IMMUTABLE_FL` on `fd` if it is set; returns what to restore (on a
    /// duplicate of `fd`).
    fn clear_immutable(fd: &OwnedFd, path: &Path) -> Result<Option<Cleared>, Error> {
        let flags =
            get_flags(fd.as_fd()).map_err(|e| Error::GetFlags { path: path.to_path_buf(), source: io_err(e) })?;
        match flags {
            Some(f) if f & FS_IMMUTABLE_FL != 0 => {
                let fd = fd.try_clone().map_err(|source| Error::GetFlags { path: path.to_path_buf(), source })?;
                set_flags(fd.as_fd(), f & !FS_IMMUTABLE_FL)
                    .map_err(|e| Error::ClearImmutable { path: path.to_path_buf(), source: io_err(e) })?;
                Ok(Some(Cleared { fd, flags: f }))
            }
            _ => Ok(None),
        }
    }

    /// Reads a variable.
    pub fn get(&self, id: &VarId) -> Result<Variable, Error> {
        let path = self.path(id);
        let fd = match self.open_ro(&id.file_name()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(Error::NotFound { path }),
            Err(Errno::ELOOP) => return Err(Error::NotRegularFile { path }),
            Err(e) => return Err(Error::OpenRead { path, source: io_err(e) }),
        };
        self.stat_regular(fd.as_fd(), &path)?;
        let limit = 4 + MAX_DATA_BYTES;
        let mut bytes = Vec::new();
        File::from(fd)
            .take(u64::try_from(limit + 1).unwrap_or(u64::MAX))
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Read { path: path.clone(), source })?;
        if bytes.len() > limit {
            return Err(Error::VariableTooLarge { path, max: MAX_DATA_BYTES });
        }
        codec::decode(&bytes)
    }

    /// Writes (creates or replaces) a variable with the careful algorithm (module docs).
    pub fn set(&self, id: &VarId, attributes: Attributes, data: &[u8]) -> Result<(), Error> {
        Hooks::none(|h| self.set_with(id, attributes, data, h))
    }

    /// [`Efivars::set`] with test points.
    pub(crate) fn set_with(
        &self,
        id: &VarId,
        attributes: Attributes,
        data: &[u8],
        hooks: &mut Hooks<'_>,
    ) -> Result<(), Error> {
        // Validate everything before touching anything.
        let buf = codec::encode(attributes, data)?;
        let append = attributes.has(Attributes::APPEND_WRITE);
        if append && self.kind == RootKind::PlainDirectory {
            return Err(Error::Unsupported { what: "an append write", root: self.root.clone() });
        }
        let name = id.file_name();
        let path = self.path(id);
        let _writer = writer_lock();

        // Step 2: read-only open; record identity, clear the immutable flag. The fd stays
        // open until the end, so the inode (and its number) cannot be reused meanwhile.
        let mut existing: Option<(u64, u64)> = None;
        let mut cleared: Option<Cleared> = None;
        let _rfd = match self.open_ro(&name) {
            Ok(fd) => {
                let st = self.stat_regular(fd.as_fd(), &path)?;
                existing = Some((st.st_dev, st.st_ino));
                cleared = Self::clear_immutable(&fd, &path)?;
                Some(fd)
            }
            Err(Errno::ENOENT) => None,
            Err(Errno::ELOOP) => return Err(Error::NotRegularFile { path }),
            Err(e) => return Err(Error::OpenRead { path, source: io_err(e) }),
        };
        (hooks.between_opens)();

        let plan = WritePlan { name: &name, path: &path, existing, buf: &buf, append };
        let result = self.write_steps(&plan, &mut cleared, hooks);
        // Step 7: restore the flags, unless the file this call created was removed again.
        let restored = match cleared {
            Some(c) => set_flags(c.fd.as_fd(), c.flags).map_err(io_err),
            None => Ok(()),
        };
        match (result, restored) {
            (result, Ok(())) => result,
            // A flag left cleared needs an operator more than the earlier failure does.
            (Ok(()), Err(source)) => Err(Error::RestoreFlags { path, written: true, source }),
            (Err(e), Err(source)) => {
                Err(Error::RestoreFlags { path, written: matches!(e, Error::Truncate { .. }), source })
            }
        }
    }

    /// Steps 3 to 6. On return `cleared` holds the flags still to restore.
    fn write_steps(
        &self,
        w: &WritePlan<'_>,
        cleared: &mut Option<Cleared>,
        hooks: &mut Hooks<'_>,
    ) -> Result<(), Error> {
        let WritePlan { name, path, existing, buf, append } = *w;
        // Step 3.
        let mut flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if append {
            flags |= OFlag::O_APPEND;
        }
        if existing.is_none() {
            flags |= OFlag::O_CREAT | OFlag::O_EXCL;
        }
        let wfd = openat(&self.dir, name, flags, Mode::from_bits_truncate(0o644))
            .map_err(|e| Error::OpenWrite { path: path.to_path_buf(), source: io_err(e) })?;
        let created = existing.is_none();
        if created {
            (hooks.after_create)();
        }

        // Step 4.
        let st = self.stat_regular(wfd.as_fd(), path)?;
        match existing {
            Some(id) if id != (st.st_dev, st.st_ino) => return Err(Error::Replaced { path: path.to_path_buf() }),
            Some(_) => {}
            None => match Self::clear_immutable(&wfd, path) {
                Ok(c) => *cleared = c,
                Err(e) => return Err(self.remove_created(name, path, (st.st_dev, st.st_ino), cleared, e)),
            },
        }

        // Step 5: the whole variable in one write().
        let written = match nix::unistd::write(&wfd, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(Error::ShortWrite { path: path.to_path_buf(), written: n, len: buf.len() }),
            Err(e) => Err(Error::Write { path: path.to_path_buf(), source: io_err(e) }),
        };
        if let Err(e) = written {
            // Step 6.
            return Err(if created { self.remove_created(name, path, (st.st_dev, st.st_ino), cleared, e) } else { e });
        }
        if self.kind == RootKind::PlainDirectory {
            // efivarfs replaces the variable whole; a plain file keeps any longer old tail.
            let len = libc::off_t::try_from(buf.len()).unwrap_or(libc::off_t::MAX);
            nix::unistd::ftruncate(&wfd, len)
                .and_then(|()| nix::unistd::fsync(&wfd))
                .map_err(|e| Error::Truncate { path: path.to_path_buf(), source: io_err(e) })?;
        }
        Ok(())
    }

    /// Step 6: unlinks the file this call created (if the name still refers to it); the
    /// inode is gone, so its flags are not restored.
    fn remove_created(
        &self,
        name: &str,
        path: &Path,
        ours: (u64, u64),
        cleared: &mut Option<Cleared>,
        cause: Error,
    ) -> Error {
        match self.entry_id(name, path) {
            Ok(now) if now == ours => {}
            // Someone else's file now: leave it (and our flags) alone.
            _ => return cause,
        }
        match unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                *cleared = None;
                cause
            }
            Err(e) => Error::Cleanup { path: path.to_path_buf(), write: Box::new(cause), source: io_err(e) },
        }
    }

    /// Deletes a variable: clears the immutable flag, checks the name still refers to the
    /// file examined, unlinks. On failure the flag is put back.
    pub fn delete(&self, id: &VarId) -> Result<(), Error> {
        self.delete_with(id, &mut || ())
    }

    /// [`Efivars::delete`] with `after_clear` run once the flag is cleared, before the name
    /// is checked and unlinked (tests replace the file there).
    pub(crate) fn delete_with(&self, id: &VarId, after_clear: &mut dyn FnMut()) -> Result<(), Error> {
        let name = id.file_name();
        let path = self.path(id);
        let _writer = writer_lock();
        let fd = match self.open_ro(&name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(Error::NotFound { path }),
            Err(Errno::ELOOP) => return Err(Error::NotRegularFile { path }),
            Err(e) => return Err(Error::OpenRead { path, source: io_err(e) }),
        };
        let st = self.stat_regular(fd.as_fd(), &path)?;
        let cleared = Self::clear_immutable(&fd, &path)?;
        after_clear();
        let result = match self.entry_id(&name, &path) {
            Ok(now) if now != (st.st_dev, st.st_ino) => Err(Error::Replaced { path: path.clone() }),
            Ok(_) => unlinkat(&self.dir, name.as_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| Error::Unlink { path: path.clone(), source: io_err(e) }),
            Err(e) => Err(e),
        };
        if let (Err(_), Some(c)) = (&result, &cleared)
            && let Err(e) = set_flags(c.fd.as_fd(), c.flags)
        {
            return Err(Error::RestoreFlags { path, written: false, source: io_err(e) });
        }
        result
    }
}
