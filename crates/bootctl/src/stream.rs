// SPDX-License-Identifier: Apache-2.0
//! Bounded, hashed copies onto a disk and the read-back that proves they landed.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// Chunk size for copies and read-back (also the broker's maximum stream chunk).
pub const CHUNK: usize = 1 << 20;

/// Parses 64 hex digits into a digest.
pub fn parse_sha256(text: &str) -> Result<Sha256Digest, Error> {
    let mut d = [0u8; 32];
    if text.len() != 64 {
        return Err(Error::InvalidDigest);
    }
    hex::decode_to_slice(text, &mut d).map_err(|_| Error::InvalidDigest)?;
    Ok(d)
}

/// Reads until `buf` is full or the reader ends; retries interrupted reads.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// How a copy reports read and write failures (payload vs image wording).
pub(crate) struct CopyErrors {
    pub read: fn(io::Error) -> Error,
    pub write: fn(&Path, io::Error) -> Error,
}

/// Where a copy goes: `len` bytes at `offset` of `file`.
#[derive(Clone, Copy)]
pub(crate) struct Dest<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub offset: u64,
    pub len: u64,
}

/// Bytes a copy held back instead of writing.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The first `hold.0` bytes.
    pub head: Vec<u8>,
    /// The last `hold.1` bytes.
    pub tail: Vec<u8>,
}

/// Copies exactly `len` bytes from `src` to `file` at `offset`, hashing as it goes, then
/// fsyncs. Never writes outside `[offset, offset + len)`. Fails if the source is shorter or
/// longer. The first `hold.0` and last `hold.1` bytes are hashed and returned, not written
/// (the installer writes both GPT copies last); `progress` gets the bytes done so far.
pub(crate) fn copy_exact(
    src: &mut dyn Read,
    dst: &Dest<'_>,
    hold: (u64, u64),
    errs: &CopyErrors,
    progress: &mut dyn FnMut(u64),
) -> Result<(Sha256Digest, Held), Error> {
    let Dest { file, path, offset, len } = *dst;
    let head_end = hold.0.min(len);
    let tail_start = len.saturating_sub(hold.1).max(head_end);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done: u64 = 0;
    let mut held = Held::default();
    while done < len {
        let want = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = read_full(src, &mut buf[..want]).map_err(errs.read)?;
        if n == 0 {
            return Err(Error::PayloadShort { expected: len, received: done });
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        // Split the chunk [done, done + n) at head_end and tail_start (both clamped into it).
        let end = done + n as u64;
        let cut = |at: u64| usize::try_from(at.clamp(done, end) - done).unwrap_or(n);
        let (h, t) = (cut(head_end), cut(tail_start));
        held.head.extend_from_slice(&chunk[..h]);
        if h < t {
            file.write_all_at(&chunk[h..t], offset + done + h as u64).map_err(|e| (errs.write)(path, e))?;
        }
        held.tail.extend_from_slice(&chunk[t..]);
        done = end;
        progress(done);
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe).map_err(errs.read)? != 0 {
        return Err(Error::PayloadTooLong { expected: len });
    }
    file.sync_all().map_err(|source| Error::SyncDisk { path: path.to_owned(), source })?;
    Ok((hasher.finalize().into(), held))
}

/// Asks the kernel to drop cached pages of a range so the next read comes from the device.
fn drop_cache(file: &File, offset: u64, len: u64) {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // Advisory: on failure the read-back still checks what the kernel returns.
    let _ = posix_fadvise(file, o, l, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Re-reads `[offset, offset + len)` from the device (cache dropped first) and hashes it.
pub(crate) fn hash_back(file: &File, path: &Path, offset: u64, len: u64) -> Result<Sha256Digest, Error> {
    drop_cache(file, offset, len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        file.read_exact_at(&mut buf[..want], offset + done)
            .map_err(|source| Error::ReadBack { path: path.to_owned(), source })?;
        hasher.update(&buf[..want]);
        done += want as u64;
    }
    Ok(hasher.finalize().into())
}

/// Compares `[0, len)` of `dev` (cache dropped first) with `src` byte for byte.
/// Returns the offset of the first difference.
pub(crate) fn compare_back(
    src: &File,
    dev: &File,
    dev_path: &Path,
    len: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<u64>, Error> {
    drop_cache(dev, 0, len);
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        src.read_exact_at(&mut a[..want], done).map_err(|source| Error::ReadImage { source })?;
        dev.read_exact_at(&mut b[..want], done)
            .map_err(|source| Error::ReadBack { path: dev_path.to_owned(), source })?;
        if a[..want] != b[..want] {
            let i = a[..want].iter().zip(&b[..want]).position(|(x, y)| x != y).unwrap_or(0);
            return Ok(Some(done + i as u64));
        }
        done += want as u64;
        progress(done);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parsing() {
        let h = "ab".repeat(32);
        assert_eq!(parse_sha256(&h).unwrap(), [0xab; 32]);
        assert!(matches!(parse_sha256("ab"), Err(Error::InvalidDigest)));
        assert!(matches!(parse_sha256(&"zz".repeat(32)), Err(Error::InvalidDigest)));
    }

    fn errs() -> CopyErrors {
        CopyErrors {
            read: |source| Error::ReadPayload { source },
            write: |p, source| Error::WritePayload { path: p.to_owned(), source },
        }
    }

    #[test]
    fn copy_is_exact_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&p).unwrap();
        f.set_len(64).unwrap();
        let data: Vec<u8> = (1..=16).collect();
        let dest = Dest { file: &f, path: &p, offset: 8, len: 16 };
        let (d, held) = copy_exact(&mut &data[..], &dest, (4, 3), &errs(), &mut |_| {}).unwrap();
        assert_eq!(d, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!((held.head, held.tail), (vec![1, 2, 3, 4], vec![14, 15, 16]));
        let back = std::fs::read(&p).unwrap();
        assert_eq!(&back[..12], &[0u8; 12], "held-back head not written");
        assert_eq!(&back[12..21], &data[4..13]);
        assert_eq!(&back[21..], &[0u8; 43], "held-back tail and nothing past offset + len");
        // Holds larger than the payload overlap nothing and lose nothing.
        let (_, held) = copy_exact(&mut &data[..], &dest, (10, 10), &errs(), &mut |_| {}).unwrap();
        assert_eq!([held.head, held.tail].concat(), data);
        let data = [7u8; 16];
        assert!(matches!(
            copy_exact(&mut &data[..], &Dest { file: &f, path: &p, offset: 0, len: 15 }, (0, 0), &errs(), &mut |_| {}),
            Err(Error::PayloadTooLong { expected: 15 })
        ));
        assert!(matches!(
            copy_exact(&mut &data[..], &Dest { file: &f, path: &p, offset: 0, len: 17 }, (0, 0), &errs(), &mut |_| {}),
            Err(Error::PayloadShort { expected: 17, received: 16 })
        ));
        assert_eq!(hash_back(&f, &p, 0, 15).unwrap(), <[u8; 32]>::from(Sha256::digest([7u8; 15])));
    }
}
