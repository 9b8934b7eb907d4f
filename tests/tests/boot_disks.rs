// SPDX-License-Identifier: Apache-2.0
//! The Disks service through a real broker: listing the real /sys/block, planning and
//! running installs of a test OS image onto a loop device (file and streamed images,
//! verified byte for byte), the `disks` allow-list and the system-disk refusal.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use piccolo_proto::v1::disks_client::DisksClient;
use piccolo_proto::v1::install_to_disk_request::Msg;
use piccolo_proto::v1::{Image, InstallHeader, InstallToDiskRequest, image, install_to_disk_response};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::disks::{LoopDev, bytes_at, cgpt_show, os_image, run};
use sha2::Digest;

const DISK: u64 = 40 << 20;
const IMAGE: usize = 24 << 20;

fn policy(disks: &str) -> String {
    format!(
        r#"version = 1

[[rule]]
rpcs = ["ListDisks", "PlanInstall"]
users = ["root"]
reason = "test: operators look"

[[rule]]
rpcs = ["InstallToDisk"]
users = ["root"]
disks = [{disks}]
reason = "test: operators install"
"#
    )
}

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    lo: LoopDev,
}

/// A 24 MiB OS image with data in every partition, in `images/`, and a 40 MiB loop device
/// holding an old partition table and data.
fn setup() -> Setup {
    system_users();
    let dir = tempfile::Builder::new().prefix("piccolo-disks-").tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let image = os_image(&dir.path().join("images"), "os.img", 24, 2, 8);
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    for (fill, lba) in [(0x11u8, 2048u64), (0x22, 6144), (0x33, 22528), (0x44, 38912)] {
        f.write_all_at(&vec![fill; 1 << 20], lba * 512).unwrap();
    }
    let target = dir.path().join("target.img");
    std::fs::File::create(&target).unwrap().set_len(DISK).unwrap();
    run(Command::new("sgdisk").args(["-o", "-n", "1:0:+30M", "-c", "1:OLD-DATA"]).arg(&target));
    let lo = LoopDev::attach(&target);
    Setup { dir, image, lo }
}

fn broker(s: &Setup, policy: &str, extra: &str) -> Broker {
    let images = s.dir.path().join("images").display().to_string();
    Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[boot]\nimage_dirs = [{images:?}]\n{extra}"),
        ..Default::default()
    })
}

fn sha_hex(p: &Path) -> String {
    sha2::Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn device(s: &Setup) -> Vec<u8> {
    bytes_at(&s.lo.dev, 0, usize::try_from(DISK).unwrap())
}

#[test]
fn list_plan_and_install_with_piccoloctl() {
    let s = setup();
    let b = broker(&s, &policy("\"loop*\""), "");
    let name = s.lo.name();
    let img = s.image.display().to_string();

    let o = b.ctl_as("root", &["disks", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let disks: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let me = disks.as_array().unwrap().iter().find(|d| d["name"] == name.as_str()).expect("loop device listed");
    assert_eq!((me["size_bytes"].as_u64(), me["transport"].as_str()), (Some(DISK), Some("loop")));
    assert_eq!(me["holds_running_system"], false);

    let o = b.ctl_as("root", &["install", "--plan", "--target", &name, "--image", &img]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let text = out(&o);
    assert!(text.contains(&format!("overwrites bytes 0..{IMAGE} of {DISK}")), "{text}");
    assert!(text.contains("OLD-DATA") && text.contains("partly overwritten"), "{text}");
    assert!(text.contains(&format!("zeroes     bytes {}..{DISK}", DISK - (1 << 20))), "{text}");
    assert!(device(&s)[..IMAGE] != std::fs::read(&s.image).unwrap()[..], "a plan writes nothing");

    let o = b.ctl_as("root", &["install", "--run", "--target", &name, "--image", &img, "--sha256", &sha_hex(&s.image)]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let text = out(&o);
    for phase in ["checking", "writing", "verifying", "installed 25165824 bytes onto"] {
        assert!(text.contains(phase), "{phase}: {text}");
    }
    assert!(device(&s)[..IMAGE] == std::fs::read(&s.image).unwrap()[..], "device differs from the image");
    assert_eq!(cgpt_show(&s.lo.dev, 3), (1, 0, true), "an A/B OS disk now");

    // Streamed from the operator's side: a different image from anywhere on their disk.
    let other = s.dir.path().join("other.img");
    std::fs::copy(&s.image, &other).unwrap();
    std::fs::OpenOptions::new().write(true).open(&other).unwrap().write_all_at(&[0x5a; 4096], 6144 * 512).unwrap();
    let o = b.ctl_as(
        "root",
        &[
            "install",
            "--run",
            "--target",
            &name,
            "--stream",
            &other.display().to_string(),
            "--sha256",
            &sha_hex(&other),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(device(&s)[..IMAGE] == std::fs::read(&other).unwrap()[..]);

    let o = b.ctl_as("root", &["install", "--run", "--target", &name, "--image", &img]);
    assert_eq!(o.status.code(), Some(2), "--run needs --sha256: {}", out(&o));
}

#[test]
fn progress_streams_before_the_result() {
    let s = setup();
    let b = broker(&s, &policy("\"loop*\""), "");
    let data = std::fs::read(&s.image).unwrap();
    let sha: String = sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let mut msgs = vec![InstallToDiskRequest {
        msg: Some(Msg::Header(InstallHeader {
            target: s.lo.name(),
            image: Some(Image { source: Some(image::Source::StreamSize(data.len() as u64)) }),
            sha256: sha.clone(),
        })),
    }];
    msgs.extend(data.chunks(1 << 20).map(|c| InstallToDiskRequest { msg: Some(Msg::Chunk(c.to_vec())) }));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let got = rt.block_on(async {
        let mut c = DisksClient::new(piccolo_proto::client::connect_unix(&b.socket).await.unwrap());
        let mut st = c.install_to_disk(tokio_stream::iter(msgs)).await.unwrap().into_inner();
        let mut got = Vec::new();
        while let Some(m) = st.message().await.unwrap() {
            got.push(m.msg.unwrap());
        }
        got
    });
    let phases: Vec<String> = got
        .iter()
        .filter_map(|m| match m {
            install_to_disk_response::Msg::Progress(p) => Some(p.phase.clone()),
            _ => None,
        })
        .collect();
    assert!(phases.first().map(String::as_str) == Some("writing") && phases.contains(&"verifying".to_string()));
    match got.last().unwrap() {
        install_to_disk_response::Msg::Result(r) => {
            assert_eq!(
                (r.target.as_str(), r.bytes, r.sha256.as_str()),
                (s.lo.name().as_str(), IMAGE as u64, sha.as_str())
            );
        }
        other => panic!("last message is not the result: {other:?}"),
    }
    assert!(device(&s)[..IMAGE] == data[..]);
    // The outcome was audited before the result was sent.
    let recs = records(&b);
    let outcome = recs.iter().find(|r| r["rpc"] == "InstallToDisk" && r["kind"] == "outcome").unwrap();
    assert_eq!(outcome["outcome"]["code"], "ok");
    let intent = recs.iter().find(|r| r["rpc"] == "InstallToDisk" && r["kind"] == "intent").unwrap();
    assert_eq!(intent["args"]["target"], s.lo.name());
    assert_eq!(intent["args"]["image"]["stream_size"], IMAGE as u64);
}

#[test]
fn refusals_leave_the_disk_unchanged() {
    let s = setup();
    let name = s.lo.name();
    let img = s.image.display().to_string();
    let sha = sha_hex(&s.image);
    let before = device(&s);

    // Not on the policy's allow-list.
    let b = broker(&s, &policy("\"sd*\", \"nvme*\""), "");
    let o = b.ctl_as("root", &["install", "--run", "--target", &name, "--image", &img, "--sha256", &sha]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(out(&o).contains("InstallToDisk: permission denied"), "{}", out(&o));
    let deny = records(&b).into_iter().find(|r| r["rpc"] == "InstallToDisk").unwrap();
    assert_eq!((deny["decision"].as_str(), deny["args"]["target"].as_str()), (Some("deny"), Some(name.as_str())));
    drop(b);

    // The configured OS disk.
    let extra = format!("os_disk = {:?}\n", s.lo.dev.display().to_string());
    let b = broker(&s, &policy("\"loop*\""), &extra);
    let o = b.ctl_as("root", &["install", "--run", "--target", &name, "--image", &img, "--sha256", &sha]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("FailedPrecondition") && out(&o).contains("holds the running system"), "{}", out(&o));
    let o = b.ctl_as("root", &["install", "--plan", "--target", &name, "--image", &img]);
    assert!(out(&o).contains("holds the running system"), "{}", out(&o));
    drop(b);

    // Wrong digest, image outside the allowed directory, a partition name, an unknown disk.
    let b = broker(&s, &policy("\"loop*\""), "");
    let zero = "0".repeat(64);
    let outside = s.dir.path().join("target.img").display().to_string();
    for (args, code, text) in [
        (vec!["--image", img.as_str(), "--sha256", zero.as_str()], 1, "does not match"),
        (
            vec!["--image", outside.as_str(), "--sha256", sha.as_str()],
            2,
            "not a regular file in an allowed image directory",
        ),
        (vec!["--image", img.as_str(), "--sha256", "xyz"], 2, "64 hex digits"),
    ] {
        let mut full = vec!["install", "--run", "--target", name.as_str()];
        full.extend(args);
        let o = b.ctl_as("root", &full);
        assert_eq!(o.status.code(), Some(code), "{full:?}: {}", out(&o));
        assert!(out(&o).contains(text), "{full:?}: {}", out(&o));
    }
    assert!(before == device(&s), "a refused install changed the disk");
}
