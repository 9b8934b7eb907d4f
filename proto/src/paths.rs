// SPDX-License-Identifier: Apache-2.0
//! Default locations shared by the broker, the workers and `piccoloctl`.

/// The broker's gRPC socket.
pub const BROKER_SOCKET: &str = "/run/piccolo/broker.sock";
/// The broker's policy file.
pub const BROKER_POLICY: &str = "/etc/piccolo/broker.toml";
/// The broker's optional config file (flags override it).
pub const BROKER_CONFIG: &str = "/etc/piccolo/broker-config.toml";
/// The audit log (JSON Lines, hash-chained).
pub const AUDIT_LOG: &str = "/var/log/piccolo/audit.jsonl";
/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "PICCOLO_BROKER_SOCKET";
/// Largest gRPC message the broker accepts or sends (streamed payloads use chunks below this).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest `TpmHelperRequest` or `TpmHelperResponse` the broker and `piccolo-broker-tpm`
/// exchange (sealed blobs and secrets are small; the gRPC bound above is not).
pub const TPM_HELPER_MAX_BYTES: u64 = 1 << 20;
/// The update worker's control socket.
pub const UPDATER_SOCKET: &str = "/run/piccolo-updater/updater.sock";
/// Environment variable that overrides the update worker's socket path for clients.
pub const UPDATER_SOCKET_ENV: &str = "PICCOLO_UPDATER_SOCKET";
