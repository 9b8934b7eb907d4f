// SPDX-License-Identifier: Apache-2.0
//! Policy loading and SIGHUP reload: the new policy replaces the old one whole, or not at all.

use std::path::Path;
use std::sync::Arc;

use piccolo_audit::Entry;

use crate::guard::Ctx;
use crate::policy::{Policy, PolicyError, SystemNames};

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: file.clone(),
        line: 0,
        reason: e.to_string(),
    })?;
    Policy::parse(&file, &text, &SystemNames)
}

/// Reloads the policy; on any error the old one stays in force. Both outcomes are audited.
pub async fn reload_policy(ctx: &Ctx) {
    crate::identity::names::clear();
    let old = ctx.policy().sha256().to_owned();
    let (args, ok) = match load_policy(&ctx.policy_path) {
        Ok(new) => {
            let sha = new.sha256().to_owned();
            *ctx.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            tracing::info!(policy_sha256 = %sha, "policy reloaded");
            (serde_json::json!({"old_sha256": old, "new_sha256": sha}), true)
        }
        Err(e) => {
            tracing::error!(error = %e, "policy reload rejected; the previous policy stays in force");
            (serde_json::json!({"in_force_sha256": old, "error": e.to_string()}), false)
        }
    };
    let entry = Entry::event(if ok { "broker.policy_reloaded" } else { "broker.policy_reload_rejected" }, args);
    if let Err(e) = ctx.audit.append(entry).await {
        tracing::error!(error = %e, "cannot audit the policy reload");
    }
}
