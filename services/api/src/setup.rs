// SPDX-License-Identifier: Apache-2.0
//! The first-run setup code.
//!
//! A fresh box must not be claimable by whoever reaches its port first. While no key set
//! exists the worker draws a one-time code (80 bits from the OS RNG, 16 Crockford-base32
//! symbols) at start-up, writes it to `<runtime dir>/setup-code` (mode 0600, owned by the
//! worker: readable by the worker and root only) and logs it to the journal (readable by
//! root and the `systemd-journal`/`adm` operators). `POST /api/v1/setup` requires it; a
//! wrong code counts as a failed credential check (rate limited). The code is forgotten and
//! its file removed once setup succeeds; a restart draws a new one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use zeroize::Zeroizing;

use crate::auth::ct_eq;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// File name of the setup code inside the runtime dir.
pub const SETUP_CODE_FILE: &str = "setup-code";

/// The pending code, if setup has not been done.
pub struct SetupCode {
    code: Mutex<Option<Zeroizing<String>>>,
    file: Option<PathBuf>,
}

/// Why the code could not be published.
#[derive(Debug, thiserror::Error)]
pub enum SetupCodeError {
    /// The OS random number generator failed.
    #[error("OS random number generator failed: {0}")]
    Random(String),
    /// Writing the code file failed.
    #[error("cannot write setup code file {0}")]
    WriteFile(PathBuf, #[source] std::io::Error),
}

fn normalise(input: &str) -> String {
    input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        })
        .collect()
}

impl SetupCode {
    /// No setup pending (the key set exists).
    pub fn none() -> SetupCode {
        SetupCode { code: Mutex::new(None), file: None }
    }

    /// Draws a code and writes it to `dir/setup-code` (0600). Returns the code for logging.
    pub fn generate(dir: &Path) -> Result<(SetupCode, String), SetupCodeError> {
        let mut raw = Zeroizing::new([0u8; 16]);
        getrandom::fill(&mut raw[..]).map_err(|e| SetupCodeError::Random(e.to_string()))?;
        let mut code = Zeroizing::new(String::new());
        for (i, b) in raw.iter().enumerate() {
            if i > 0 && i % 4 == 0 {
                code.push('-');
            }
            // 16 symbols of 5 bits each: the low 5 bits of 16 random bytes (uniform).
            code.push(char::from(ALPHABET[usize::from(b & 0x1f)]));
        }
        let path = dir.join(SETUP_CODE_FILE);
        let werr = |e| SetupCodeError::WriteFile(path.clone(), e);
        fs::create_dir_all(dir).map_err(werr)?;
        let tmp = dir.join(format!(".{SETUP_CODE_FILE}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(werr)?;
        f.write_all(format!("{}\n", code.as_str()).as_bytes()).and_then(|()| f.sync_all()).map_err(werr)?;
        fs::rename(&tmp, &path).map_err(werr)?;
        let shown = code.to_string();
        Ok((SetupCode { code: Mutex::new(Some(code)), file: Some(path) }, shown))
    }

    /// Whether `input` is the pending code (case, dashes and look-alikes forgiven).
    pub fn matches(&self, input: &str) -> bool {
        let guard = self.code.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(code) => input.len() <= 64 && ct_eq(normalise(input).as_bytes(), normalise(code).as_bytes()),
            None => false,
        }
    }

    /// Forgets the code and removes its file (setup done).
    pub fn consume(&self) {
        *self.code.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(f) = &self.file {
            let _ = fs::remove_file(f);
        }
    }
}
