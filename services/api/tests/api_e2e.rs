// SPDX-License-Identifier: Apache-2.0
//! End-to-end over real HTTP against the real `piccolo-api` binary on a real key set:
//! first run, sessions, CSRF, lock gating, export/import, attempt limits, error shape.

mod common;

use std::net::Ipv4Addr;

use common::{Api, PASSWORD, Session, path_mode, rt};
use serde_json::json;

const NEW_PASSWORD: &str = "second password 2";

#[test]
fn first_run_login_lock_unlock_export_import_unlock_with_the_exports_password() {
    rt().block_on(async {
        let api = Api::start(&[]);
        let st = api.get("/api/v1/crypto/status", &[]).await;
        assert_eq!(st.json()["state"], "uninitialised");
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
        assert_eq!(api.get("/api/v1/crypto/status", &[]).await.json()["state"], "uninitialised");
        let recovery = api.setup().await;
        assert_eq!(recovery.len(), 39, "{recovery}");
        assert!(!api.setup_code_file().exists(), "setup code file must go after setup");
        let r = api.post_json("/api/v1/setup", &json!({"setup_code": "x", "password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (409, "already_initialised"));
        assert!(!api.log().contains(&recovery), "the recovery key must never be logged");

        // Login: cookie attributes, bearer and cookie both work.
        let s = api.login(PASSWORD).await;
        assert!(s.set_cookie.contains("HttpOnly") && s.set_cookie.contains("SameSite=Strict"), "{}", s.set_cookie);
        assert!(!s.set_cookie.contains("Secure"), "plain HTTP must not set Secure: {}", s.set_cookie);
        let r = api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.json()["via"].clone()), (200, json!("bearer")));
        let r = api.get("/api/v1/auth/session", &[("cookie", &s.cookie)]).await;
        assert_eq!((r.status, r.json()["via"].clone()), (200, json!("cookie")));

        // Full export (streamed tar) while unlocked.
        let export = api.get("/api/v1/export/full", &[("authorization", &s.bearer())]).await;
        assert_eq!(export.status, 200, "{}", export.text());
        assert_eq!(export.header("content-type"), Some("application/x-tar"));
        assert_eq!(&export.body[..13], b"manifest.json");
        assert!(export.body.len() > 2048);

        // Lock -> every store-backed endpoint is 423 for a credentialed client.
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!((r.status, r.json()["state"].clone()), (200, json!("locked")));
        for path in ["/api/v1/auth/session", "/api/v1/export/full", "/api/v1/boot", "/api/v1/events"] {
            let r = api.get(path, &[("authorization", &s.bearer())]).await;
            assert_eq!((r.status, r.error_code().as_str()), (423, "locked"), "{path}");
        }
        let r = api.post_json("/api/v1/auth/login", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (423, "locked"));
        assert_eq!(api.get("/api/v1/health/ready", &[]).await.json()["state"], "locked");

        // Without a credential it is 401, whatever the state; a forged token too.
        assert_eq!(api.get("/api/v1/auth/session", &[]).await.status, 401);
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", "Bearer x.y.z")]).await.status, 401);
        // Unlock: wrong password refused, right one opens; the session carries on.
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": "not the password"}), &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (401, "wrong_credentials"));
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!((r.status, r.json()["state"].clone()), (200, json!("unlocked")), "{}", r.text());
        let r = api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);

        // Change the password, then a garbage import is refused and changes nothing.
        let s = api.login(PASSWORD).await;
        let r = api
            .post_json(
                "/api/v1/auth/password",
                &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
                &[("authorization", &s.bearer())],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let s = Session::from_response(&r);
        let mut bad = export.body.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        let r = common::request(api.addr, None, "POST", "/api/v1/import", &[("authorization", &s.bearer())], bad).await;
        assert_eq!((r.status, r.error_code().as_str()), (422, "import_rejected"), "{}", r.text());
        assert_eq!(api.get("/api/v1/crypto/status", &[]).await.json()["state"], "unlocked");
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 200);

        // Import the export taken under the first password: the store locks, and only the
        // export's password (or its recovery key) opens it.
        let r = common::request(
            api.addr,
            None,
            "POST",
            "/api/v1/import",
            &[("authorization", &s.bearer())],
            export.body.clone(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["keyset_replaced"], true);
        assert_eq!(api.get("/api/v1/crypto/status", &[]).await.json()["state"], "locked");
        assert_eq!(api.get("/api/v1/auth/session", &[("authorization", &s.bearer())]).await.status, 401);
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": NEW_PASSWORD}), &[]).await;
        assert_eq!(r.status, 401, "the password set after the export must not open the imported key set");
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"password": PASSWORD}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The imported control store (JWT key) opened under the export's SDEK: login works.
        let s = api.login(PASSWORD).await;
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);
        let r = api.post_json("/api/v1/crypto/unlock", &json!({"recovery_key": recovery.to_lowercase()}), &[]).await;
        assert_eq!(r.status, 200, "the export's recovery key opens it too: {}", r.text());
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
        api.login(NEW_PASSWORD).await;
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
            common::request(addr, None, "GET", "/api/v1/events?limit=2", &[("authorization", &bearer)], vec![]).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = api.post_json("/api/v1/crypto/lock", &json!({}), &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200);
        let events = tokio::time::timeout(std::time::Duration::from_secs(10), reader).await.unwrap().unwrap();
        assert_eq!(events.header("content-type"), Some("text/event-stream"));
        let text = events.text();
        let first = text.find(r#"data: {"type":"lock","state":"unlocked"}"#).expect(&text);
        let second = text.find(r#"data: {"type":"lock","state":"locked"}"#).expect(&text);
        assert!(first < second, "{text}");
    });
}

#[test]
fn a_fresh_box_restores_from_a_full_export_with_the_setup_code() {
    rt().block_on(async {
        let old = Api::start(&[]);
        let recovery = old.setup().await;
        let s = old.login(PASSWORD).await;
        let export = old.get("/api/v1/export/full", &[("authorization", &s.bearer())]).await;
        assert_eq!(export.status, 200);
        drop(old);

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
        assert_eq!(new.get("/api/v1/crypto/status", &[]).await.json()["state"], "uninitialised");
        let r = post(new.setup_code(), export.body.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(new.get("/api/v1/crypto/status", &[]).await.json()["state"], "locked");
        assert!(!new.setup_code_file().exists());
        let r = new.post_json("/api/v1/crypto/unlock", &json!({"recovery_key": recovery}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        new.login(PASSWORD).await;
    });
}
