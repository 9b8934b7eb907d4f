// SPDX-License-Identifier: Apache-2.0
//! A lean HTTP/1 client (hyper-util's legacy client over TCP, already in the tree through
//! tonic). Plain `http://` only in this build: production puts TLS in front by building the
//! client with a TLS connector (e.g. hyper-rustls' `HttpsConnector`, the only change being
//! the connector type in [`Http::new`]); the manifest signature and the payload digest do
//! not depend on the transport either way.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::Error;

/// The client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Http {
    /// A client whose connects and response headers time out after `timeout`.
    pub fn new(timeout: Duration) -> Http {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(2).build(conn);
        Http { client, timeout }
    }

    /// Read-stall timeout for bodies.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET url` with optional bearer token and `Range: bytes=<from>-`; the response head.
    pub async fn get(&self, url: &str, bearer: Option<&str>, from: u64) -> Result<Response<Incoming>, Error> {
        let err = |reason: String| Error::Http { url: url.to_owned(), reason };
        if url.starts_with("https://") {
            return Err(err("https needs a TLS connector, which this build does not include (see README)".into()));
        }
        let mut req = Request::get(url).header("user-agent", concat!("piccolo-updater/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if from > 0 {
            req = req.header("range", format!("bytes={from}-"));
        }
        // The token is in a header only; errors below never echo the request.
        let req = req.body(Empty::new()).map_err(|e| err(format!("bad request: {e}")))?;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(err(format!("no response within {} s", self.timeout.as_secs()))),
            Ok(Err(e)) => Err(err(error_chain(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// `GET url` and the whole body (at most `limit` bytes); any non-200 is an error.
    pub async fn get_small(&self, url: &str, bearer: Option<&str>, limit: usize) -> Result<Vec<u8>, Error> {
        let resp = self.get(url, bearer, 0).await?;
        if resp.status() != StatusCode::OK {
            return Err(Error::HttpStatus { url: url.to_owned(), status: resp.status().as_u16() });
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            let frame = tokio::time::timeout(self.timeout, body.frame())
                .await
                .map_err(|_| Error::Http { url: url.to_owned(), reason: "body stalled".into() })?;
            match frame {
                None => return Ok(out),
                Some(Err(e)) => return Err(Error::Http { url: url.to_owned(), reason: error_chain(&e) }),
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        if out.len() + d.len() > limit {
                            return Err(Error::Http {
                                url: url.to_owned(),
                                reason: format!("answer exceeds {limit} bytes"),
                            });
                        }
                        out.extend_from_slice(d);
                    }
                }
            }
        }
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
