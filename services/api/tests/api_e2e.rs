// SPDX-License-Identifier: Apache-2.0
//! End-to-end over real HTTP against the whole local stack: a real broker (production
//! policy) mounting real gocryptfs volumes, the SQLite control store inside the control
//! volume, and the real `piccolo-api` binary running as `piccolo-api`: first run, sessions,
//! CSRF, lock gating, export/import, attempt limits, TPM auto-unlock, error shape.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use common::{Api, PASSWORD, Session, StackOptions, mounted, path_mode, rt};
use serde_json::json;

const NEW_PASSWORD: &str = "second password 2";
const MARKER: &str = "API-STACK-PLAINTEXT-MARKER-5c1e";

fn files_containing(root: &Path, needle: &[u8], skip: &Path) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir == skip {
            continue;
        }
        for item in std::fs::read_dir(&dir).unwrap() {
            let item = item.unwrap();
            let ft = item.file_type().unwrap();
            if ft.is_dir() {
                stack.push(item.path());
            } else if ft.is_file() && std::fs::read(item.path()).unwrap().windows(needle.len()).any(|w| w == needle) {
                hits.push(item.path());
            }
        }
    }
    hits
}

fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(root).unwrap().flatten() {
        let ft = item.file_type().unwrap();
        if ft.is_dir() {
            out.extend(regular_files(&item.path()));
        } else {
            out.push(item.path());
        }
    }
    out
}

/// While locked: control is not mounted, its mountpoint is empty, and the marker written
/// into it appears nowhere under the state dir (bootstrap stays mounted by design).
fn assert_locked_invariant(api: &Api) {
    let control = api.mountpoint("control");
    assert!(!mounted(&control), "control mounted while locked");
    assert_eq!(std::fs::read_dir(&control).map(|d| d.count()).unwrap_or(0), 0, "files under control's mountpoint");
    let hits = files_containing(&api.state_dir(), MARKER.as_bytes(), &api.mountpoint("bootstrap"));
    assert!(hits.is_empty(), "plaintext marker under the state dir while locked: {hits:?}");
    assert!(!api.broker.audit_text().contains(MARKER));
}

fn marker(api: &Api) -> PathBuf {
    api.mountpoint("control").join("marker.txt")
}

#[test]
fn first_run_login_lock_unlock_export_import_unlock_with_the_exports_password() {
    rt().block_on(async {
        let api = Api::start(&[]);
        // The worker really runs as piccolo-api, without capabilities.
        let status = std::fs::read_to_string(format!("/proc/{}/status", api.pid())).unwrap();
        let user = nix::unistd::User::from_name("piccolo-api").unwrap().unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid_line.split_whitespace().skip(1).all(|u| u == user.uid.to_string()), "{uid_line}");
        assert!(status.lines().any(|l| l == "CapEff:\t0000000000000000"), "{status}");

        assert_eq!(api.state().await, "uninitialised");
        // Before setup: store-backed endpoints are 423 setup_required.
        let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (423, "setup_required"));

        // The setup code: a 0600 file; a wrong code is refused and changes nothing.
        assert_eq!(path_mode(&api.setup_code_file()), 0o600);
        assert!(api.log().contains(&api.setup_code()), "setup code not in the log/journal");
        let r = api
            .post_json("/api/v1/setup", &json!({"setup_code": "AAAA-BBBB-CCCC-DDDD", "password": PASSWORD}), &[])
            .await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        assert_eq!(api.state().await, "uninitialised");
        let recovery = api.setup().await;
        assert_eq!(recovery.len(), 39, "{recovery}");
        assert!(!api.setup_code_file().exists(), "setup code file must go after setup");
        let r = api.post_json("/api/v1/setup", &json!({"setup_code": "x", "password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (409, "already_initialised"));
        assert!(!api.log().contains(&recovery), "the recovery key must never be logged");
        // Setup made real gocryptfs volumes through the broker; the store is inside control.
        assert!(mounted(&api.mountpoint("control")) && mounted(&api.mountpoint("bootstrap")));
        assert!(api.mountpoint("control").join("control.db").exists());
        assert!(api.state_dir().join("ciphertext/control/data/gocryptfs.conf").exists());
        assert!(api.state_dir().join("crypto/keyset.json").exists());

        // Login: cookie attributes, bearer and cookie both work.
        let s = api.login(PASSWORD).await;
        assert!(s.set_cookie.contains("HttpOnly") && s.set_cookie.contains("SameSite=Strict"), "{}", s.set_cookie);
        assert!(!s.set_cookie.contains("Secure"), "plain HTTP must not set Secure: {}", s.set_cookie);
        let r = api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.json()["via"].clone()), (200, json!("bearer")));
        let r = api.get("/api/v1/auth/session", &[("cookie", &s.cookie)]).await;
        assert_eq!((r.status, r.json()["via"].clone()), (200, json!("cookie")));
        // Data in the control volume (plaintext only while unlocked).
        std::fs::write(marker(&api), MARKER).unwrap();

        // Lock -> every store-backed endpoint is 423 for a credentialed client.
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.json()["state"].clone()), (200, json!("locked")), "{}", r.text());
        for path in ["/api/v1/auth/session", "/api/v1/export/full", "/api/v1/boot", "/api/v1/events"] {
            let r = api.get(path, &[("authorization", &s.bearer())]).await;
            assert_eq!((r.status, r.error_code().as_str()), (423, "locked"), "{path}");
        }
        let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (423, "locked"));
        assert_eq!(api.get("/api/v1/health/ready", &[]).await.json()["state"], "locked");
        assert_locked_invariant(&api);
        assert!(mounted(&api.mountpoint("bootstrap")), "bootstrap stays mounted while locked");

        // Without a credential it is 401, whatever the state; a forged token too.
        assert_eq!(api.get("/api/v1/auth/session", &[]).await.status, 401);
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", "Bearer x.y.z")]).await.status, 401);
        // Unlock: wrong password refused, right one opens; the session carries on.
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": "not the password"}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        assert_locked_invariant(&api);
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.json()["state"].clone()), (200, json!("unlocked")), "{}", r.text());
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 200);
        assert_eq!(std::fs::read_to_string(marker(&api)).unwrap(), MARKER);

        // Export and import as piccolo-api: the broker reads and replaces the root-only
        // ciphertext (Archive service), the worker only streams bytes.
        let export = api.get("/api/v1/export/full", &[("authorization", &s.bearer())]).await;
        assert_eq!(export.status, 200, "{} / {}", export.text(), api.log());
        transfer_round_trip(&api, &s, export, &recovery).await;
        // Imported files are the worker's (the broker re-owned them), so it can keep managing them.
        let api_uid = nix::unistd::User::from_name("piccolo-api").unwrap().unwrap().uid.as_raw();
        for rel in ["crypto/keyset.json", "ciphertext/control/data/gocryptfs.conf"] {
            let st = std::fs::symlink_metadata(api.state_dir().join(rel)).unwrap();
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&st), api_uid, "{rel}");
        }
    });
}

/// A fresh box (another broker and state dir) restores a full export through
/// `setup/import` with its setup code, the worker as piccolo-api throughout, and opens it
/// with the export's recovery key.
#[test]
fn a_new_box_restores_a_full_export_as_piccolo_api() {
    rt().block_on(async {
        let api = Api::start(&[]);
        let recovery = api.setup().await;
        let s = api.login(PASSWORD).await;
        std::fs::write(marker(&api), MARKER).unwrap();
        let export = api.get("/api/v1/export/full", &[("authorization", &s.bearer())]).await;
        assert_eq!(export.status, 200, "{} / {}", export.text(), api.log());
        transfer_round_trip(&api, &s, export.clone_resp(), &recovery).await;

        // A fresh box restores from the same archive with its setup code.
        let new = Api::start(&[]);
        let post = |code: String, body: Vec<u8>| {
            let addr = new.addr;
            async move {
                common::request(addr, None, "POST", "/api/v1/setup/import", &[("x-setup-code", code.as_str())], body)
                    .await
            }
        };
        let r = post("AAAA-BBBB-CCCC-DDDD".into(), export.body.clone()).await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        let r = post(new.setup_code(), export.body[..export.body.len() - 600].to_vec()).await;
        assert_eq!((r.status, r.error_code().as_str()), (422, "import_rejected"), "{}", r.text());
        assert_eq!(new.state().await, "uninitialised");
        let r = post(new.setup_code(), export.body.clone()).await;
        assert_eq!(r.status, 200, "{} / {}", r.text(), new.log());
        assert_eq!(new.state().await, "locked");
        assert!(!new.setup_code_file().exists());
        let r = new.post_json("/api/v1/crypto/unlock", &json!({"recovery_key": recovery}), &[]).await;
        assert_eq!(r.status, 200, "{} / {}", r.text(), new.log());
        assert_eq!(std::fs::read_to_string(marker(&new)).unwrap(), MARKER);
        new.login(PASSWORD).await;
    });
}

/// `export` (status 200) was taken with [`PASSWORD`] while the marker was in the control
/// volume. Changes the password and the data, refuses a corrupt archive, imports the export
/// and checks that only the export's password opens it and the old data is back.
async fn transfer_round_trip(api: &Api, s: &Session, export: common::Resp, recovery: &str) {
    assert_eq!(export.header("content-type"), Some("application/x-tar"));
    assert_eq!(export.header("content-length"), Some(export.body.len().to_string().as_str()));
    assert_eq!(&export.body[..13], b"manifest.json");
    assert_eq!(api.state().await, "unlocked", "the export resumed the volumes");
    let left = regular_files(&api.state_dir().join("exports"));
    assert!(left.is_empty(), "the streamed export must not stay on disk: {left:?}");

    // After the export: a new password and new data.
    let r = api
        .post_json(
            "/api/v1/auth/password",
            &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
            &[("authorization", &s.bearer())],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = Session::from_response(&r);
    std::fs::write(marker(api), "written after the export").unwrap();

    // A corrupt archive is refused before anything changes (the store is locked by the
    // import attempt; the live password still opens the untouched state).
    let mut bad = export.body.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let r = common::request(api.addr, None, "POST", "/api/v1/import", &[("authorization", &s.bearer())], bad).await;
    assert_eq!((r.status, r.error_code().as_str()), (422, "import_rejected"), "{}", r.text());
    let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": NEW_PASSWORD}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read_to_string(marker(api)).unwrap(), "written after the export");

    // The real import: locked afterwards, every session ends, 423 for store endpoints.
    let r = common::request(
        api.addr,
        None,
        "POST",
        "/api/v1/import",
        &[("authorization", &s.bearer())],
        export.body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{} / {}", r.text(), api.log());
    assert_eq!(r.json()["keyset_replaced"], true);
    assert_eq!(r.json()["state"], "locked");
    assert_eq!(api.state().await, "locked");
    assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 401);
    let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await;
    assert_eq!((r.status, r.error_code().as_str()), (423, "locked"));
    assert_locked_invariant(api);
    // Only the export's password opens it; the data from before the export is back.
    let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": NEW_PASSWORD}), &[]).await;
    assert_eq!(r.status, 401, "the password set after the export must not open the imported key set");
    let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": PASSWORD}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read_to_string(marker(api)).unwrap(), MARKER);
    // The imported control store (its JWT key) opened under the export's SDEK: login works.
    let s = api.login(PASSWORD).await;
    let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
    assert_eq!(r.status, 200);
    let r = api.post_json("/api/v1/crypto/unlock", &json!({"recovery_key": recovery.to_lowercase()}), &[]).await;
    assert_eq!(r.status, 200, "the export's recovery key opens it too: {}", r.text());
}

#[test]
fn tpm_auto_unlock_after_an_api_restart_until_pcr7_changes() {
    rt().block_on(async {
        let mut api = Api::start_opts(StackOptions { tpm: true, ..Default::default() });
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let st = api.get("/api/v1/crypto/status", &[]).await.json();
        assert_eq!((st["tpm_enrolled"].clone(), st["tpm_last_error"].clone()), (json!(false), json!(null)));
        let r = api
            .post_json(
                "/api/v1/crypto/tpm",
                &json!({"enabled": true, "password": "wrong"}),
                &[("authorization", &s.bearer())],
            )
            .await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        let r = api
            .post_json(
                "/api/v1/crypto/tpm",
                &json!({"enabled": true, "password": PASSWORD}),
                &[("authorization", &s.bearer())],
            )
            .await;
        assert_eq!((r.status, r.json()["tpm_enrolled"].clone()), (200, json!(true)), "{} / {}", r.text(), api.log());
        std::fs::write(marker(&api), MARKER).unwrap();

        // Restart: the worker locks on SIGTERM, then unlocks itself with the TPM at start.
        api.restart();
        assert_eq!(api.state().await, "unlocked", "{}", api.log());
        assert_eq!(std::fs::read_to_string(marker(&api)).unwrap(), MARKER);
        // Sessions do not survive a restart; a new login works (the token key came from the store).
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 401);
        let s = api.login(PASSWORD).await;
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 200);

        // Secure Boot state changed: stays locked and says why; the password still works.
        api.tpm.as_ref().unwrap().extend_pcr(7);
        api.restart();
        let st = api.get("/api/v1/crypto/status", &[]).await.json();
        assert_eq!(st["state"], "locked", "{st}");
        assert_eq!(st["tpm_enrolled"], true);
        assert_eq!(st["tpm_last_error"], "TPM unlock failed: PCR 7 changed");
        assert_locked_invariant(&api);
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // Re-enrolling binds to today's PCR 7 and clears the error; disabling removes it.
        let s = api.login(PASSWORD).await;
        let r = api
            .post_json(
                "/api/v1/crypto/tpm",
                &json!({"enabled": true, "password": PASSWORD}),
                &[("authorization", &s.bearer())],
            )
            .await;
        assert_eq!((r.status, r.json()["tpm_last_error"].clone()), (200, json!(null)));
        let r = api
            .post_json(
                "/api/v1/crypto/tpm",
                &json!({"enabled": false, "password": PASSWORD}),
                &[("authorization", &s.bearer())],
            )
            .await;
        assert_eq!((r.status, r.json()["tpm_enrolled"].clone()), (200, json!(false)));
        api.restart();
        assert_eq!(api.state().await, "locked", "TPM unlock removed: the restart stays locked");
    });
}

#[test]
fn brute_force_gets_429_and_stays_locked_out_even_with_the_correct_password() {
    rt().block_on(async {
        let api = Api::start(&[]);
        api.setup().await;
        let me = Ipv4Addr::new(127, 0, 0, 1);
        for i in 0..5 {
            let r = api.post_json_from(me, "/api/v1/auth/login", &json!({"password": format!("guess {i}")})).await;
            assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"), "attempt {i}");
        }
        let r = api.post_json_from(me, "/api/v1/auth/login", &json!({"password": PASSWORD})).await;
        assert_eq!((r.status, r.error_code().as_str()), (429, "rate_limited"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "{retry}");
        // The same lock-out covers the recovery-key reset from this client.
        let r = api
            .post_json_from(
                me,
                "/api/v1/auth/reset",
                &json!({"recovery_key": "0000-0000-0000-0000-0000-0000-0000-0000", "new_password": NEW_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, 429);
        // Still refused after the first back-off if the guessing continues: it grows.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let r = api.post_json_from(me, "/api/v1/auth/login", &json!({"password": "guess again"})).await;
        assert_eq!(r.status, 401);
        let r = api.post_json_from(me, "/api/v1/auth/login", &json!({"password": PASSWORD})).await;
        assert_eq!(r.status, 429);
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((3..=4).contains(&retry), "back-off must grow: {retry}");
        // Another client address is not locked out.
        let other = Ipv4Addr::new(127, 0, 0, 2);
        let r = api.post_json_from(other, "/api/v1/auth/login", &json!({"password": PASSWORD})).await;
        assert_eq!(r.status, 200, "{}", r.text());
    });
}

#[test]
fn global_limit_holds_across_addresses() {
    rt().block_on(async {
        let api = Api::start(&["--client-free-attempts", "100", "--global-free-attempts", "6"]);
        api.setup().await;
        for n in 0..6u8 {
            let r = api
                .post_json_from(Ipv4Addr::new(127, 0, 1, n + 1), "/api/v1/auth/login", &json!({"password": "nope"}))
                .await;
            assert_eq!(r.status, 401);
        }
        let r =
            api.post_json_from(Ipv4Addr::new(127, 0, 2, 1), "/api/v1/auth/login", &json!({"password": PASSWORD})).await;
        assert_eq!((r.status, r.error_code().as_str()), (429, "rate_limited"));
    });
}

#[test]
fn a_flood_of_concurrent_guesses_is_bounded() {
    rt().block_on(async {
        let api = Api::start(&[]);
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);
        let rss_before = api.rss_kib();
        let mut tasks = Vec::new();
        for i in 0..300 {
            let addr = api.addr;
            tasks.push(tokio::spawn(async move {
                let body = serde_json::to_vec(&json!({"password": format!("flood {i}")})).unwrap();
                common::request(
                    addr,
                    None,
                    "POST",
                    "/api/v1/crypto/unlock",
                    &[("content-type", "application/json")],
                    body,
                )
                .await
                .status
            }));
        }
        let mut checked = 0;
        for t in tasks {
            match t.await.unwrap() {
                401 => checked += 1,
                429 => {}
                other => panic!("unexpected {other}"),
            }
        }
        // 5 free failures, plus at most the 4 checks that may already be in flight.
        assert!(checked <= 9, "{checked} guesses were checked");
        let grown = api.rss_kib().saturating_sub(rss_before);
        assert!(grown < 64 * 1024, "RSS grew {grown} KiB under the flood");
        assert_eq!(api.get("/api/v1/crypto/status", &[]).await.json()["state"], "locked");
    });
}

#[test]
fn cookie_requests_without_the_csrf_token_are_403() {
    rt().block_on(async {
        let api = Api::start(&[]);
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("cookie", &s.cookie)]).await;
        assert_eq!((r.status, r.error_code().as_str()), (403, "csrf"));
        let r =
            api.post_json("/api/v1/crypto/lock", &json!({}), &[("cookie", &s.cookie), ("x-csrf-token", "wrong")]).await;
        assert_eq!((r.status, r.error_code().as_str()), (403, "csrf"));
        assert_eq!(api.get("/api/v1/crypto/status", &[]).await.json()["state"], "unlocked");
        // Safe methods need no token; the bearer token needs none either.
        assert_eq!(api.get("/api/v1/auth/session", &[("cookie", &s.cookie)]).await.status, 200);
        let r =
            api.post_json("/api/v1/crypto/lock", &json!({}), &[("cookie", &s.cookie), ("x-csrf-token", &s.csrf)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    });
}

#[test]
fn password_change_revokes_every_other_session_and_rotates_tokens() {
    rt().block_on(async {
        let api = Api::start(&[]);
        api.setup().await;
        let a = api.login(PASSWORD).await;
        let b = api.login(PASSWORD).await;
        let r = api
            .post_json(
                "/api/v1/auth/password",
                &json!({"current_password": "wrong current", "new_password": NEW_PASSWORD}),
                &[("cookie", &a.cookie), ("x-csrf-token", &a.csrf)],
            )
            .await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &b.bearer())]).await.status, 200);
        let r = api
            .post_json(
                "/api/v1/auth/password",
                &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
                &[("cookie", &a.cookie), ("x-csrf-token", &a.csrf)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let a2 = Session::from_response(&r);
        for (what, h) in [
            ("b bearer", ("authorization", b.bearer())),
            ("b cookie", ("cookie", b.cookie.clone())),
            ("a old bearer", ("authorization", a.bearer())),
            ("a old cookie", ("cookie", a.cookie.clone())),
        ] {
            let r = api.get("/api/v1/auth/session", &[(h.0, &h.1)]).await;
            assert_eq!((r.status, r.error_code().as_str()), (401, "unauthenticated"), "{what}");
        }
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &a2.bearer())]).await.status, 200);
        assert_eq!(api.get("/api/v1/auth/session", &[("cookie", &a2.cookie)]).await.status, 200);
        let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!(r.status, 401);
        api.login(NEW_PASSWORD).await;
    });
}

#[test]
fn recovery_key_resets_the_password_and_rotation_shows_a_new_key_once() {
    rt().block_on(async {
        let api = Api::start(&[]);
        let first = api.setup().await;
        let s = api.login(PASSWORD).await;
        let r = api
            .post_json("/api/v1/crypto/recovery-key", &json!({"password": PASSWORD}), &[("authorization", &s.bearer())])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let second = r.json()["recovery_key"].as_str().unwrap().to_string();
        assert_ne!(first, second);
        // Mistyped: 401 with its own code; the old key: wrong.
        let typo = second.replacen(|c: char| c.is_ascii_alphanumeric(), "U", 1);
        let r = api
            .post_json("/api/v1/auth/reset", &json!({"recovery_key": typo, "new_password": NEW_PASSWORD}), &[])
            .await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "recovery_key_mistyped"));
        let r = api
            .post_json("/api/v1/auth/reset", &json!({"recovery_key": first, "new_password": NEW_PASSWORD}), &[])
            .await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        let r = api
            .post_json("/api/v1/auth/reset", &json!({"recovery_key": second, "new_password": NEW_PASSWORD}), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 401);
        assert_eq!(api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await.status, 401);
        let s = api.login(NEW_PASSWORD).await;
        // While locked the reset also unlocks (the recovery key opens the key set).
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);
        let r = api
            .post_json("/api/v1/auth/reset", &json!({"recovery_key": second, "new_password": "third password 3"}), &[])
            .await;
        assert_eq!((r.status, r.json()["state"].clone()), (200, json!("unlocked")), "{}", r.text());
        assert!(mounted(&api.mountpoint("control")));
        assert_eq!(api.post_json("/api/v1/auth/login", &json!({"password": NEW_PASSWORD}), &[]).await.status, 401);
        api.login("third password 3").await;
    });
}

#[test]
fn every_error_has_one_shape() {
    rt().block_on(async {
        let api = Api::start(&["--max-json-bytes", "4096"]);
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let r = api.get("/api/v1/nope", &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
        let r = common::request(api.addr, None, "DELETE", "/api/v1/crypto/status", &[], vec![]).await;
        assert_eq!((r.status, r.error_code().as_str()), (405, "method_not_allowed"));
        let r = api.get("/api/v1/auth/session", &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "unauthenticated"));
        let r = api.get("/api/v1/auth/session", &[("authorization", "Bearer not.a.jwt")]).await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "unauthenticated"));
        let big = json!({"password": "x".repeat(8192)});
        let r = api.post_json("/api/v1/auth/login", &big, &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (413, "payload_too_large"));
        let r = common::request(
            api.addr,
            None,
            "POST",
            "/api/v1/auth/login",
            &[("content-type", "application/json")],
            b"{nope".to_vec(),
        )
        .await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD, "extra": 1}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        let r = api.get("/api/v1/export/everything", &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        let r = api.get("/api/v1/boot", &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.error_code().as_str()), (503, "unavailable"));
        // The OpenAPI document is served and is 3.1.
        let doc = api.get("/api/v1/openapi.json", &[]).await.json();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/api/v1/crypto/unlock"]["post"]["responses"]["429"].is_object());
    });
}

#[test]
fn events_stream_lock_changes() {
    rt().block_on(async {
        let api = Api::start(&[]);
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let addr = api.addr;
        let bearer = s.bearer();
        let reader = tokio::spawn(async move {
            common::request(addr, None, "GET", "/api/v1/events?limit=3", &[("authorization", &bearer)], vec![]).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);
        let events = tokio::time::timeout(std::time::Duration::from_secs(10), reader).await.unwrap().unwrap();
        assert_eq!(events.header("content-type"), Some("text/event-stream"));
        let text = events.text();
        let first = text.find(r#"data: {"type":"lock","state":"unlocked"}"#).expect(&text);
        let second = text.find(r#"data: {"type":"lock","state":"locking"}"#).expect(&text);
        let third = text.find(r#"data: {"type":"lock","state":"locked"}"#).expect(&text);
        assert!(first < second && second < third, "{text}");
    });
}
