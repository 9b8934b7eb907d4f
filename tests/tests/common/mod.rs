// SPDX-License-Identifier: Apache-2.0
//! Shared set-up for the broker integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use piccolo_testkit::broker::{Broker, BrokerOptions};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Creates the production system users and groups from `systemd/sysusers.d/piccolo.conf`.
pub fn system_users() {
    piccolo_testkit::users::apply_sysusers(&repo().join("systemd/sysusers.d/piccolo.conf"));
}

/// GetInfo for piccolo-api only; WhoAmI for every socket-group member and root.
pub const MATRIX_POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetInfo"]
users = ["piccolo-api"]
reason = "test: the API worker reads broker info"

[[rule]]
rpcs = ["WhoAmI"]
groups = ["piccolo-broker"]
reason = "test: any worker"

[[rule]]
rpcs = ["WhoAmI"]
users = ["root"]
reason = "test: operators"
"#;

/// Everything allowed to root only (for tests that drive the broker in-process as root).
pub const ROOT_POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetInfo", "WhoAmI"]
users = ["root"]
reason = "test: root drives the broker"
"#;

/// A broker with the production users and socket/audit groups.
pub fn broker(policy: &str) -> Broker {
    system_users();
    Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        ..Default::default()
    })
}

/// Parsed audit records of the live file.
pub fn records(b: &Broker) -> Vec<serde_json::Value> {
    b.audit_text().lines().map(|l| serde_json::from_str(l).expect("audit line is JSON")).collect()
}
