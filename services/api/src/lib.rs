// SPDX-License-Identifier: Apache-2.0
//! `piccolo-api`: the HTTP API worker of piccolo.
//!
//! **Owns:** the key set, the control store and the lock state (the single owner: no other
//! process writes them), first-run setup, admin sessions (cookie + CSRF, bearer JWT), the
//! attempt limits on every credential check, export/import, the `/api/v1` JSON API and its
//! generated OpenAPI document, the server-sent event stream, and TLS termination on the
//! `https` sockets (`tls`).
//!
//! **Must never:** run with capabilities or bind a privileged port (production sockets come
//! from systemd socket activation); log, echo or put in an error a password, recovery key,
//! setup code (except the one start-up notice), session id or token; trust a client-supplied
//! address header for rate limiting; answer a store-backed request while locked (423); let a
//! rejected import change anything; use a TLS key file that every user can read.

pub mod auth;
pub mod backend;
pub mod boot;
pub mod error;
pub mod events;
pub mod listen;
pub mod mounts;
pub mod ratelimit;
pub mod routes;
pub mod setup;
pub mod state;
pub mod tls;
pub mod updates;
