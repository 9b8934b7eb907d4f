// SPDX-License-Identifier: Apache-2.0
//! The Efi service through a real broker process, with a loop-mounted ext4 filesystem as the
//! efivarfs root (real inode flags: `chattr +i` / `lsattr`): allowed get/set/delete as root,
//! the `efi_variables` allow-list (denied calls change nothing), strict names, GUIDs and
//! attributes (INVALID_ARGUMENT, nothing changed), audit arguments, and "no EFI".

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use piccolo_proto::v1::broker_client::BrokerClient;
use piccolo_proto::v1::efi_client::EfiClient;
use piccolo_proto::v1::{DeleteEfiVariableRequest, GetEfiVariableRequest, GetInfoRequest, SetEfiVariableRequest};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::ext4::{Ext4, chattr, immutable};
use sha2::Digest;
use tonic::Code;

const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
const SDBOOT: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Root may get/set/delete BootNext and LoaderEntryOneShot, and only get BootOrder.
fn allow_list_policy() -> String {
    format!(
        r#"version = 1

[[rule]]
rpcs = ["GetInfo"]
users = ["root"]
reason = "test: backends"

[[rule]]
rpcs = ["GetEfiVariable", "SetEfiVariable", "DeleteEfiVariable"]
users = ["root"]
efi_variables = ["BootNext-{GLOBAL}", "LoaderEntryOneShot-{SDBOOT}"]
reason = "test: operators choose the next boot"

[[rule]]
rpcs = ["GetEfiVariable"]
users = ["root"]
efi_variables = ["BootOrder-{GLOBAL}"]
reason = "test: operators read the boot order"
"#
    )
}

/// Root may call the three RPCs on anything (so bad arguments reach the handler).
const ANY_POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["GetInfo"]
users = ["root"]
reason = "test: backends"

[[rule]]
rpcs = ["GetEfiVariable", "SetEfiVariable", "DeleteEfiVariable"]
users = ["root"]
efi_variables = ["*"]
reason = "test: the handler's own validation"
"#;

fn start(policy: &str, root: &Path) -> Broker {
    system_users();
    Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[efi]\nefivars_root = {:?}\n", root.display().to_string()),
        ..Default::default()
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn efi(b: &Broker) -> (tokio::runtime::Runtime, EfiClient<tonic::transport::Channel>) {
    let rt = rt();
    let ch = rt.block_on(piccolo_proto::client::connect_unix(&b.socket)).unwrap();
    (rt, EfiClient::new(ch))
}

fn get(name: &str, guid: &str) -> GetEfiVariableRequest {
    GetEfiVariableRequest { name: name.into(), vendor_guid: guid.into() }
}

fn set(name: &str, guid: &str, attributes: Option<u32>, data: &[u8]) -> SetEfiVariableRequest {
    SetEfiVariableRequest { name: name.into(), vendor_guid: guid.into(), attributes, data: data.to_vec() }
}

fn del(name: &str, guid: &str) -> DeleteEfiVariableRequest {
    DeleteEfiVariableRequest { name: name.into(), vendor_guid: guid.into() }
}

fn var_bytes(attrs: u32, data: &[u8]) -> Vec<u8> {
    let mut v = attrs.to_le_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16().chain([0]).flat_map(|u| u.to_le_bytes()).collect()
}

/// Every file under `dir` (recursively) with its content and immutable flag.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, bool)> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            if !p.ends_with("lost+found") {
                m.extend(snapshot(&p));
            }
        } else {
            m.insert(p.clone(), (std::fs::read(&p).unwrap(), immutable(&p)));
        }
    }
    m
}

fn efi_backend(b: &Broker) -> (bool, String) {
    let rt = rt();
    let info = rt.block_on(async {
        let ch = piccolo_proto::client::connect_unix(&b.socket).await.unwrap();
        BrokerClient::new(ch).get_info(GetInfoRequest {}).await.unwrap().into_inner()
    });
    let e = info.backends.iter().find(|x| x.name == "efi").expect("efi backend listed");
    (e.available, e.detail.clone())
}

#[test]
fn root_gets_sets_and_deletes_allowed_variables() {
    let fs = Ext4::new(8);
    let boot_next = fs.mnt.join(format!("BootNext-{GLOBAL}"));
    std::fs::write(&boot_next, var_bytes(7, &[1, 0])).unwrap();
    chattr(&boot_next, "+i");
    let b = start(&allow_list_policy(), &fs.mnt);
    let (rt, mut c) = efi(&b);

    let v = rt.block_on(c.get_efi_variable(get("BootNext", GLOBAL))).unwrap().into_inner();
    assert_eq!((v.attributes, v.data), (7, vec![1, 0]));

    // An uppercase GUID is the same variable (and the same policy value).
    rt.block_on(c.set_efi_variable(set("BootNext", &GLOBAL.to_uppercase(), None, &[4, 0]))).unwrap();
    assert_eq!(std::fs::read(&boot_next).unwrap(), var_bytes(7, &[4, 0]));
    assert!(immutable(&boot_next), "the immutable flag is back after the write");

    let one_shot = fs.mnt.join(format!("LoaderEntryOneShot-{SDBOOT}"));
    let entry = utf16z("piccolo-usb.conf");
    rt.block_on(c.set_efi_variable(set("LoaderEntryOneShot", SDBOOT, Some(7), &entry))).unwrap();
    assert_eq!(std::fs::read(&one_shot).unwrap(), var_bytes(7, &entry));
    let v = rt.block_on(c.get_efi_variable(get("LoaderEntryOneShot", SDBOOT))).unwrap().into_inner();
    assert_eq!(v.data, entry);

    rt.block_on(c.delete_efi_variable(del("BootNext", GLOBAL))).unwrap();
    assert!(!boot_next.exists(), "immutable variable deleted");
    let e = rt.block_on(c.get_efi_variable(get("BootNext", GLOBAL))).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rt.block_on(c.delete_efi_variable(del("BootNext", GLOBAL))).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // GetInfo says this is a plain directory, not a real efivarfs.
    let (available, detail) = efi_backend(&b);
    assert!(available && detail.contains("plain directory, not efivarfs"), "{detail}");

    // Audit: name, guid, size and sha256 of the data; never the data itself.
    let recs = records(&b);
    let intents: Vec<_> = recs.iter().filter(|r| r["rpc"] == "SetEfiVariable" && r["kind"] == "intent").collect();
    assert_eq!(intents.len(), 2);
    let args = &intents[1]["args"];
    let keys: Vec<&str> = args.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["guid", "name", "sha256", "size"], "{args}");
    assert_eq!((args["name"].as_str(), args["guid"].as_str()), (Some("LoaderEntryOneShot"), Some(SDBOOT)));
    assert_eq!(args["size"].as_u64(), Some(entry.len() as u64));
    let sha: String = sha2::Sha256::digest(&entry).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(args["sha256"].as_str(), Some(sha.as_str()));
    let outcomes: Vec<_> = recs.iter().filter(|r| r["rpc"] == "SetEfiVariable" && r["kind"] == "outcome").collect();
    assert!(outcomes.iter().all(|r| r["outcome"]["code"] == "ok"), "{outcomes:?}");
    for r in recs.iter().filter(|r| r["rpc"] == "GetEfiVariable" || r["rpc"] == "DeleteEfiVariable") {
        let keys: Vec<&str> = r["args"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["guid", "name"], "{r}");
    }
    chattr(&one_shot, "-i");
}

#[test]
fn variables_not_on_the_allow_list_are_denied_and_unchanged() {
    let fs = Ext4::new(8);
    let boot_order = fs.mnt.join(format!("BootOrder-{GLOBAL}"));
    std::fs::write(&boot_order, var_bytes(7, &[1, 0, 2, 0])).unwrap();
    chattr(&boot_order, "+i");
    let other_vendor = fs.mnt.join(format!("BootNext-{SDBOOT}"));
    std::fs::write(&other_vendor, var_bytes(7, &[1, 0])).unwrap();
    let b = start(&allow_list_policy(), &fs.mnt);
    let (rt, mut c) = efi(&b);
    let before = snapshot(&fs.mnt);

    // BootOrder may be read, not written or deleted.
    let v = rt.block_on(c.get_efi_variable(get("BootOrder", GLOBAL))).unwrap().into_inner();
    assert_eq!(v.data, [1, 0, 2, 0]);
    let denied = [
        rt.block_on(c.set_efi_variable(set("BootOrder", GLOBAL, None, &[2, 0, 1, 0]))).unwrap_err(),
        rt.block_on(c.delete_efi_variable(del("BootOrder", GLOBAL))).unwrap_err(),
        // The allowed name under another vendor GUID is another variable.
        rt.block_on(c.set_efi_variable(set("BootNext", SDBOOT, None, &[9, 0]))).unwrap_err(),
        rt.block_on(c.delete_efi_variable(del("BootNext", SDBOOT))).unwrap_err(),
        rt.block_on(c.get_efi_variable(get("BootNext", SDBOOT))).unwrap_err(),
        // New variables not on the list are not created.
        rt.block_on(c.set_efi_variable(set("Boot0001", GLOBAL, None, &[1]))).unwrap_err(),
        // Names that are not valid never match an exact allow-list.
        rt.block_on(c.set_efi_variable(set("../BootNext", GLOBAL, None, &[1]))).unwrap_err(),
        rt.block_on(c.set_efi_variable(set("BootNext", &format!("{GLOBAL}/../x"), None, &[1]))).unwrap_err(),
    ];
    for e in &denied {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    assert_eq!(snapshot(&fs.mnt), before, "denied calls changed nothing (content and flags)");
    assert!(!fs.mnt.join(format!("Boot0001-{GLOBAL}")).exists());

    let recs = records(&b);
    let deny: Vec<_> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(deny.len(), denied.len(), "one deny record per refused call");
    assert!(deny.iter().all(|r| r["kind"] == "call" && r["outcome"]["code"] == "PERMISSION_DENIED"));
    chattr(&boot_order, "-i");
}

#[test]
fn bad_names_guids_and_attributes_are_invalid_and_change_nothing() {
    let fs = Ext4::new(8);
    let root = fs.mnt.join("efivars");
    std::fs::create_dir(&root).unwrap();
    // Targets a traversal would reach, outside and inside the root.
    std::fs::write(fs.mnt.join(format!("BootNext-{GLOBAL}")), var_bytes(7, &[1, 0])).unwrap();
    std::fs::write(fs.mnt.join("x"), b"outside").unwrap();
    let inside = root.join(format!("BootNext-{GLOBAL}"));
    std::fs::write(&inside, var_bytes(7, &[2, 0])).unwrap();
    chattr(&inside, "+i");
    let b = start(ANY_POLICY, &root);
    let (rt, mut c) = efi(&b);
    let before = snapshot(&fs.mnt);

    let long = "A".repeat(1025);
    let bad_names = [
        "",
        ".",
        "..",
        "../BootNext",
        "a/b",
        "/etc/passwd",
        ".BootNext",
        "Boot..Next",
        "Boot Next",
        "Bööt",
        "a\0b",
        &long,
    ];
    let bad_guids = [
        "",
        "8be4df6193ca11d2aa0d00e098032b8c",
        "{8be4df61-93ca-11d2-aa0d-00e098032b8c}",
        "8be4df61-93ca-11d2-aa0d-00e098032b8",
        "8be4df61-93ca-11d2-aa0d-00e098032b8c0",
        "8be4df61-93ca-11d2-aa0d-00e098032b8g",
        "../../x",
        "8be4df61-93ca-11d2-aa0d-00e098032b8c/../../x",
    ];
    let mut errors = Vec::new();
    for n in bad_names {
        errors.push(rt.block_on(c.get_efi_variable(get(n, GLOBAL))).unwrap_err());
        errors.push(rt.block_on(c.set_efi_variable(set(n, GLOBAL, None, &[1, 0]))).unwrap_err());
        errors.push(rt.block_on(c.delete_efi_variable(del(n, GLOBAL))).unwrap_err());
    }
    for g in bad_guids {
        errors.push(rt.block_on(c.get_efi_variable(get("BootNext", g))).unwrap_err());
        errors.push(rt.block_on(c.set_efi_variable(set("BootNext", g, None, &[1, 0]))).unwrap_err());
        errors.push(rt.block_on(c.delete_efi_variable(del("BootNext", g))).unwrap_err());
    }
    // Attributes outside NV|BS|RT, RUNTIME without BOOTSERVICE, no data, too much data.
    for a in [0x4, 0x5, 0x8, 0x10, 0x20, 0x47, 0x80, 0x8000_0007] {
        errors.push(rt.block_on(c.set_efi_variable(set("BootNext", GLOBAL, Some(a), &[9, 0]))).unwrap_err());
    }
    errors.push(rt.block_on(c.set_efi_variable(set("BootNext", GLOBAL, None, &[]))).unwrap_err());
    errors.push(rt.block_on(c.set_efi_variable(set("BootNext", GLOBAL, None, &vec![0; (64 << 10) + 1]))).unwrap_err());
    for e in &errors {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    assert_eq!(snapshot(&fs.mnt), before, "nothing changed inside or outside the root");

    // The largest allowed write works, and reads back.
    let big: Vec<u8> = (0..64u32 << 10).map(|i| i.to_le_bytes()[0]).collect();
    rt.block_on(c.set_efi_variable(set("BootNext", GLOBAL, Some(3), &big))).unwrap();
    assert_eq!(std::fs::read(&inside).unwrap(), var_bytes(3, &big));
    assert!(immutable(&inside));
    let v = rt.block_on(c.get_efi_variable(get("BootNext", GLOBAL))).unwrap().into_inner();
    assert_eq!((v.attributes, v.data.len()), (3, big.len()));

    // Every refused call has its intent and an INVALID_ARGUMENT outcome in the audit log,
    // with bounded argument copies.
    let recs = records(&b);
    let invalid = recs.iter().filter(|r| r["outcome"]["code"] == "INVALID_ARGUMENT").count();
    assert_eq!(invalid, errors.len());
    assert!(recs.iter().all(|r| r["args"]["name"].as_str().is_none_or(|n| n.len() <= 1024)));
    chattr(&inside, "-i");
}

#[test]
fn no_efivarfs_is_a_clear_no_efi_error() {
    let tmp = tempfile::tempdir().unwrap();
    for root in [tmp.path().join("no-such-dir"), PathBuf::from("/sys/kernel")] {
        let b = start(ANY_POLICY, &root);
        let (rt, mut c) = efi(&b);
        let errors = [
            rt.block_on(c.get_efi_variable(get("BootNext", GLOBAL))).unwrap_err(),
            rt.block_on(c.set_efi_variable(set("BootNext", GLOBAL, None, &[1, 0]))).unwrap_err(),
            rt.block_on(c.delete_efi_variable(del("BootNext", GLOBAL))).unwrap_err(),
        ];
        for e in &errors {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().starts_with("no EFI: "), "{}", e.message());
        }
        let (available, detail) = efi_backend(&b);
        assert!(!available && detail.starts_with("no EFI: "), "{detail}");
        // Argument errors still come first.
        let e = rt.block_on(c.get_efi_variable(get("a/b", GLOBAL))).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    assert!(!tmp.path().join("no-such-dir").exists(), "nothing was created");
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The shipped policy with `piccoloctl efi`: root chooses the next boot; workers get
/// nothing, not even reads.
#[test]
fn production_policy_and_piccoloctl_efi() {
    let fs = Ext4::new(8);
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let b = start(&policy, &fs.mnt);
    let boot_next = fs.mnt.join(format!("BootNext-{GLOBAL}"));

    let o = b.ctl_as("root", &["efi", "set", "BootNext", "Boot000A"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert_eq!(std::fs::read(&boot_next).unwrap(), var_bytes(7, &[0x0a, 0]));
    chattr(&boot_next, "+i");
    let o = b.ctl_as("root", &["efi", "set", "BootNext", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert_eq!(std::fs::read(&boot_next).unwrap(), var_bytes(7, &[3, 0]));
    assert!(immutable(&boot_next));
    let o = b.ctl_as("root", &["efi", "get", "BootNext"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("attributes  0x7") && out(&o).contains("value       Boot0003"), "{}", out(&o));

    let o = b.ctl_as("root", &["efi", "set", "BootOrder", "3,1,Boot0002"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let o = b.ctl_as("root", &["efi", "get", "BootOrder", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["value"], "Boot0003,Boot0001,Boot0002");
    assert_eq!(v["data_hex"], "030001000200");

    let o = b.ctl_as("root", &["efi", "set", "LoaderEntryOneShot", "piccolo-usb.conf"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let one_shot = fs.mnt.join(format!("LoaderEntryOneShot-{SDBOOT}"));
    assert_eq!(std::fs::read(&one_shot).unwrap(), var_bytes(7, &utf16z("piccolo-usb.conf")));
    let o = b.ctl_as("root", &["efi", "get", "LoaderEntryOneShot"]);
    assert!(out(&o).contains("value       piccolo-usb.conf"), "{}", out(&o));

    let before = snapshot(&fs.mnt);
    for (user, args) in [
        ("piccolo-api", &["efi", "get", "BootNext"][..]),
        ("piccolo-updater", &["efi", "set", "BootNext", "1"]),
        ("piccolo-updater", &["efi", "delete", "LoaderEntryOneShot"]),
        ("root", &["efi", "set", "Boot0001", "--hex", "0100"]),
        ("root", &["efi", "set", "BootNext", "1", "--guid", SDBOOT]),
    ] {
        let o = b.ctl_as(user, args);
        assert_eq!(o.status.code(), Some(3), "{user} {args:?}: {}", out(&o));
        assert!(out(&o).contains("permission denied"), "{}", out(&o));
    }
    let o = b.ctl_as("root", &["efi", "set", "BootNext", "--hex", "01", "--attributes", "0x27"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert_eq!(snapshot(&fs.mnt), before, "refused calls changed nothing");

    let o = b.ctl_as("root", &["efi", "delete", "BootNext"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(!boot_next.exists());
    let o = b.ctl_as("root", &["efi", "get", "BootNext"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("does not exist"), "{}", out(&o));
}
