// SPDX-License-Identifier: Apache-2.0
//! Installing an OS image onto a whole disk (the USB → SSD installer).
//!
//! Order, chosen so a failure never leaves a disk that looks installed:
//! 1. validate target and image exactly as [`crate::disks::plan_install`] does;
//! 2. for a file image, hash it first: a digest mismatch fails before the disk is touched;
//! 3. open the disk `O_EXCL` (the kernel refuses if anything has it mounted or held);
//! 4. zero the image's first and last MiB (where its GPT copies go) and the disk's old
//!    backup GPT (its last MiB, when past the image), fsync;
//! 5. write everything between, fsync, check the digest of the whole stream;
//! 6. write the image's last then first MiB, fsync;
//! 7. read everything back from the device (page cache dropped) and compare: byte for byte
//!    against the file, or by digest for a streamed image.
//!
//! A streamed image with a wrong digest (or a crash) before step 6 leaves no valid GPT on the
//! disk, so it can never be mistaken for (or booted as) an installed system.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use sha2::{Digest, Sha256};

use crate::disks::{DiskConfig, ImageSpec, plan_install};
use crate::error::Error;
use crate::stream::{self, CHUNK, CopyErrors, Dest, Sha256Digest};

/// The install's current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hashing the image file before writing.
    Checking,
    /// Writing to the disk.
    Writing,
    /// Reading back and comparing.
    Verifying,
}

/// A progress report: `done` of `total` bytes in `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// Bytes done in this phase.
    pub done: u64,
    /// Bytes this phase handles.
    pub total: u64,
}

/// Where the image bytes come from.
pub enum ImageSource<'a> {
    /// A file inside an allowed directory.
    File(PathBuf),
    /// Streamed by the caller.
    Stream {
        /// The bytes.
        reader: &'a mut dyn Read,
        /// Announced length.
        len: u64,
    },
}

/// What was installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// Target disk name.
    pub target: String,
    /// Bytes written.
    pub bytes: u64,
    /// SHA-256 of the image, as verified.
    pub sha256: Sha256Digest,
}

use crate::disks::GPT_REGION;

fn image_errs() -> CopyErrors {
    CopyErrors {
        read: |source| Error::ReadImage { source },
        write: |p, source| Error::WriteDisk { path: p.to_owned(), source },
    }
}

fn hash_file(f: &File, len: u64, progress: &mut dyn FnMut(Progress)) -> Result<Sha256Digest, Error> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        f.read_exact_at(&mut buf[..want], done).map_err(|source| Error::ReadImage { source })?;
        h.update(&buf[..want]);
        done += want as u64;
        progress(Progress { phase: Phase::Checking, done, total: len });
    }
    Ok(h.finalize().into())
}

/// Installs `image` onto the whole disk `target`, checking `expected_sha256`; see the module
/// doc for the order of steps. `progress` is called after every chunk.
pub fn install_to_disk(
    cfg: &DiskConfig,
    target: &str,
    image: ImageSource<'_>,
    expected_sha256: &Sha256Digest,
    progress: &mut dyn FnMut(Progress),
) -> Result<InstallReport, Error> {
    let spec = match &image {
        ImageSource::File(p) => ImageSpec::File(p.clone()),
        ImageSource::Stream { len, .. } => ImageSpec::Stream { len: *len },
    };
    let plan = plan_install(cfg, target, &spec)?;
    let len = plan.image_bytes;
    let mismatch = |actual: &Sha256Digest| Error::DigestMismatch {
        expected: hex::encode(expected_sha256),
        actual: hex::encode(actual),
    };

    let mut image_file = None;
    if let Some(p) = &plan.image_path {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(p)
            .map_err(|source| Error::OpenImage { path: p.clone(), source })?;
        let d = hash_file(&f, len, progress)?;
        if &d != expected_sha256 {
            return Err(mismatch(&d));
        }
        image_file = Some(f);
    }

    let dev_path = plan.target.dev_path.clone();
    let dev = OpenOptions::new().read(true).write(true).custom_flags(OFlag::O_EXCL.bits()).open(&dev_path).map_err(
        |source| match source.raw_os_error() {
            Some(libc_ebusy) if libc_ebusy == nix::errno::Errno::EBUSY as i32 => {
                Error::DiskInUse { name: plan.target.name.clone() }
            }
            _ => Error::OpenTarget { path: dev_path.clone(), source },
        },
    )?;

    // The GPT copies live in the image's first and last MiB; both are written last, and
    // zeroed first together with the disk's old backup GPT, so no valid table exists on
    // the disk until the whole image is on it.
    let hold = (len.min(GPT_REGION), len.saturating_sub(GPT_REGION).min(GPT_REGION));
    let mut zero_ranges = vec![(0, hold.0), (len - hold.1, hold.1)];
    zero_ranges.extend(plan.wiped_after_image);
    let write = |off: u64, data: &[u8]| {
        dev.write_all_at(data, off).map_err(|source| Error::WriteDisk { path: dev_path.clone(), source })
    };
    let sync = || dev.sync_all().map_err(|source| Error::SyncDisk { path: dev_path.clone(), source });
    for (off, n) in zero_ranges {
        // Each range is at most GPT_REGION (1 MiB), so it fits in usize.
        write(off, &vec![0u8; usize::try_from(n).unwrap_or(0)])?;
    }
    sync()?;

    let mut file_reader;
    let reader: &mut dyn Read = match image {
        ImageSource::File(_) => {
            // Present: plan_install resolved a path for a file image and it was opened above.
            file_reader = image_file
                .as_ref()
                .ok_or(Error::ImageEmpty)?
                .try_clone()
                .map_err(|source| Error::OpenImage { path: plan.image_path.clone().unwrap_or_default(), source })?;
            &mut file_reader
        }
        ImageSource::Stream { reader, .. } => reader,
    };
    let dest = Dest { file: &dev, path: &dev_path, offset: 0, len };
    let (digest, held) = stream::copy_exact(reader, &dest, hold, &image_errs(), &mut |done| {
        progress(Progress { phase: Phase::Writing, done, total: len })
    })?;
    if &digest != expected_sha256 {
        return Err(mismatch(&digest));
    }
    write(len - hold.1, &held.tail)?;
    write(0, &held.head)?;
    sync()?;

    let mut verify = |done| progress(Progress { phase: Phase::Verifying, done, total: len });
    match &image_file {
        Some(f) => {
            if let Some(offset) = stream::compare_back(f, &dev, &dev_path, len, &mut verify)? {
                return Err(Error::ReadBackMismatch { path: dev_path, offset: Some(offset) });
            }
        }
        None => {
            if stream::hash_back(&dev, &dev_path, 0, len)? != digest {
                return Err(Error::ReadBackMismatch { path: dev_path, offset: None });
            }
            verify(len);
        }
    }
    Ok(InstallReport { target: plan.target.name, bytes: len, sha256: digest })
}
