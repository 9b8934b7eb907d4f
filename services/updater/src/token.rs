// SPDX-License-Identifier: Apache-2.0
//! Where device tokens come from: the broker signs them with the TPM-held device-token key
//! (`Tpm.SignDeviceToken`); device id and entitlements travel only inside the token.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;

use piccolo_proto::v1::SignDeviceTokenRequest;
use piccolo_proto::v1::tpm_client::TpmClient;

use crate::error::Error;
use crate::window::now;

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that hands out a bearer token for the update server.
pub trait TokenSource: Send + Sync {
    /// A token valid for at least a minute more.
    fn token(&self) -> BoxFuture<'_, Result<String, Error>>;
}

/// Tokens from the broker's TPM, cached until shortly before they expire.
pub struct BrokerTokens {
    socket: PathBuf,
    tier: String,
    features: Vec<String>,
    ttl: u32,
    cache: Mutex<Option<(String, u64)>>,
}

impl BrokerTokens {
    /// Tokens asked of the broker at `socket` with these claims.
    pub fn new(socket: PathBuf, tier: String, features: Vec<String>, ttl: u32) -> BrokerTokens {
        BrokerTokens { socket, tier, features, ttl, cache: Mutex::new(None) }
    }

    async fn fetch(&self) -> Result<String, Error> {
        if let Some((t, exp)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && *exp > now() + 60
        {
            return Ok(t.clone());
        }
        let ch = piccolo_proto::client::connect_unix(&self.socket).await?;
        let r = TpmClient::new(ch)
            .sign_device_token(SignDeviceTokenRequest {
                subscription_tier: self.tier.clone(),
                features: self.features.clone(),
                ttl_seconds: self.ttl,
            })
            .await
            .map_err(|s| Error::broker("SignDeviceToken", s))?
            .into_inner();
        let exp = u64::try_from(r.expires_at).unwrap_or(0);
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((r.token.clone(), exp));
        Ok(r.token)
    }
}

impl TokenSource for BrokerTokens {
    fn token(&self) -> BoxFuture<'_, Result<String, Error>> {
        Box::pin(self.fetch())
    }
}
