// SPDX-License-Identifier: Apache-2.0
//! The Volumes service through a real broker, real gocryptfs over FUSE and real system
//! users: a worker mounts its volume and sees its own private files; wrong keys, foreign
//! ids and bad ids are refused and leave nothing behind; a killed gocryptfs is reported
//! as needs_repair and a remount repairs it; the gocryptfs CLI opens a broker-made volume;
//! neither the key nor a plaintext marker ever lands in the audit log, in gocryptfs's
//! command line or anywhere under the state dir.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper_util::rt::TokioIo;
use piccolo_proto::v1::volumes_client::VolumesClient;
use piccolo_proto::v1::{
    CreateVolumeRequest, MountVolumeRequest, UnmountVolumeRequest, VolumeClass, VolumeInfo, VolumeStatusRequest,
};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::users::run_as;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

const TEST_POLICY: &str = r#"version = 1

[[rule]]
rpcs = ["CreateVolume", "MountVolume", "UnmountVolume", "VolumeStatus"]
users = ["piccolo-apps"]
volumes = ["app-*"]
reason = "test: application volumes"

[[rule]]
rpcs = ["CreateVolume", "MountVolume", "UnmountVolume", "VolumeStatus"]
users = ["piccolo-api"]
volumes = ["control", "bootstrap"]
reason = "test: the persistence owner"

[[rule]]
rpcs = ["CreateVolume", "VolumeStatus"]
users = ["root"]
volumes = ["*"]
reason = "test: root may try any id"
"#;

fn start(policy: &str) -> Broker {
    system_users();
    let b = Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        ..Default::default()
    });
    // The config names the state dir inside the broker's temp dir; restart with it.
    let mut b = b;
    b.stop();
    let state = b.path("state").display().to_string();
    let mut cfg = std::fs::read_to_string(&b.config).unwrap();
    cfg.push_str(&format!("\n[volumes]\nstate_dir = {state:?}\n"));
    std::fs::write(&b.config, cfg).unwrap();
    b.restart();
    b
}

/// Detaches whatever a test left mounted under the broker's state dir (also on panic).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.0.join("mounts")).into_iter().flatten().flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn state(b: &Broker) -> PathBuf {
    b.path("state")
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut v).unwrap();
    v
}

/// A gRPC client whose connection the broker sees as coming from `user` (root: as is,
/// through the ordinary client constructor).
async fn client(b: &Broker, user: &str) -> VolumesClient<Channel> {
    if user == "root" {
        return VolumesClient::new(piccolo_proto::client::connect_unix(&b.socket).await.unwrap());
    }
    let std = piccolo_testkit::peer::connect_as(user, &b.socket);
    std.set_nonblocking(true).unwrap();
    let slot = Arc::new(Mutex::new(Some(std)));
    let ch = Endpoint::from_static("http://broker.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = slot.lock().unwrap().take();
            async move {
                let s = s.ok_or_else(|| std::io::Error::other("connection already used"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(s)?))
            }
        }))
        .await
        .unwrap();
    VolumesClient::new(ch)
}

async fn create(c: &mut VolumesClient<Channel>, id: &str, class: VolumeClass, key: &[u8]) -> Result<(), tonic::Status> {
    c.create_volume(CreateVolumeRequest {
        volume_id: id.into(),
        class: class.into(),
        key: key.to_vec(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn create_as(
    c: &mut VolumesClient<Channel>,
    id: &str,
    class: VolumeClass,
    key: &[u8],
    user: &str,
) -> Result<(), tonic::Status> {
    let req =
        CreateVolumeRequest { volume_id: id.into(), class: class.into(), key: key.to_vec(), present_as: user.into() };
    c.create_volume(req).await.map(|_| ())
}

async fn mount(c: &mut VolumesClient<Channel>, id: &str, key: &[u8]) -> Result<(String, u32), tonic::Status> {
    c.mount_volume(MountVolumeRequest { volume_id: id.into(), key: key.to_vec() })
        .await
        .map(|r| r.into_inner())
        .map(|r| (r.mountpoint, r.gocryptfs_pid))
}

async fn unmount(c: &mut VolumesClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    c.unmount_volume(UnmountVolumeRequest { volume_id: id.into() }).await.map(|_| ())
}

async fn status(c: &mut VolumesClient<Channel>, id: &str) -> Result<Vec<VolumeInfo>, tonic::Status> {
    c.volume_status(VolumeStatusRequest { volume_id: id.into() }).await.map(|r| r.into_inner().volumes)
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap().uid.as_raw()
}

fn gid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap().gid.as_raw()
}

fn sh_as(user: &str, script: &str) -> std::process::Output {
    run_as(user, Path::new("/bin/sh"), &["-c", script])
}

fn gocryptfs_mounts_on(p: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()) && l.contains(" - fuse.gocryptfs "))
        .count()
}

/// Every regular file under `dir` (not following symlinks), with its bytes.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts none of `needles` occurs in any file under `dir` or in its file names.
fn assert_nowhere(dir: &Path, needles: &[&[u8]]) {
    let files = all_files(dir);
    assert!(!files.is_empty(), "nothing to search under {}", dir.display());
    for (p, bytes) in &files {
        for n in needles {
            assert!(!contains(bytes, n), "{} contains a secret/marker", p.display());
            assert!(!contains(p.as_os_str().as_encoded_bytes(), n), "{} names a secret/marker", p.display());
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_mounts_its_private_volume_and_nothing_leaks() {
    let b = start(TEST_POLICY);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let key_hex = hex::encode(&key);
    let marker = format!("piccolo-marker-{}", hex::encode(random(12)));
    let mut apps = client(&b, "piccolo-apps").await;
    let (uid, gid) = (uid_of("piccolo-apps"), gid_of("piccolo-apps"));

    create(&mut apps, "app-photos", VolumeClass::Application, &key).await.unwrap();
    let e = create(&mut apps, "app-photos", VolumeClass::Application, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let (mnt, pid) = mount(&mut apps, "app-photos", &key).await.unwrap();
    let mnt = PathBuf::from(mnt);
    assert_eq!(mnt, state(&b).join("mounts/app-photos"));
    assert_ne!(pid, 0);
    assert_eq!(gocryptfs_mounts_on(&mnt), 1);

    // The key is not in gocryptfs's command line or environment.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(contains(&cmdline, mnt.as_os_str().as_encoded_bytes()), "pid {pid} serves the mount");
    for hay in [&cmdline, &environ] {
        assert!(!contains(hay, key_hex.as_bytes()) && !contains(hay, &key));
    }

    // The worker writes; everything is its own; the root is 0700.
    let m = mnt.display();
    let out = sh_as(
        "piccolo-apps",
        &format!(
            "printf %s {marker} > {m}/secret.txt && mkdir {m}/sub && stat -c '%u %g %a' {m} {m}/secret.txt {m}/sub"
        ),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines[0], format!("{uid} {gid} 700"));
    assert!(lines[1].starts_with(&format!("{uid} {gid} ")), "{lines:?}");
    assert!(lines[2].starts_with(&format!("{uid} {gid} ")), "{lines:?}");
    // Another worker can neither list nor read it.
    let other = sh_as("piccolo-remote", &format!("ls {m}"));
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("Permission denied"), "{other:?}");
    assert!(!sh_as("piccolo-remote", &format!("cat {m}/secret.txt")).status.success());

    let st = status(&mut apps, "app-photos").await.unwrap();
    assert_eq!(st.len(), 1);
    assert!(st[0].mounted && !st[0].needs_repair);
    assert_eq!((st[0].gocryptfs_pid, st[0].owner_uid, st[0].class), (pid, uid, VolumeClass::Application as i32));

    unmount(&mut apps, "app-photos").await.unwrap();
    unmount(&mut apps, "app-photos").await.unwrap(); // idempotent
    assert_eq!(gocryptfs_mounts_on(&mnt), 0);
    wait_until("gocryptfs to exit", || {
        !Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().is_empty()
    });
    let st = status(&mut apps, "app-photos").await.unwrap();
    assert!(!st[0].mounted && st[0].gocryptfs_pid == 0);
    // The unmounted mountpoint is empty, still private to the worker.
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    let md = std::fs::metadata(&mnt).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (uid, 0o700));

    // Neither the key (raw or hex) nor the plaintext marker is anywhere under the state dir
    // or in the audit log; the audit log has the id and the key length.
    assert_nowhere(&state(&b), &[&key, key_hex.as_bytes(), marker.as_bytes()]);
    let audit = b.audit_text();
    assert!(!audit.contains(&key_hex) && !contains(audit.as_bytes(), &key));
    let recs = records(&b);
    let mounts: Vec<_> = recs.iter().filter(|r| r["rpc"] == "MountVolume").collect();
    assert!(!mounts.is_empty());
    for r in &mounts {
        assert_eq!(r["args"]["volume_id"], "app-photos");
        assert_eq!(r["args"]["key_len"], 32);
    }
    assert!(recs.iter().any(|r| r["rpc"] == "CreateVolume" && r["args"]["class"] == "application"));

    // Interop: the plain gocryptfs CLI opens the volume with the hex of the key as password.
    let plain = tempfile::tempdir().unwrap();
    let data = state(&b).join("ciphertext/app-photos/data");
    let mut child = Command::new("gocryptfs")
        .args(["-q", "-nosyslog"])
        .arg(&data)
        .arg(plain.path())
        .stdin(Stdio::piped())
        // The daemon outlives this call: it must not hold the test's stdout open.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{key_hex}\n").as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let got = std::fs::read_to_string(plain.path().join("secret.txt"));
    // Lazy: a busy mount (a straggling reader) must not outlive the test either.
    let _ = Command::new("fusermount3").arg("-uz").arg(plain.path()).status();
    assert_eq!(got.unwrap(), marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused_and_nothing_is_mounted() {
    let b = start(TEST_POLICY);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut api = client(&b, "piccolo-api").await;
    create(&mut api, "control", VolumeClass::Control, &key).await.unwrap();
    let mut wrong = key.clone();
    wrong[0] ^= 1;
    let e = mount(&mut api, "control", &wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("wrong volume key"), "{e:?}");
    let mnt = state(&b).join("mounts/control");
    assert_eq!(gocryptfs_mounts_on(&mnt), 0);
    let st = status(&mut api, "control").await.unwrap();
    assert!(!st[0].mounted && st[0].gocryptfs_pid == 0);
    assert_eq!(st[0].class, VolumeClass::Control as i32);
    let e = mount(&mut api, "control", &key[..31]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = mount(&mut api, "bootstrap", &key).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The right key still works, and the audit log saw the refusal.
    mount(&mut api, "control", &key).await.unwrap();
    assert_eq!(gocryptfs_mounts_on(&mnt), 1);
    unmount(&mut api, "control").await.unwrap();
    assert!(records(&b).iter().any(|r| r["rpc"] == "MountVolume"
        && r["kind"] == "outcome"
        && r["outcome"]["code"] == "PERMISSION_DENIED"
        && r["outcome"]["message"].as_str().unwrap().contains("wrong volume key")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_policy_denies_foreign_ids_and_audits_it() {
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let b = start(&policy);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut api = client(&b, "piccolo-api").await;
    let mut apps = client(&b, "piccolo-apps").await;
    let mut remote = client(&b, "piccolo-remote").await;
    create(&mut api, "control", VolumeClass::Control, &key).await.unwrap();
    // The apps worker holds no key and may not create app volumes; the persistence owner
    // creates them, presented as piccolo-apps.
    let e = create(&mut apps, "app-a", VolumeClass::Application, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    create_as(&mut api, "app-a", VolumeClass::Application, &key, "piccolo-apps").await.unwrap();

    let e = mount(&mut apps, "control", &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = mount(&mut apps, "app-a", &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // present_as names piccolo-apps for app-* only: any other user, a user that does not
    // exist, or bootstrap presented as piccolo-apps, is refused by the guard (audited as a
    // deny) before anything is created.
    let e = create_as(&mut api, "app-b", VolumeClass::Application, &key, "piccolo-remote").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = create_as(&mut api, "bootstrap", VolumeClass::Bootstrap, &key, "piccolo-apps").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(!state(&b).join("ciphertext/bootstrap").exists());
    let e = create_as(&mut api, "app-b", VolumeClass::Application, &key, "no-such-user-x").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = create(&mut remote, "app-b", VolumeClass::Application, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = status(&mut remote, "control").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = status(&mut apps, "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "listing every volume needs volumes = [\"*\"]");
    assert_eq!(gocryptfs_mounts_on(&state(&b).join("mounts/control")), 0);
    assert!(!state(&b).join("ciphertext/app-b").exists());

    let recs = records(&b);
    let denied =
        recs.iter().find(|r| r["rpc"] == "MountVolume" && r["decision"] == "deny").expect("denied mount is audited");
    assert_eq!(denied["args"]["volume_id"], "control");
    assert_eq!(denied["args"]["key_len"], 32);
    assert_eq!(denied["caller"]["user"], "piccolo-apps");
    assert_eq!(denied["outcome"]["code"], "PERMISSION_DENIED");
    assert!(
        recs.iter().any(|r| r["rpc"] == "CreateVolume" && r["decision"] == "deny" && r["args"]["volume_id"] == "app-b")
    );
    assert!(recs.iter().any(|r| r["rpc"] == "CreateVolume"
        && r["args"]["volume_id"] == "app-b"
        && r["args"]["present_as"] == "piccolo-remote"
        && r["decision"] == "deny"
        && r["outcome"]["code"] == "PERMISSION_DENIED"));
    assert!(
        !recs.iter().any(|r| r["rpc"] == "CreateVolume" && r["args"]["volume_id"] == "app-b" && r["kind"] == "intent"),
        "a refused present_as never reaches an intent record"
    );

    // Root sees every volume, with its class.
    let mut root = client(&b, "root").await;
    let all = status(&mut root, "").await.unwrap();
    let ids: Vec<(&str, i32)> = all.iter().map(|v| (v.volume_id.as_str(), v.class)).collect();
    assert_eq!(ids, [("app-a", VolumeClass::Application as i32), ("control", VolumeClass::Control as i32)]);
    // The persistence owner mounts control as itself.
    let (mnt, _) = mount(&mut api, "control", &key).await.unwrap();
    assert_eq!(std::fs::metadata(&mnt).unwrap().uid(), uid_of("piccolo-api"));
    unmount(&mut api, "control").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_are_invalid_and_create_nothing() {
    let b = start(TEST_POLICY);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut root = client(&b, "root").await;
    let mut apps = client(&b, "piccolo-apps").await;
    let long = "a".repeat(64);
    let app_long = format!("app-{}", "a".repeat(60));
    for id in ["../x", "A", "", long.as_str(), "-x", "x/y", ".", "..", "x\n"] {
        let e = create(&mut root, id, VolumeClass::Control, &key).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}: {e:?}");
    }
    for id in ["app-../x", "app-A", app_long.as_str(), "app-x/../../y"] {
        let e = create(&mut apps, id, VolumeClass::Application, &key).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}: {e:?}");
        let e = mount(&mut apps, id, &key).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}: {e:?}");
    }
    // Class and id must agree; classes must be given; keys are 32 bytes.
    let e = create(&mut apps, "app-c", VolumeClass::Control, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = create(&mut root, "plain", VolumeClass::Application, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = create(&mut apps, "app-c", VolumeClass::Unspecified, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = create(&mut apps, "app-c", VolumeClass::Application, &key[..16]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Nothing was created: no volume, no mountpoint, nothing beside the state dir.
    let listing = |p: PathBuf| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    assert!(listing(state(&b).join("ciphertext")).is_empty(), "{:?}", listing(state(&b).join("ciphertext")));
    assert!(listing(state(&b).join("mounts")).is_empty());
    for p in ["x", "y", "state/x", "state/y"] {
        assert!(!b.path(p).exists(), "{p}");
    }
    assert!(status(&mut root, "").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gocryptfs_is_needs_repair_and_remount_works() {
    let b = start(TEST_POLICY);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut apps = client(&b, "piccolo-apps").await;
    create(&mut apps, "app-k", VolumeClass::Application, &key).await.unwrap();
    let (mnt, pid) = mount(&mut apps, "app-k", &key).await.unwrap();
    let out = sh_as("piccolo-apps", &format!("echo kept > {mnt}/f"));
    assert!(out.status.success(), "{out:?}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let mut st = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        st = status(&mut apps, "app-k").await.unwrap();
        if st[0].needs_repair {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(st[0].mounted && st[0].needs_repair && st[0].gocryptfs_pid == 0, "{st:?}");
    // The dead mount serves nothing.
    assert!(!sh_as("piccolo-apps", &format!("cat {mnt}/f")).status.success());

    let (mnt2, pid2) = mount(&mut apps, "app-k", &key).await.unwrap();
    assert_eq!(mnt2, mnt);
    assert!(pid2 != 0 && pid2 != pid);
    let out = sh_as("piccolo-apps", &format!("cat {mnt}/f"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n", "{out:?}");
    let st = status(&mut apps, "app-k").await.unwrap();
    assert!(st[0].mounted && !st[0].needs_repair && st[0].gocryptfs_pid == pid2);
    assert_eq!(gocryptfs_mounts_on(Path::new(&mnt)), 1);

    // Kill again: an unmount alone also cleans the dead mount up.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid2).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_until("needs_repair", || {
        std::fs::read(format!("/proc/{pid2}/stat")).map(|s| String::from_utf8_lossy(&s).contains(") Z")).unwrap_or(true)
    });
    unmount(&mut apps, "app-k").await.unwrap();
    assert_eq!(gocryptfs_mounts_on(Path::new(&mnt)), 0);
    let st = status(&mut apps, "app-k").await.unwrap();
    assert!(!st[0].mounted && !st[0].needs_repair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_survive_a_broker_restart() {
    let mut b = start(TEST_POLICY);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut api = client(&b, "piccolo-api").await;
    create(&mut api, "bootstrap", VolumeClass::Bootstrap, &key).await.unwrap();
    let (mnt, pid) = mount(&mut api, "bootstrap", &key).await.unwrap();
    drop(api);
    assert!(b.stop().success());
    b.restart();
    // The daemon was not the broker's to kill; the new broker finds it.
    let mut api = client(&b, "piccolo-api").await;
    let st = status(&mut api, "bootstrap").await.unwrap();
    assert!(st[0].mounted && !st[0].needs_repair && st[0].gocryptfs_pid == pid, "{st:?}");
    assert_eq!(mount(&mut api, "bootstrap", &key).await.unwrap(), (mnt.clone(), pid));
    unmount(&mut api, "bootstrap").await.unwrap();
    assert_eq!(gocryptfs_mounts_on(Path::new(&mnt)), 0);
}

/// Shipped policy: the persistence owner creates and mounts an application volume presented
/// as the apps worker. Everything under the mount and the mountpoint is piccolo-apps' own;
/// piccolo-apps writes, piccolo-api (the mounter) and nobody cannot even list it; the
/// ciphertext files piccolo-apps makes belong to it; a remount keeps the presentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_volume_created_by_api_is_presented_as_apps() {
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let b = start(&policy);
    let _c = Cleanup(state(&b));
    let key = random(32);
    let mut api = client(&b, "piccolo-api").await;
    let (uid, gid) = (uid_of("piccolo-apps"), gid_of("piccolo-apps"));
    create_as(&mut api, "app-notes", VolumeClass::Application, &key, "piccolo-apps").await.unwrap();
    let data = state(&b).join("ciphertext/app-notes/data");
    let st = std::fs::metadata(&data).unwrap();
    assert_eq!((st.uid(), st.gid()), (uid, gid));
    let meta = std::fs::read_to_string(state(&b).join("ciphertext/app-notes/piccolo.volume.json")).unwrap();
    assert!(meta.contains("\"presented\""), "{meta}");

    for round in 0..2 {
        let (mnt, _) = mount(&mut api, "app-notes", &key).await.unwrap();
        let m = mnt.as_str();
        let st = std::fs::metadata(m).unwrap();
        assert_eq!((st.uid(), st.gid(), st.mode() & 0o777), (uid, gid, 0o700), "round {round}");
        let info = status(&mut api, "app-notes").await.unwrap();
        assert_eq!(info[0].owner_uid, uid);
        let out = sh_as("piccolo-apps", &format!("echo {round} > {m}/f{round} && stat -c '%u %g' {m}/f{round}"));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{uid} {gid}"));
        for user in ["piccolo-api", "nobody"] {
            let out = sh_as(user, &format!("ls {m}"));
            assert!(!out.status.success(), "{user} listed the app volume");
            assert!(!sh_as(user, &format!("cat {m}/f0")).status.success(), "{user} read the app volume");
        }
        unmount(&mut api, "app-notes").await.unwrap();
    }
    // Ciphertext of files piccolo-apps created is piccolo-apps' (gocryptfs creates as the caller).
    let mut owners: Vec<u32> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with("gocryptfs."))
        .map(|e| e.metadata().unwrap().uid())
        .collect();
    owners.dedup();
    assert_eq!(owners, [uid]);
}
