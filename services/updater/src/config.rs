// SPDX-License-Identifier: Apache-2.0
//! Configuration: `/etc/piccolo/updater.toml` (TOML), every key optional except the server
//! and the pinned manifest key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use crate::error::Error;
use crate::window::Window;

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/piccolo/updater.toml";

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    server: String,
    manifest_public_key: String,
    #[serde(default = "d_channel")]
    channel: String,
    #[serde(default = "d_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "d_socket")]
    socket: PathBuf,
    #[serde(default = "d_socket_group")]
    socket_group: Option<String>,
    #[serde(default = "d_broker_socket")]
    broker_socket: PathBuf,
    #[serde(default = "d_version_file")]
    version_file: PathBuf,
    #[serde(default = "d_check_interval")]
    check_interval_seconds: u64,
    #[serde(default = "d_initial_delay")]
    initial_check_delay_seconds: u64,
    #[serde(default = "d_boot_poll")]
    boot_poll_seconds: u64,
    #[serde(default = "d_reboot_delay")]
    reboot_delay_seconds: u32,
    #[serde(default = "d_max_attempts")]
    max_download_attempts: u32,
    #[serde(default = "d_http_timeout")]
    http_timeout_seconds: u64,
    #[serde(default = "d_download_retries")]
    download_retries: u32,
    #[serde(default = "d_tier")]
    subscription_tier: String,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default = "d_ttl")]
    token_ttl_seconds: u32,
    #[serde(default)]
    window: Option<RawWindow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    start: String,
    end: String,
}

fn d_channel() -> String {
    "stable".into()
}
fn d_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/piccolo-updater")
}
fn d_socket() -> PathBuf {
    PathBuf::from(piccolo_proto::paths::UPDATER_SOCKET)
}
#[allow(clippy::unnecessary_wraps)]
fn d_socket_group() -> Option<String> {
    Some("piccolo-broker".into())
}
fn d_broker_socket() -> PathBuf {
    PathBuf::from(piccolo_proto::paths::BROKER_SOCKET)
}
fn d_version_file() -> PathBuf {
    PathBuf::from("/usr/lib/os-release")
}
fn d_check_interval() -> u64 {
    6 * 3600
}
fn d_initial_delay() -> u64 {
    60
}
fn d_boot_poll() -> u64 {
    60
}
fn d_reboot_delay() -> u32 {
    5
}
fn d_max_attempts() -> u32 {
    3
}
fn d_http_timeout() -> u64 {
    30
}
fn d_download_retries() -> u32 {
    5
}
fn d_tier() -> String {
    "free".into()
}
fn d_ttl() -> u32 {
    300
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the update server (`http://` here; see the README on TLS).
    pub server: String,
    /// The pinned Ed25519 key manifests must be signed with.
    pub manifest_key: ed25519_dalek::VerifyingKey,
    /// Channel this box follows; a manifest for another channel is refused.
    pub channel: String,
    /// Durable record and nothing else.
    pub state_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// Group of the control socket (its members may connect; the table then decides).
    pub socket_group: Option<String>,
    /// The broker's socket.
    pub broker_socket: PathBuf,
    /// `KEY=VALUE` file naming the running version (`VERSION_ID`, `FLATCAR_RELEASE_VERSION`
    /// or `VERSION`).
    pub version_file: PathBuf,
    /// Time between automatic checks.
    pub check_interval: Duration,
    /// First automatic check after start.
    pub initial_check_delay: Duration,
    /// How often the boot state is re-read to notice a health-marked boot.
    pub boot_poll: Duration,
    /// Delay passed to the broker's Reboot.
    pub reboot_delay_seconds: u32,
    /// Automatic download attempts per version before it is left alone.
    pub max_download_attempts: u32,
    /// Connect/header timeout and read-stall timeout of HTTP requests.
    pub http_timeout: Duration,
    /// Range-resumes per download attempt.
    pub download_retries: u32,
    /// Claims asked of the broker for the device token.
    pub subscription_tier: String,
    /// See [`Config::subscription_tier`].
    pub features: Vec<String>,
    /// Device token lifetime (1..=3600).
    pub token_ttl_seconds: u32,
    /// Maintenance window from the file (a SetWindow call overrides it, durably).
    pub window: Window,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })?;
        Config::parse(path, &text)
    }

    /// Parses `text` (from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
        let bad = |reason: String| Error::Config { path: path.to_path_buf(), reason };
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !(raw.server.starts_with("http://") || raw.server.starts_with("https://")) {
            return Err(bad(format!("server {:?} must be an http:// or https:// URL", raw.server)));
        }
        let key = decode_key(&raw.manifest_public_key).map_err(bad)?;
        if !(1..=3600).contains(&raw.token_ttl_seconds) {
            return Err(bad("token_ttl_seconds must be 1..=3600".into()));
        }
        if raw.check_interval_seconds == 0 || raw.boot_poll_seconds == 0 || raw.http_timeout_seconds == 0 {
            return Err(bad("intervals and timeouts must be at least 1 s".into()));
        }
        if raw.reboot_delay_seconds > 3600 {
            return Err(bad("reboot_delay_seconds must be at most 3600".into()));
        }
        let window = match raw.window {
            None => Window::ANY,
            Some(w) => Window::parse(&w.start, &w.end).map_err(|e| bad(format!("window: {e}")))?,
        };
        Ok(Config {
            server: raw.server.trim_end_matches('/').to_owned(),
            manifest_key: key,
            channel: raw.channel,
            state_dir: raw.state_dir,
            socket: raw.socket,
            socket_group: raw.socket_group.filter(|g| !g.is_empty()),
            broker_socket: raw.broker_socket,
            version_file: raw.version_file,
            check_interval: Duration::from_secs(raw.check_interval_seconds),
            initial_check_delay: Duration::from_secs(raw.initial_check_delay_seconds),
            boot_poll: Duration::from_secs(raw.boot_poll_seconds),
            reboot_delay_seconds: raw.reboot_delay_seconds,
            max_download_attempts: raw.max_download_attempts.max(1),
            http_timeout: Duration::from_secs(raw.http_timeout_seconds),
            download_retries: raw.download_retries,
            subscription_tier: raw.subscription_tier,
            features: raw.features,
            token_ttl_seconds: raw.token_ttl_seconds,
            window,
        })
    }

    /// The version running now, from [`Config::version_file`] (empty if unreadable).
    pub fn current_version(&self) -> String {
        std::fs::read_to_string(&self.version_file).map(|t| version_from(&t)).unwrap_or_default()
    }
}

/// Ed25519 public key: 32 bytes, standard base64 or 64 hex digits.
pub fn decode_key(text: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(t).map_err(|e| e.to_string())?
    } else {
        base64::engine::general_purpose::STANDARD.decode(t).map_err(|e| format!("manifest_public_key: {e}"))?
    };
    let arr: [u8; 32] = bytes.try_into().map_err(|_| "manifest_public_key must be 32 bytes (Ed25519)".to_string())?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|e| format!("manifest_public_key: {e}"))
}

/// The version in an os-release style file (or the first line of a one-line file).
pub fn version_from(text: &str) -> String {
    let kv = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(|v| v.trim().trim_matches('"').to_owned())
    };
    kv("VERSION_ID")
        .or_else(|| kv("FLATCAR_RELEASE_VERSION"))
        .or_else(|| kv("VERSION"))
        .unwrap_or_else(|| text.lines().next().unwrap_or("").trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_files() {
        assert_eq!(version_from("NAME=x\nVERSION_ID=\"1.2.3\"\n"), "1.2.3");
        assert_eq!(version_from("FLATCAR_RELEASE_VERSION=3975.2.0\n"), "3975.2.0");
        assert_eq!(version_from("1.0.0\n"), "1.0.0");
    }

    #[test]
    fn minimal_and_bad_configs() {
        let key = "11".repeat(32);
        let p = Path::new("t");
        // An all-0x11 point is not necessarily valid; find a valid key from a signing key.
        let good = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().to_bytes());
        let c =
            Config::parse(p, &format!("server = \"http://127.0.0.1:1/\"\nmanifest_public_key = \"{good}\"\n")).unwrap();
        assert_eq!((c.server.as_str(), c.channel.as_str()), ("http://127.0.0.1:1", "stable"));
        assert!(c.window.is_any());
        let e = Config::parse(p, "server = \"ftp://x\"\nmanifest_public_key = \"aa\"\n").unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = Config::parse(p, &format!("server = \"http://x\"\nmanifest_public_key = \"{}\"\n", &key[..10]))
            .unwrap_err();
        assert!(e.to_string().contains("32 bytes") || e.to_string().contains("manifest_public_key"), "{e}");
        let e = Config::parse(p, &format!("server = \"http://x\"\nmanifest_public_key = \"{good}\"\nbogus = 1\n"))
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
