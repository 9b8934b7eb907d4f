// SPDX-License-Identifier: Apache-2.0
//! Following update_engine's `StatusUpdate` signal across its restarts.
//!
//! The bus delivers a signal to us if it matches our rule (sender `com.coreos.update1`,
//! which the bus resolves to that name's current owner) or if someone addressed it to us
//! directly, which anyone on the bus may do. So each signal's sender is also checked here
//! against the owner we know, which follows `NameOwnerChanged` from the bus itself.

use futures_util::{FutureExt, StreamExt};
use tokio::time::timeout;
use zbus::message::Type;
use zbus::{MatchRule, Message, MessageStream};

use crate::client::{CALL_TIMEOUT, UpdateEngine, call_on};
use crate::error::{Error, call_error, dbus_error};
use crate::status::{Status, Wire};
use crate::{INTERFACE, PATH, SERVICE, SIGNAL};

const BUS: &str = "org.freedesktop.DBus";
/// Signals buffered per rule before the bus reader waits for us; [`Watch::next`] drains them.
const QUEUE: usize = 64;

/// What a watch reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A `StatusUpdate` from the current update_engine (after every state change, and once
    /// when it starts).
    Status(Status),
    /// update_engine left the bus (stopped or crashed). The watch goes on: a restarted
    /// update_engine broadcasts its status at start.
    Vanished,
    /// A new update_engine took the name; its start-up `StatusUpdate` follows.
    Appeared,
}

/// A subscription to update_engine's status.
///
/// Poll [`Watch::next`] continuously: the bus connection is shared, and once 64 signals are
/// queued for a watch nobody reads, the connection's reader waits (stalling every call).
/// The broker moves events into a per-watcher queue of its own as they arrive.
pub struct Watch {
    initial: Status,
    signals: MessageStream,
    owners: MessageStream,
    owner: Option<String>,
    pending: Option<Status>,
}

impl UpdateEngine {
    /// Subscribes, then reads the current status (so no change in between is lost).
    /// Fails with [`Error::NotRunning`] when update_engine is not on the bus now.
    pub async fn watch(&self) -> Result<Watch, Error> {
        let conn = self.connection().await?;
        let bus = self.bus();
        let r = match timeout(CALL_TIMEOUT, open(&conn, &bus)).await {
            Err(_) => Err(Error::Timeout { method: "watch", after: CALL_TIMEOUT }),
            Ok(r) => r,
        };
        if let Err(e) = &r
            && e.broke_connection()
        {
            self.forget(&conn).await;
        }
        r
    }
}

async fn open(conn: &zbus::Connection, bus: &str) -> Result<Watch, Error> {
    let lost = |source: zbus::Error| Error::Disconnected { step: "subscribe", source: Box::new(source) };
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(SERVICE)
        .and_then(|b| b.path(PATH))
        .and_then(|b| b.interface(INTERFACE))
        .and_then(|b| b.member(SIGNAL))
        .map_err(lost)?
        .build();
    let signals = MessageStream::for_match_rule(rule, conn, Some(QUEUE)).await.map_err(lost)?;
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(BUS)
        .and_then(|b| b.interface(BUS))
        .and_then(|b| b.member("NameOwnerChanged"))
        .and_then(|b| b.add_arg(SERVICE))
        .map_err(lost)?
        .build();
    let owners = MessageStream::for_match_rule(rule, conn, Some(QUEUE)).await.map_err(lost)?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(lost)?;
    let name = zbus::names::BusName::try_from(SERVICE).map_err(|e| lost(e.into()))?;
    let owner = match dbus.get_name_owner(name).await {
        Ok(o) => o.to_string(),
        Err(e) => {
            let e = zbus::Error::from(e);
            return Err(match dbus_error(&e) {
                Some(_) => call_error("GetNameOwner", bus, e),
                None => lost(e),
            });
        }
    };
    let initial = call_on::<Wire>(conn, "GetStatus").await.map_err(|e| call_error("GetStatus", bus, e))?.into();
    Ok(Watch { initial, signals, owners, owner: Some(owner), pending: None })
}

impl Watch {
    /// The status read when the watch was opened.
    pub fn initial(&self) -> &Status {
        &self.initial
    }

    /// The next event. Cancel-safe. An error means the bus connection is gone; the watch is
    /// over (open a new one; the client reconnects).
    pub async fn next(&mut self) -> Result<Event, Error> {
        if let Some(st) = self.pending.take() {
            return Ok(Event::Status(st));
        }
        loop {
            tokio::select! {
                biased;
                m = self.owners.next() => {
                    if let Some(ev) = self.owner_changed(next_msg(m, "NameOwnerChanged")?) {
                        return Ok(ev);
                    }
                }
                m = self.signals.next() => {
                    let m = next_msg(m, SIGNAL)?;
                    // A NameOwnerChanged the bus sent before this signal is already queued:
                    // apply it before judging the signal's sender.
                    let mut appeared = false;
                    while let Some(o) = self.owners.next().now_or_never() {
                        appeared |= self.owner_changed(next_msg(o, "NameOwnerChanged")?) == Some(Event::Appeared);
                    }
                    if let Some(st) = self.status_signal(&m) {
                        if appeared {
                            self.pending = Some(st);
                            return Ok(Event::Appeared);
                        }
                        return Ok(Event::Status(st));
                    }
                }
            }
        }
    }

    /// Updates the known owner; returns the event it means, if any.
    fn owner_changed(&mut self, m: Message) -> Option<Event> {
        if m.header().sender().map(|s| s.as_str()) != Some(BUS) {
            return None;
        }
        let (name, _old, new): (String, String, String) = m.body().deserialize().ok()?;
        if name != SERVICE {
            return None;
        }
        if new.is_empty() {
            self.owner = None;
            Some(Event::Vanished)
        } else {
            self.owner = Some(new);
            Some(Event::Appeared)
        }
    }

    /// The status a signal carries, if it came from the current owner and is well-formed.
    fn status_signal(&self, m: &Message) -> Option<Status> {
        let sender = m.header().sender().map(|s| s.to_string());
        if sender.is_none() || sender != self.owner {
            tracing::warn!(sender = ?sender, owner = ?self.owner, "ignoring StatusUpdate not sent by update_engine");
            return None;
        }
        match m.body().deserialize::<Wire>() {
            Ok(w) => Some(w.into()),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed StatusUpdate");
                None
            }
        }
    }
}

fn next_msg(m: Option<zbus::Result<Message>>, step: &'static str) -> Result<Message, Error> {
    match m {
        Some(Ok(m)) => Ok(m),
        Some(Err(source)) => Err(Error::Disconnected { step, source: Box::new(source) }),
        None => Err(Error::Disconnected {
            step,
            source: Box::new(zbus::Error::InputOutput(std::sync::Arc::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))),
        }),
    }
}
