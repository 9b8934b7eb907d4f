// SPDX-License-Identifier: Apache-2.0
//! The Boot service through a real broker process: the A/B update sequence on an sgdisk-made
//! image (checked with real cgpt and sgdisk -v, GRUB simulated on the image between broker
//! runs), bad input refused with the table unchanged, the policy and `piccoloctl boot`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use piccolo_proto::v1::boot_client::BootClient;
use piccolo_proto::v1::write_inactive_slot_request::Msg;
use piccolo_proto::v1::{
    ActivateInactiveSlotRequest, BootState, GetBootStateRequest, MarkBootSuccessfulRequest, PrepareInactiveSlotRequest,
    RebootRequest, RollbackToOtherSlotRequest, Slot, WriteHeader, WriteInactiveSlotRequest,
};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::disks::{USR_A, USR_B, bytes_at, cgpt_attrs, cgpt_show, os_image, sgdisk_ok};
use sha2::Digest;
use tonic::Code;

/// Every Boot RPC for root, the slot RPCs for the updater (as in production).
const POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetBootState", "PrepareInactiveSlot", "WriteInactiveSlot", "ActivateInactiveSlot", "CancelUpdate", "RollbackToOtherSlot", "MarkBootSuccessful", "Reboot"]
users = ["root", "piccolo-updater"]
reason = "test: root drives the update sequence; the updater too"
"#;

/// USR-B starts at LBA 43008 in the 64 MiB test image.
const USR_B_OFFSET: u64 = 43008 * 512;

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    reboots: PathBuf,
    b: Broker,
}

fn start(policy: &str, booted: &str) -> Setup {
    system_users();
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img", 64, 4, 16);
    let reboots = dir.path().join("reboots");
    let extra = format!(
        "[boot]\nos_disk = {:?}\nbooted_slot = {booted:?}\nreboot_record = {:?}\n",
        img.display().to_string(),
        reboots.display().to_string()
    );
    let b = Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: extra,
        ..Default::default()
    });
    Setup { _dir: dir, img, reboots, b }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn client(socket: &Path) -> BootClient<tonic::transport::Channel> {
    BootClient::new(piccolo_proto::client::connect_unix(socket).await.unwrap())
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect()
}

fn hex_sha(d: &[u8]) -> String {
    sha2::Sha256::digest(d).iter().map(|b| format!("{b:02x}")).collect()
}

fn header(size: u64, sha256: &str) -> WriteInactiveSlotRequest {
    WriteInactiveSlotRequest { msg: Some(Msg::Header(WriteHeader { size, sha256: sha256.into() })) }
}

fn chunk(c: &[u8]) -> WriteInactiveSlotRequest {
    WriteInactiveSlotRequest { msg: Some(Msg::Chunk(c.to_vec())) }
}

/// The header, then the payload in 1 MiB chunks.
fn messages(data: &[u8], size: u64, sha256: &str) -> Vec<WriteInactiveSlotRequest> {
    let mut v = vec![header(size, sha256)];
    v.extend(data.chunks(1 << 20).map(chunk));
    v
}

fn slot(st: &BootState, n: usize) -> (u32, u32, bool, bool) {
    let s = &st.slots[n];
    (s.priority, s.tries, s.successful, s.verified)
}

#[test]
fn update_sequence_through_the_broker() {
    let mut s = start(POLICY, "A");
    let data = payload((3 << 20) + 12345);
    let rt = rt();
    rt.block_on(async {
        let mut c = client(&s.b.socket).await;
        let st = c.get_boot_state(GetBootStateRequest {}).await.unwrap().into_inner().state.unwrap();
        assert_eq!((st.booted, st.next_boot, st.fallback), (Slot::A as i32, Slot::A as i32, Slot::A as i32));
        assert_eq!((st.slots[1].label.as_str(), st.slots[1].partition_number), ("USR-B", USR_B));
        assert_eq!(st.booted_source, "configured");

        let st = c.prepare_inactive_slot(PrepareInactiveSlotRequest {}).await.unwrap().into_inner().state.unwrap();
        assert_eq!(slot(&st, 1), (0, 0, false, false));
        assert_eq!(cgpt_show(&s.img, USR_B), (0, 0, false));

        let msgs = messages(&data, data.len() as u64, &hex_sha(&data));
        assert_eq!(msgs.len(), 5, "header and four chunks");
        let r = c.write_inactive_slot(tokio_stream::iter(msgs)).await.unwrap().into_inner();
        assert_eq!((r.slot, r.bytes, r.sha256.as_str()), (Slot::B as i32, data.len() as u64, hex_sha(&data).as_str()));
        assert_eq!(slot(r.state.as_ref().unwrap(), 1), (0, 0, false, true));
        assert_eq!(cgpt_attrs(&s.img, USR_B), 0x200, "verified bit, still unbootable");
        assert!(bytes_at(&s.img, USR_B_OFFSET, data.len()) == data, "payload is in USR-B");

        let st = c.activate_inactive_slot(ActivateInactiveSlotRequest {}).await.unwrap().into_inner().state.unwrap();
        assert_eq!((st.next_boot, st.fallback), (Slot::B as i32, Slot::A as i32));
        assert_eq!(cgpt_show(&s.img, USR_B), (2, 1, false));
        assert_eq!(cgpt_show(&s.img, USR_A), (1, 0, true));
        sgdisk_ok(&s.img);

        let r = c.reboot(RebootRequest { delay_seconds: 3 }).await.unwrap().into_inner();
        assert_eq!(r.delay_seconds, 3);
    });
    assert_eq!(std::fs::read_to_string(&s.reboots).unwrap(), "delay=3\n");

    // The machine reboots: GRUB spends B's try and boots it; the broker comes back on B.
    let booted = piccolo_bootctl::simulator::boot_image(&s.img).unwrap().unwrap();
    assert_eq!(booted.number, USR_B);
    assert_eq!(cgpt_show(&s.img, USR_B), (2, 0, false));
    s.b.stop();
    let cfg = std::fs::read_to_string(&s.b.config).unwrap().replace("booted_slot = \"A\"", "booted_slot = \"B\"");
    std::fs::write(&s.b.config, cfg).unwrap();
    s.b.restart();

    rt.block_on(async {
        let mut c = client(&s.b.socket).await;
        let st = c.get_boot_state(GetBootStateRequest {}).await.unwrap().into_inner().state.unwrap();
        assert_eq!((st.booted, st.next_boot), (Slot::B as i32, Slot::A as i32), "not marked: would fall back");
        let st = c.mark_boot_successful(MarkBootSuccessfulRequest {}).await.unwrap().into_inner().state.unwrap();
        assert_eq!((st.next_boot, st.fallback), (Slot::B as i32, Slot::B as i32));
    });
    assert_eq!(cgpt_show(&s.img, USR_B), (2, 0, true));
    sgdisk_ok(&s.img);
    assert_eq!(piccolo_bootctl::simulator::boot_image(&s.img).unwrap().unwrap().number, USR_B);

    // Each mutating call has an intent and an outcome; the write's arguments are size and digest.
    let recs = records(&s.b);
    let intent = recs.iter().find(|r| r["rpc"] == "WriteInactiveSlot" && r["kind"] == "intent").unwrap();
    assert_eq!(intent["args"]["size"], data.len() as u64);
    assert_eq!(intent["args"]["sha256"], hex_sha(&data));
    for rpc in ["PrepareInactiveSlot", "WriteInactiveSlot", "ActivateInactiveSlot", "Reboot", "MarkBootSuccessful"] {
        let out = recs.iter().find(|r| r["rpc"] == rpc && r["kind"] == "outcome").unwrap_or_else(|| panic!("{rpc}"));
        assert_eq!(out["outcome"]["code"], "ok", "{rpc}");
    }
}

/// Runs `f` and asserts the whole image is byte-for-byte unchanged.
fn unchanged<T>(img: &Path, f: impl FnOnce() -> T) -> T {
    let before = std::fs::read(img).unwrap();
    let r = f();
    assert!(before == std::fs::read(img).unwrap(), "image changed");
    r
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let s = start(POLICY, "A");
    let rt = rt();
    let data = payload(1 << 20);
    let sha = hex_sha(&data);
    let write = |msgs: Vec<WriteInactiveSlotRequest>| {
        rt.block_on(async { client(&s.b.socket).await.write_inactive_slot(tokio_stream::iter(msgs)).await })
    };
    let code_of = |r: Result<tonic::Response<_>, tonic::Status>| r.map(|_: tonic::Response<_>| ()).unwrap_err();

    let cases: Vec<(&str, Vec<WriteInactiveSlotRequest>, Code, &str)> = vec![
        ("no header", vec![chunk(&data)], Code::InvalidArgument, "first message must be the header"),
        ("bad digest text", messages(&data, 1 << 20, "abc"), Code::InvalidArgument, "64 hex digits"),
        (
            "larger than the slot",
            messages(&data, (16 << 20) + 1, &sha),
            Code::InvalidArgument,
            "larger than slot USR-B",
        ),
        (
            "chunk above 1 MiB",
            vec![header(2 << 20, &sha), chunk(&payload(2 << 20))],
            Code::InvalidArgument,
            "1 byte to 1 MiB",
        ),
        ("second header", vec![header(1 << 20, &sha), header(1 << 20, &sha)], Code::InvalidArgument, "only the first"),
        ("empty", messages(&[], 0, &sha), Code::InvalidArgument, "empty"),
    ];
    for (name, msgs, code, text) in cases {
        let st = unchanged(&s.img, || code_of(write(msgs)));
        assert_eq!(st.code(), code, "{name}: {st:?}");
        assert!(st.message().contains(text), "{name}: {}", st.message());
    }

    // Found only at the end of the stream: the table is unchanged and the slot unverified.
    for (name, msgs, text) in [
        ("digest mismatch", messages(&data, 1 << 20, &hex_sha(b"other")), "does not match"),
        ("short", messages(&data[..1000], 1 << 20, &sha), "ended after 1000"),
        ("long", messages(&data, 1000, &sha), "longer than the announced 1000"),
    ] {
        let table_before = bytes_at(&s.img, 0, 34 * 512);
        let st = code_of(write(msgs));
        assert_eq!(st.code(), Code::DataLoss, "{name}: {st:?}");
        assert!(st.message().contains(text), "{name}: {}", st.message());
        assert!(table_before == bytes_at(&s.img, 0, 34 * 512), "{name}: primary table changed");
        assert_eq!((cgpt_show(&s.img, USR_B), cgpt_attrs(&s.img, USR_B)), ((0, 0, false), 0), "{name}");
        sgdisk_ok(&s.img);
    }

    rt.block_on(async {
        let mut c = client(&s.b.socket).await;
        let before = std::fs::read(&s.img).unwrap();
        let e = c.activate_inactive_slot(ActivateInactiveSlotRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("no verified payload"), "{}", e.message());
        let e = c.rollback_to_other_slot(RollbackToOtherSlotRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("would not boot"), "{}", e.message());
        let e = c.reboot(RebootRequest { delay_seconds: 3601 }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(before == std::fs::read(&s.img).unwrap(), "refused calls changed the image");
    });
    assert!(!s.reboots.exists(), "a refused reboot recorded nothing");
    let recs = records(&s.b);
    let digest_out = recs
        .iter()
        .filter(|r| r["rpc"] == "WriteInactiveSlot" && r["kind"] == "outcome")
        .map(|r| r["outcome"]["code"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(digest_out.iter().filter(|c| *c == "DATA_LOSS").count(), 3);
    assert_eq!(digest_out.iter().filter(|c| *c == "INVALID_ARGUMENT").count(), 6);
}

#[test]
fn wrong_device_is_a_clear_error() {
    system_users();
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(8 << 20).unwrap();
    let b = Broker::start(BrokerOptions {
        policy: POLICY.into(),
        extra_config: format!("[boot]\nos_disk = {:?}\nbooted_slot = \"A\"\n", blank.display().to_string()),
        ..Default::default()
    });
    rt().block_on(async {
        let mut c = client(&b.socket).await;
        let e = c.get_boot_state(GetBootStateRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("has no valid GPT"), "{}", e.message());
        let e = c.prepare_inactive_slot(PrepareInactiveSlotRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    });
    assert!(std::fs::read(&blank).unwrap().iter().all(|b| *b == 0));
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The production policy file: the updater, the API (read-only) and root may read the state,
/// other workers may not; `piccoloctl boot` shows and changes it.
#[test]
fn production_policy_and_piccoloctl_boot() {
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let s = start(&policy, "A");
    let o = s.b.ctl_as("piccolo-updater", &["boot", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("next boot  USR-A"), "{}", out(&o));
    let o = s.b.ctl_as("piccolo-remote", &["boot", "status"]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(out(&o).contains("GetBootState: permission denied"), "{}", out(&o));

    let o = s.b.ctl_as("root", &["boot", "status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["booted"].as_str(), v["fallback"].as_str()), (Some("USR-A"), Some("USR-A")));
    assert_eq!(v["slots"][1]["partition_number"], USR_B);

    // Root may roll back (refused here: B would not boot) and mark good, not write slots.
    let o = unchanged(&s.img, || s.b.ctl_as("root", &["boot", "rollback"]));
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("would not boot"), "{}", out(&o));
    let o = s.b.ctl_as("root", &["boot", "mark-good"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("USR-A  3     1         0      yes"), "{}", out(&o));

    // Make B bootable and successful by hand, then roll back to it with piccoloctl.
    piccolo_testkit::disks::cgpt_set(&s.img, USR_B, 1, 0, true);
    let o = s.b.ctl_as("root", &["boot", "rollback"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("next boot  USR-B"), "{}", out(&o));
    assert_eq!(cgpt_show(&s.img, USR_B), (2, 0, true));
    assert_eq!(cgpt_show(&s.img, USR_A), (1, 0, true));
    sgdisk_ok(&s.img);
}

/// Without `[boot]` the broker looks for the OS disk behind the running `/usr`; this test
/// machine has none (overlay, or a disk without USR-A/USR-B): a clear error, no guess.
#[test]
fn no_os_disk_on_this_machine_is_a_clear_error() {
    system_users();
    let b = Broker::start(BrokerOptions { policy: POLICY.into(), ..Default::default() });
    rt().block_on(async {
        let e = client(&b.socket).await.prepare_inactive_slot(PrepareInactiveSlotRequest {}).await.unwrap_err();
        let clear = (e.code() == Code::Unavailable && e.message().starts_with("cannot find the OS disk"))
            || (e.code() == Code::FailedPrecondition && e.message().contains("is not an A/B OS disk"));
        assert!(clear, "{:?}: {}", e.code(), e.message());
    });
    let rec = records(&b).into_iter().find(|r| r["rpc"] == "PrepareInactiveSlot" && r["kind"] == "outcome").unwrap();
    assert_ne!(rec["outcome"]["code"], "ok");
}
