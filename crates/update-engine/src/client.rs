// SPDX-License-Identifier: Apache-2.0
//! The connection (made on first use, remade after it broke) and the method calls.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::timeout;
use zbus::Connection;
use zbus::proxy::{CacheProperties, MethodFlags};

use crate::error::{Error, call_error};
use crate::status::{Status, Wire};
use crate::{INTERFACE, PATH, SERVICE};

/// Deadline of one method call to update_engine.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting to (and saying Hello on) the bus.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A client of update_engine. Cheap to share; calls may run concurrently.
pub struct UpdateEngine {
    address: Option<String>,
    conn: Mutex<Option<Connection>>,
}

impl UpdateEngine {
    /// A client of the bus at `address` (a D-Bus address such as `unix:path=/run/x`), or of
    /// the system bus when `None`. Nothing is connected until the first call.
    pub fn new(address: Option<String>) -> UpdateEngine {
        UpdateEngine { address, conn: Mutex::new(None) }
    }

    /// The bus, for messages: the configured address or "system bus".
    pub fn bus(&self) -> String {
        self.address.clone().unwrap_or_else(|| "system bus".into())
    }

    /// The live connection, connecting (again) if there is none or it closed.
    pub(crate) async fn connection(&self) -> Result<Connection, Error> {
        // Held across the connect: concurrent callers wait for one attempt instead of racing.
        let mut cached = self.conn.lock().await;
        if let Some(c) = cached.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *cached = None;
        let bus = self.bus();
        let builder = match &self.address {
            Some(a) => zbus::connection::Builder::address(a.as_str()),
            None => zbus::connection::Builder::system(),
        }
        .map_err(|source| Error::Connect { bus: bus.clone(), source: Box::new(source) })?;
        let conn = timeout(CONNECT_TIMEOUT, builder.build())
            .await
            .map_err(|_| Error::ConnectTimeout { bus: bus.clone(), after: CONNECT_TIMEOUT })?
            .map_err(|source| Error::Connect { bus, source: Box::new(source) })?;
        tracing::info!(bus = %self.bus(), unique_name = ?conn.unique_name(), "connected to D-Bus for update_engine");
        *cached = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the cached connection if it is still `conn`, so the next call reconnects.
    pub(crate) async fn forget(&self, conn: &Connection) {
        let mut cached = self.conn.lock().await;
        if cached.as_ref().is_some_and(|c| c.unique_name() == conn.unique_name()) {
            *cached = None;
        }
    }

    /// Calls `method` (no arguments) with `NO_AUTO_START` and a deadline.
    async fn call<R>(&self, method: &'static str, deadline: Duration) -> Result<R, Error>
    where
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        let conn = self.connection().await?;
        let result = match timeout(deadline, call_on::<R>(&conn, method)).await {
            Err(_) => Err(Error::Timeout { method, after: deadline }),
            Ok(r) => r.map_err(|e| call_error(method, &self.bus(), e)),
        };
        if let Err(e) = &result
            && e.broke_connection()
        {
            self.forget(&conn).await;
        }
        result
    }

    /// `GetStatus`.
    pub async fn status(&self) -> Result<Status, Error> {
        self.call::<Wire>("GetStatus", CALL_TIMEOUT).await.map(Status::from)
    }

    /// `GetStatus` with a short deadline, for health listings.
    pub async fn probe(&self) -> Result<Status, Error> {
        self.call::<Wire>("GetStatus", Duration::from_secs(1)).await.map(Status::from)
    }

    /// `ResetStatus`, then `GetStatus`. update_engine refuses outside IDLE and
    /// UPDATED_NEED_REBOOT ([`Error::ResetRefused`]). It does **not** undo the partition table
    /// changes its postinst made; undoing those is the boot-control service's job.
    pub async fn reset_status(&self) -> Result<Status, Error> {
        match self.call::<()>("ResetStatus", CALL_TIMEOUT).await {
            Ok(()) => self.status().await,
            Err(Error::Call { .. }) => {
                let state = match self.status().await {
                    Ok(s) => s.operation.to_string(),
                    Err(_) => "unknown".into(),
                };
                Err(Error::ResetRefused { state })
            }
            Err(e) => Err(e),
        }
    }

    /// `AttemptUpdate`. update_engine always answers success and silently skips the check
    /// unless it is IDLE: read [`UpdateEngine::status`] or a [`crate::Watch`] for the outcome.
    pub async fn attempt_update(&self) -> Result<(), Error> {
        self.call::<()>("AttemptUpdate", CALL_TIMEOUT).await
    }
}

/// A proxy for update_engine on `conn` (no property cache: the interface has none).
pub(crate) async fn proxy(conn: &Connection) -> zbus::Result<zbus::Proxy<'static>> {
    zbus::proxy::Builder::new(conn)
        .destination(SERVICE)?
        .path(PATH)?
        .interface(INTERFACE)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

pub(crate) async fn call_on<R>(conn: &Connection, method: &'static str) -> zbus::Result<R>
where
    R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
{
    proxy(conn)
        .await?
        .call_with_flags::<_, _, R>(method, MethodFlags::NoAutoStart.into(), &())
        .await?
        .ok_or(zbus::Error::InvalidReply)
}
