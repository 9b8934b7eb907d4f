// SPDX-License-Identifier: Apache-2.0
//! Byte-counting SHA-256 adapters for the archive stream and for file contents.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use sha2::{Digest, Sha256};

/// Hashes and counts everything written through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// SHA-256 (hex) and length of everything written so far.
    pub(crate) fn digest_so_far(&self) -> (String, u64) {
        (hex::encode(self.hasher.clone().finalize()), self.bytes)
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the bytes read through it.
pub(crate) struct CountingReader<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> CountingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        CountingReader { inner, bytes: 0 }
    }

    pub(crate) fn count(&self) -> u64 {
        self.bytes
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Tar header size: the reader keeps this many of the most recent bytes out of the hash.
pub(crate) const LAG: usize = 512;

/// The running checksum of a [`ChecksumReader`], shared so the importer can query it while the
/// tar reader owns the stream.
#[derive(Default)]
pub(crate) struct ChecksumState {
    hasher: Sha256,
    pending: Vec<u8>,
    hashed: u64,
}

impl ChecksumState {
    /// SHA-256 (hex) and count of the bytes hashed so far (all read bytes but the last `LAG`).
    pub(crate) fn digest_so_far(&self) -> (String, u64) {
        (hex::encode(self.hasher.clone().finalize()), self.hashed)
    }

    fn absorb(&mut self, new: &[u8]) {
        let total = self.pending.len() + new.len();
        if total <= LAG {
            self.pending.extend_from_slice(new);
            return;
        }
        // Hash the oldest `total - LAG` bytes (pending first, then the new ones), keep the rest.
        let to_hash = total - LAG;
        let from_pending = to_hash.min(self.pending.len());
        let from_new = to_hash - from_pending;
        self.hasher.update(&self.pending[..from_pending]);
        self.hasher.update(&new[..from_new]);
        self.pending.drain(..from_pending);
        self.pending.extend_from_slice(&new[from_new..]);
        self.hashed += to_hash as u64;
    }
}

/// Hashes everything read through it except the most recent [`LAG`] bytes. When the tar reader
/// has just consumed the trailer's 512-byte header, the hash covers exactly the bytes before it,
/// which is what the writer's trailer records (the tar reader reads headers and data exactly,
/// never ahead, and the importer checks the trailer's header offset against the hashed count).
pub(crate) struct ChecksumReader<R> {
    inner: R,
    state: Rc<RefCell<ChecksumState>>,
}

impl<R: Read> ChecksumReader<R> {
    pub(crate) fn new(inner: R, state: Rc<RefCell<ChecksumState>>) -> Self {
        ChecksumReader { inner, state }
    }

    /// Reads what is left of the stream (after the end-of-archive marker), failing if any
    /// byte is non-zero or more than `max` bytes follow.
    pub(crate) fn drain_zero_padding(&mut self, max: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        let mut seen: u64 = 0;
        loop {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            seen += n as u64;
            if seen > max || buf[..n].iter().any(|b| *b != 0) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "data after the end of the archive"));
            }
        }
    }
}

impl<R: Read> Read for ChecksumReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.borrow_mut().absorb(&buf[..n]);
        Ok(n)
    }
}

/// Streams `reader` into `writer` (if any), returning the SHA-256 hex and byte count.
pub(crate) fn copy_hashed<R: Read, W: Write>(reader: &mut R, mut writer: Option<&mut W>) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        if let Some(w) = writer.as_mut() {
            w.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lagging_reader_hashes_all_but_last_block() {
        let data: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        for chunk in [1usize, 7, 300, 512, 513, 4096, 10_000] {
            let state = Rc::new(RefCell::new(ChecksumState::default()));
            let mut r = ChecksumReader::new(&data[..], Rc::clone(&state));
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            assert_eq!(out, data);
            let (digest, n) = state.borrow().digest_so_far();
            assert_eq!(usize::try_from(n).unwrap(), data.len() - LAG, "chunk {chunk}");
            assert_eq!(digest, hex::encode(Sha256::digest(&data[..data.len() - LAG])), "chunk {chunk}");
        }
    }
}
