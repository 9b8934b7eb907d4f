// SPDX-License-Identifier: Apache-2.0
//! The update rig: swtpm, a real broker on a 64 MiB sgdisk image (USR-A booted and good),
//! the test update server trusting this TPM's device-token key, and `piccolo-updater` as
//! the system user `piccolo-updater`. `reboot()` plays the machine: the worker and broker
//! stop, GRUB's gptprio choice is simulated on the image, and both come back on that slot.
#![allow(dead_code)]

use std::path::PathBuf;

use piccolo_proto::v1::tpm_client::TpmClient;
use piccolo_proto::v1::{BootState, GetBootStateRequest, GetDeviceTokenKeyRequest, SignDeviceTokenRequest};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::disks::{USR_A, USR_B, os_image};
use piccolo_testkit::swtpm::Swtpm;
use piccolo_testkit::updater::{UpdateServer, Updater, UpdaterOptions};
use serde_json::{Value, json};

#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)]
pub use common::{records, repo, system_users};

/// Boot RPCs and device tokens for the updater and root; GetInfo for the health check.
pub const POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetBootState", "PrepareInactiveSlot", "WriteInactiveSlot", "ActivateInactiveSlot", "CancelUpdate", "RollbackToOtherSlot", "MarkBootSuccessful", "Reboot", "SignDeviceToken", "GetDeviceTokenKey", "GetDeviceIdentity", "GetInfo"]
users = ["root", "piccolo-updater"]
reason = "test: the updater runs the A/B sequence with device tokens; root inspects"
"#;

/// The release signing seed the test server uses.
pub const SEED: [u8; 32] = [0x5a; 32];
/// Payload size: three full 1 MiB chunks and a partial one.
pub const PAYLOAD_LEN: usize = (3 << 20) + 12345;

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub img: PathBuf,
    pub reboots: PathBuf,
    pub payload: PathBuf,
    pub data: Vec<u8>,
    pub tpm: Swtpm,
    pub broker: Broker,
    pub server: UpdateServer,
    pub updater: Updater,
    pub rt: tokio::runtime::Runtime,
    /// The slot each version lives in, to write the version file after a boot.
    pub versions: Vec<(&'static str, String)>,
}

pub fn payload(len: usize, salt: u32) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761).wrapping_add(u64::from(salt))) >> 13).to_le_bytes()[0])
        .collect()
}

pub fn available(rig_payload: &std::path::Path, version: &str) -> Value {
    json!({"status": "available", "version": version, "payload": rig_payload})
}

impl Rig {
    pub fn start(window: Option<(&str, &str)>) -> Rig {
        Rig::start_with(window, "", "")
    }

    /// As [`Rig::start`], with `extra_policy` appended to [`POLICY`] and `extra_config` to
    /// the broker's configuration (e.g. `[volumes]` for a persistence owner on the same broker).
    pub fn start_with(window: Option<(&str, &str)>, extra_policy: &str, extra_config: &str) -> Rig {
        system_users();
        let dir = tempfile::tempdir().unwrap();
        let img = os_image(dir.path(), "os.img", 64, 4, 16);
        let reboots = dir.path().join("reboots");
        let tpm = Swtpm::start();
        let broker = Broker::start(BrokerOptions {
            policy: format!("{POLICY}{extra_policy}"),
            socket_group: Some("piccolo-broker".into()),
            audit_group: Some("piccolo-audit".into()),
            extra_config: format!(
                "[tpm]\ntcti = {:?}\n[boot]\nos_disk = {:?}\nbooted_slot = \"A\"\nreboot_record = {:?}\n{extra_config}",
                tpm.tcti(),
                img.display().to_string(),
                reboots.display().to_string()
            ),
            ..Default::default()
        });
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let jwk = rt.block_on(async {
            let ch = piccolo_proto::client::connect_unix(&broker.socket).await.unwrap();
            TpmClient::new(ch).get_device_token_key(GetDeviceTokenKeyRequest {}).await.unwrap().into_inner().jwk_json
        });
        let data = payload(PAYLOAD_LEN, 1);
        let payload = dir.path().join("payload-1.1.0");
        std::fs::write(&payload, &data).unwrap();
        let server = UpdateServer::start(&jwk, SEED, &available(&payload, "1.1.0"));
        let updater = Updater::start(&UpdaterOptions {
            broker_socket: broker.socket.clone(),
            server: server.url(),
            manifest_key: server.release_pub.clone(),
            version: "1.0.0".into(),
            extra_config: String::new(),
            window: window.map(|(a, b)| (a.to_owned(), b.to_owned())),
        });
        Rig {
            dir,
            img,
            reboots,
            payload,
            data,
            tpm,
            broker,
            server,
            updater,
            rt,
            versions: vec![("USR-A", "1.0.0".into()), ("USR-B", "1.1.0".into())],
        }
    }

    pub fn boot_state(&self) -> BootState {
        self.rt.block_on(async {
            let ch = piccolo_proto::client::connect_unix(&self.broker.socket).await.unwrap();
            piccolo_proto::v1::boot_client::BootClient::new(ch)
                .get_boot_state(GetBootStateRequest {})
                .await
                .unwrap()
                .into_inner()
                .state
                .unwrap()
        })
    }

    /// A device token from the broker (as root).
    pub fn token(&self, ttl: u32) -> String {
        self.rt.block_on(async {
            let ch = piccolo_proto::client::connect_unix(&self.broker.socket).await.unwrap();
            TpmClient::new(ch)
                .sign_device_token(SignDeviceTokenRequest {
                    subscription_tier: "free".into(),
                    features: vec![],
                    ttl_seconds: ttl,
                })
                .await
                .unwrap()
                .into_inner()
                .token
        })
    }

    /// `piccoloctl update ARGS` as root; (exit code, stdout + stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let o = self.updater.ctl_as("root", args);
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.code().unwrap_or(-1), text)
    }

    pub fn reboot_requests(&self) -> String {
        std::fs::read_to_string(&self.reboots).unwrap_or_default()
    }

    /// The machine reboots: worker and broker stop, GRUB picks a slot (spending a try), and
    /// both come back on it with that slot's version. Returns the booted partition number.
    pub fn reboot(&mut self) -> u32 {
        self.updater.stop();
        self.broker.stop();
        std::fs::remove_file(&self.reboots).ok();
        let booted = piccolo_bootctl::simulator::boot_image(&self.img).unwrap().expect("something boots").number;
        let label = if booted == USR_A { "USR-A" } else { "USR-B" };
        assert!(booted == USR_A || booted == USR_B);
        let cfg = std::fs::read_to_string(&self.broker.config).unwrap();
        let cfg = cfg
            .replace("booted_slot = \"A\"", &format!("booted_slot = \"{}\"", &label[4..]))
            .replace("booted_slot = \"B\"", &format!("booted_slot = \"{}\"", &label[4..]));
        std::fs::write(&self.broker.config, cfg).unwrap();
        self.broker.restart();
        let v = self.versions.iter().find(|(l, _)| *l == label).unwrap().1.clone();
        self.updater.set_version(&v);
        self.updater.restart();
        booted
    }

    /// A health config in the rig's dir.
    pub fn health_config(&self, name: &str, sockets: &[&std::path::Path], timeout: u64) -> PathBuf {
        let p = self.dir.path().join(name);
        let socks: Vec<String> = sockets.iter().map(|s| format!("{:?}", s.display().to_string())).collect();
        std::fs::write(
            &p,
            format!(
                "broker_socket = {:?}\nsockets = [{}]\ntimeout_seconds = {timeout}\n",
                self.broker.socket.display().to_string(),
                socks.join(", ")
            ),
        )
        .unwrap();
        std::fs::set_permissions(self.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    }
}

/// The status's phase.
pub fn phase(s: &Value) -> &str {
    s["phase"].as_str().unwrap_or("")
}

/// The record entry for `version` in a status.
pub fn attempt<'a>(s: &'a Value, version: &str) -> Option<&'a Value> {
    s["attempts"].as_array()?.iter().find(|a| a["version"] == version)
}

/// Waits until the worker has asked the broker to reboot.
pub fn wait_rebooting(r: &Rig, secs: u64) -> Value {
    r.updater.wait_for(secs, "reboot requested", |s| {
        phase(s) == "rebooting" && s["message"].as_str().is_some_and(|m| m.contains("reboot requested"))
    })
}
