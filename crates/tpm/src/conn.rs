// SPDX-License-Identifier: Apache-2.0
//! Opening the TPM through the configured TCTI, with bounded waiting, and flushing every
//! transient object and session an operation created.
//!
//! A connection is opened per operation and closed after it: swtpm serves one client at a
//! time and has no resource manager, so a held connection would lock out everyone else and
//! leaked transient objects would fill its slots. With `/dev/tpmrm0` the kernel's resource
//! manager flushes anyway; flushing ourselves costs one command per handle.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::handles::ObjectHandle;
use tss_esapi::tcti_ldr::TctiNameConf;

use crate::error::{Error, Result};

pub use piccolo_tcti::CONNECT_TIMEOUT;

/// Checks that something answers behind `tcti` without waiting long ([`piccolo_tcti::probe`]),
/// so that a missing TPM fails fast.
pub fn probe(tcti: &str) -> Result<()> {
    piccolo_tcti::probe(tcti).map_err(|e| Error::NoTpm(e.0))
}

/// Opens a context for one operation.
pub fn open(tcti: &str) -> Result<Context> {
    probe(tcti)?;
    let conf = TctiNameConf::from_str(tcti).map_err(|_| Error::NoTpm(format!("unusable TCTI {tcti:?}")))?;
    Context::new(conf).map_err(|e| Error::NoTpm(format!("cannot open TCTI {tcti:?}: {e}")))
}

/// A context plus the transient handles to flush when the operation ends, even on error.
pub struct Scope {
    /// The TPM context.
    pub ctx: Context,
    handles: Vec<ObjectHandle>,
    /// The storage root key, once created in this scope.
    pub(crate) srk: Option<tss_esapi::handles::KeyHandle>,
}

impl Scope {
    /// Opens the TPM for one operation.
    pub fn open(tcti: &str) -> Result<Scope> {
        Ok(Scope { ctx: open(tcti)?, handles: Vec::new(), srk: None })
    }

    /// Remembers `h` (a key or session handle) to be flushed at the end.
    pub fn track(&mut self, h: impl Into<ObjectHandle>) {
        self.handles.push(h.into());
    }

    /// Flushes one tracked handle now.
    pub fn flush(&mut self, h: impl Into<ObjectHandle>) {
        let h = h.into();
        if let Some(i) = self.handles.iter().position(|x| *x == h) {
            self.handles.remove(i);
            let _ = self.ctx.flush_context(h);
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.ctx.clear_sessions();
        for h in self.handles.drain(..).rev() {
            // Best effort: a handle the TPM already dropped (failed command) just errors.
            let _ = self.ctx.flush_context(h);
        }
    }
}
