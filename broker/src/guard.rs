// SPDX-License-Identifier: Apache-2.0
//! The only way into a privileged verb: identify the caller, consult the policy, write the
//! audit record(s), run the handler, and answer only once the record is durable.
//!
//! Each call runs in its own task, so a client that disconnects mid-call cannot cancel a
//! half-done action or its outcome record.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use piccolo_audit::{AuditError, AuditLog, Decision, Entry, Kind, Outcome};
use piccolo_proto::Rpc;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::error::{Error, code_name};
use crate::identity::Identity;
use crate::policy::Policy;

/// State shared by every handler.
pub struct Ctx {
    /// The policy in force; replaced whole on a successful reload.
    pub policy: RwLock<Arc<Policy>>,
    /// Where the policy is reloaded from.
    pub policy_path: PathBuf,
    /// The audit log.
    pub audit: AuditLog,
    /// When the broker started.
    pub started: Instant,
    /// Resolved configuration.
    pub config: Config,
    /// Woken when shutdown begins.
    pub stopping: tokio::sync::Notify,
    /// What `GetInfo` reports about each backend, kept current in the background.
    pub backends: crate::backends::Backends,
    /// Calls between the guard's spawn and the end of their task.
    pub in_flight: AtomicUsize,
    /// When (µs after `started`, 0 = never) a call last entered with another in flight.
    pub last_overlap_us: AtomicU64,
}

/// How long (µs) after two calls overlapped every call still goes to the writer thread.
const OVERLAP_MEMORY_US: u64 = 2_000;

/// Shared handle passed to handlers.
pub type Shared = Arc<Ctx>;

impl Ctx {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        // A poisoned lock still holds a complete policy: it is only ever replaced whole.
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes a call's audit record; returns once it is durable.
    ///
    /// The only call in flight commits on its own thread: nothing could join its batch, and
    /// it saves the hand-off to the writer thread and back (the single-client latency).
    /// Otherwise the writer thread batches it with the others (group commit). On the
    /// broker's one-thread runtime, calls read in the same event-loop turn all pass the
    /// guard's spawn before the first reaches its audit write; a call still unread in its
    /// socket is not counted, and would wait for an inline commit, so under concurrent load
    /// (calls overlapped within [`OVERLAP_MEMORY_US`]) every call goes to the writer thread
    /// (measured with 8 clients: a fifth of the commits were inline singletons that held
    /// the async thread through their `fdatasync`).
    async fn write_audit(&self, entry: Entry) -> Result<u64, AuditError> {
        if self.in_flight.load(Ordering::Acquire) <= 1 && !self.overlapped_recently() {
            self.audit.append_inline(entry).await
        } else {
            self.audit.append(entry).await
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
    }

    fn overlapped_recently(&self) -> bool {
        let last = self.last_overlap_us.load(Ordering::Relaxed);
        last != 0 && self.now_us().saturating_sub(last) < OVERLAP_MEMORY_US
    }
}

/// Holds one slot of [`Ctx::in_flight`] for as long as a call's task lives.
struct InFlight(Shared);

impl InFlight {
    fn enter(ctx: &Shared) -> InFlight {
        if ctx.in_flight.fetch_add(1, Ordering::AcqRel) > 0 {
            ctx.last_overlap_us.store(ctx.now_us(), Ordering::Relaxed);
        }
        InFlight(ctx.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request contributes to its audit record and to argument constraints.
pub trait AuditArgs {
    /// Summary of the arguments: ids, sizes, digests; never secrets.
    fn audit_args(&self) -> Value {
        Value::Object(Default::default())
    }
    /// The value checked against the rule's constraint (e.g. the volume id), if the RPC has one.
    fn constraint(&self) -> Option<String> {
        None
    }
    /// The user a created volume is to be presented as (CreateVolume only): a second argument
    /// the policy constrains, checked with the constraint.
    fn present_as(&self) -> Option<String> {
        None
    }
}

/// Runs a unary RPC through the guard.
pub async fn guard<T, R, F, Fut>(ctx: &Shared, rpc: Rpc, req: Request<T>, handler: F) -> Result<Response<R>, Status>
where
    T: AuditArgs + Send + 'static,
    R: Send + 'static,
    F: FnOnce(Shared, Identity, T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
{
    let identity = Identity::of_request(&req)?;
    let msg = req.into_inner();
    let args = msg.audit_args();
    let check = Check { constraint: msg.constraint(), present_as: msg.present_as() };
    spawn_checked(ctx, rpc, identity, args, check, move |ctx, id| handler(ctx, id, msg)).await.map(Response::new)
}

/// The arguments the policy constrains.
struct Check {
    /// Checked against the granting rule's `volumes`/`variables`/... constraint.
    constraint: Option<String>,
    /// A user name the granting rule's `present_as` must name (or the caller's own).
    present_as: Option<String>,
}

impl Check {
    fn allows(&self, policy: &Policy, identity: &Identity, rpc: Rpc) -> bool {
        if !policy.allows(identity, rpc, self.constraint.as_deref()) {
            return false;
        }
        let Some(name) = self.present_as.as_deref().filter(|n| !n.is_empty()) else { return true };
        // A name that is no user cannot be one the policy names (it resolves users at load).
        let Ok(Some(user)) = nix::unistd::User::from_name(name) else { return false };
        policy.allows_present_as(identity, self.constraint.as_deref().unwrap_or_default(), user.uid.as_raw())
    }
}

/// The guard itself, for handlers that extract identity and arguments themselves
/// (streaming requests).
pub async fn run<R, F, Fut>(
    ctx: &Shared,
    rpc: Rpc,
    identity: Identity,
    args: Value,
    constraint: Option<String>,
    handler: F,
) -> Result<R, Status>
where
    R: Send + 'static,
    F: FnOnce(Shared, Identity) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
{
    spawn_checked(ctx, rpc, identity, args, Check { constraint, present_as: None }, handler).await
}

/// A handler's answer with its type erased: the guard and the task it spawns are compiled
/// once instead of once per RPC (per-RPC copies were ~0.6 MiB of the broker's text, most of
/// it resident). Costs two small allocations per call.
type Answer = Box<dyn std::any::Any + Send>;
/// A handler with its future and answer types erased (see [`Answer`]).
type BoxedHandler =
    Box<dyn FnOnce(Shared, Identity) -> Pin<Box<dyn Future<Output = Result<Answer, Error>> + Send>> + Send>;

async fn spawn_checked<R, F, Fut>(
    ctx: &Shared,
    rpc: Rpc,
    identity: Identity,
    args: Value,
    check: Check,
    handler: F,
) -> Result<R, Status>
where
    R: Send + 'static,
    F: FnOnce(Shared, Identity) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
{
    let handler: BoxedHandler =
        Box::new(move |ctx, id| Box::pin(async move { handler(ctx, id).await.map(|r| Box::new(r) as Answer) }));
    let answer = spawn_erased(ctx, Call { rpc, identity, args, check }, handler).await?;
    // Cannot fail: the answer was boxed from an `R` just above.
    answer.downcast::<R>().map(|r| *r).map_err(|_| Status::from(Error::Internal("handler answer type".into())))
}

/// Runs the guard in its own task, so a caller that disconnects cannot cancel a call between
/// its intent and outcome records.
async fn spawn_erased(ctx: &Shared, call: Call, handler: BoxedHandler) -> Result<Answer, Status> {
    let ctx = ctx.clone();
    let slot = InFlight::enter(&ctx);
    tokio::spawn(async move {
        let _slot = slot;
        run_inner(ctx, call, handler).await
    })
    .await
    .map_err(|e| Status::from(Error::Internal(e.to_string())))?
}

/// One call as the guard sees it.
struct Call {
    rpc: Rpc,
    identity: Identity,
    /// The argument summary for its audit records.
    args: Value,
    check: Check,
}

async fn run_inner(ctx: Shared, call: Call, handler: BoxedHandler) -> Result<Answer, Status> {
    let Call { rpc, identity, args, check } = call;
    let started = Instant::now();
    let entry = |kind, decision, outcome: Option<Outcome>, intent_seq| Entry {
        kind,
        rpc: rpc.name().to_owned(),
        caller: Some(identity.caller()),
        args: args.clone(),
        decision: Some(decision),
        duration_us: outcome.as_ref().map(|_| u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        outcome,
        intent_seq,
    };

    if !check.allows(&ctx.policy(), &identity, rpc) {
        let status = Status::from(Error::Denied(rpc));
        tracing::info!(rpc = %rpc, uid = identity.uid, "denied");
        let rec = entry(Kind::Call, Decision::Deny, Some(outcome_of(&status)), None);
        // The caller is refused either way; an audit failure only changes the code.
        ctx.write_audit(rec).await.map_err(|e| Status::from(Error::Audit(e)))?;
        return Err(status);
    }

    let intent_seq = if rpc.spec().mutating {
        let seq = ctx
            .write_audit(entry(Kind::Intent, Decision::Allow, None, None))
            .await
            .map_err(|e| Status::from(Error::Audit(e)))?;
        Some(seq)
    } else {
        None
    };

    let result = handler(ctx.clone(), identity.clone()).await.map_err(Status::from);
    let outcome = match &result {
        Ok(_) => Outcome::ok(),
        Err(s) => outcome_of(s),
    };
    let kind = if intent_seq.is_some() { Kind::Outcome } else { Kind::Call };
    ctx.write_audit(entry(kind, Decision::Allow, Some(outcome), intent_seq))
        .await
        .map_err(|e| Status::from(Error::Audit(e)))?;
    result
}

fn outcome_of(s: &Status) -> Outcome {
    Outcome { code: code_name(s.code()).to_owned(), message: Some(s.message().to_owned()) }
}
