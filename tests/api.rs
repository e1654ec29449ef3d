//! The HTTP API against the real services: accounts, tokens, keys and ingestion errors.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use jsonwebtoken::{EncodingKey, Header};
use logpipe::app::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn error_field(body: &Value) -> &str {
    body["error"]["field"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_validates_each_field() {
    let app = TestApp::start().await;
    let name = format!("valid_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let cases = [
        (
            json!({"email": "a@example.com", "password": PASSWORD}),
            "username",
        ),
        (
            json!({"username": "ab", "email": "a@example.com", "password": PASSWORD}),
            "username",
        ),
        (
            json!({"username": "no spaces!", "email": "a@example.com", "password": PASSWORD}),
            "username",
        ),
        (
            json!({"username": name, "email": "not-an-email", "password": PASSWORD}),
            "email",
        ),
        (
            json!({"username": name, "email": "a@example.com", "password": "short"}),
            "password",
        ),
        (
            json!({"username": name, "email": "a@example.com"}),
            "password",
        ),
    ];
    for (body, field) in cases {
        let (status, response) = app.post_json("/api/auth/signup/", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {response}");
        assert_eq!(response["error"]["code"], "invalid_field", "{body}");
        assert_eq!(error_field(&response), field, "{body}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_duplicates_conflict() {
    let app = TestApp::start().await;
    let username = app.signup("dup").await;

    let same_name =
        json!({"username": username, "email": "other@example.com", "password": PASSWORD});
    let (status, body) = app.post_json("/api/auth/signup/", &same_name).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_field(&body), "username");

    let email = format!("{}@EXAMPLE.com", username.to_uppercase());
    let same_email =
        json!({"username": format!("{username}x"), "email": email, "password": PASSWORD});
    let (status, body) = app.post_json("/api/auth/signup/", &same_email).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "emails are case-insensitive: {body}"
    );
    assert_eq!(error_field(&body), "email");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_stores_argon2id_hash() {
    let app = TestApp::start().await;
    let username = app.signup("hash").await;
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT password_hash FROM users WHERE username = $1",
            &[&username],
        )
        .await
        .expect("user row");
    let hash: String = row.get(0);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PASSWORD));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_look_alike() {
    let app = TestApp::start().await;
    let username = app.signup("login").await;

    let wrong_password = json!({"username": username, "password": "wrong password!"});
    let unknown_user = json!({"username": format!("{username}_nobody"), "password": PASSWORD});
    let started = Instant::now();
    let (status_a, body_a) = app.post_json("/api/auth/login/", &wrong_password).await;
    let wrong_password_time = started.elapsed();
    let started = Instant::now();
    let (status_b, body_b) = app.post_json("/api/auth/login/", &unknown_user).await;
    let unknown_user_time = started.elapsed();

    assert_eq!(status_a, StatusCode::UNAUTHORIZED);
    assert_eq!(status_b, StatusCode::UNAUTHORIZED);
    assert_eq!(body_a, body_b);
    // Both paths run one argon2id verification. Without the dummy hash, the response for
    // the unknown user would come back in well under a millisecond.
    let slower = wrong_password_time.max(unknown_user_time);
    let faster = wrong_password_time.min(unknown_user_time);
    assert!(
        faster * 5 > slower,
        "{wrong_password_time:?} vs {unknown_user_time:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_tokens() {
    let app = TestApp::start().await;
    let username = app.signup("refresh").await;
    let (access, refresh) = app.login(&username).await;

    let (status, pair) = app
        .post_json("/api/auth/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    let new_refresh = pair["refresh"].as_str().expect("refresh").to_string();
    let new_access = pair["access"].as_str().expect("access").to_string();
    assert_ne!(new_refresh, refresh);
    let (status, _) = app.get_with_token("/api/keys/list/", &new_access).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = app
        .post_json("/api/auth/refresh/", &json!({"refresh": refresh}))
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "reused refresh token: {body}"
    );
    // Reuse ends the whole family, so the token issued by the first exchange dies too.
    let (status, _) = app
        .post_json("/api/auth/refresh/", &json!({"refresh": new_refresh}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _) = app
        .post_json("/api/auth/refresh/", &json!({"refresh": access}))
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "access token used as refresh token"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_stored_hashed() {
    let app = TestApp::start().await;
    let username = app.signup("rthash").await;
    let (_, refresh) = app.login(&username).await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let rows = db
        .query(
            "SELECT token_hash FROM refresh_tokens WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("refresh rows");
    assert_eq!(rows.len(), 1);
    let stored: Vec<u8> = rows[0].get(0);
    assert_eq!(stored.len(), 32, "a SHA-256");
    assert_ne!(stored, refresh.as_bytes());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_access_tokens_rejected() {
    let app = TestApp::start().await;
    let username = app.signup("jwt").await;
    let (access, refresh) = app.login(&username).await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let key = EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let claims = |exp: u64, typ: &str| {
        json!({"sub": user.to_string(), "exp": exp, "iat": unix_now() - 1000,
               "jti": Uuid::now_v7(), "typ": typ})
    };

    let expired =
        jsonwebtoken::encode(&Header::default(), &claims(unix_now() - 10, "access"), &key)
            .expect("sign");
    let wrong_secret = jsonwebtoken::encode(
        &Header::default(),
        &claims(unix_now() + 600, "access"),
        &EncodingKey::from_secret(b"some other secret of enough length!!"),
    )
    .expect("sign");
    let hs512 = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims(unix_now() + 600, "access"),
        &key,
    )
    .expect("sign");
    let mut parts: Vec<String> = access.split('.').map(str::to_string).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).expect("payload")).expect("json");
    payload["sub"] = json!((user + 1).to_string());
    parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    let tampered = parts.join(".");

    let cases = [
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("HS512", hs512),
        ("tampered", tampered),
        ("refresh as access", refresh),
        ("garbage", "not.a.token".to_string()),
    ];
    for (name, token) in cases {
        let (status, body) = app.get_with_token("/api/keys/list/", &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{name}");
    }
    let response = app
        .client
        .get(app.url("/api/keys/list/"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "no token");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_listed_only_to_owner() {
    let app = TestApp::start().await;
    let alice = app.signup("alice").await;
    let bob = app.signup("bob").await;
    let (alice_access, _) = app.login(&alice).await;
    let (bob_access, _) = app.login(&bob).await;
    let created = app.create_key(&alice_access, "alice's key").await;
    let secret = created["api_key"].as_str().expect("secret");
    let prefix = created["prefix"].as_str().expect("prefix");
    assert!(secret.starts_with(prefix));

    let (status, alice_keys) = app.get_with_token("/api/keys/list/", &alice_access).await;
    assert_eq!(status, StatusCode::OK);
    let alice_keys = alice_keys.as_array().expect("array").clone();
    assert_eq!(alice_keys.len(), 1);
    assert_eq!(alice_keys[0]["id"], created["id"]);
    assert_eq!(alice_keys[0]["name"], "alice's key");
    assert_eq!(alice_keys[0]["active"], true);
    assert!(alice_keys[0].get("api_key").is_none());
    assert!(
        !alice_keys[0].to_string().contains(secret),
        "listing leaks the secret"
    );

    let (status, bob_keys) = app.get_with_token("/api/keys/list/", &bob_access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bob_keys, json!([]));

    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT key_hash, prefix FROM api_keys WHERE id = $1",
            &[&created["id"].as_i64()],
        )
        .await
        .expect("key row");
    let hash: Vec<u8> = row.get(0);
    assert_eq!(hash.len(), 32);
    assert_ne!(hash, secret.as_bytes());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_creation_needs_name() {
    let app = TestApp::start().await;
    let username = app.signup("keyname").await;
    let (access, _) = app.login(&username).await;
    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x".repeat(101)}),
    ] {
        let response = app
            .client
            .post(app.url("/api/key/"))
            .bearer_auth(&access)
            .json(&body)
            .send()
            .await
            .expect("sent");
        let (status, error) = read(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_field(&error), "name");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_rejects_whole_request() {
    let app = TestApp::start().await;
    let (username, _, key) = app.user_with_key("badevent").await;
    let body = json!([
        event("fine"),
        {"service_name": "checkout", "log_level": "loud", "message": "bad level"},
        event("also fine"),
        {"service_name": "", "log_level": "info", "message": "no service", "timestamp": "yesterday"},
    ]);
    let (status, response) = app.post_logs(&key, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{response}");
    assert_eq!(response["error"]["code"], "invalid_events");
    let errors = response["error"]["errors"].as_array().expect("errors");
    let named: Vec<(u64, &str)> = errors
        .iter()
        .map(|error| {
            (
                error["index"].as_u64().expect("index"),
                error["field"].as_str().expect("field"),
            )
        })
        .collect();
    assert!(named.contains(&(1, "log_level")), "{response}");
    assert!(named.contains(&(3, "service_name")), "{response}");
    assert!(named.contains(&(3, "timestamp")), "{response}");
    assert!(!named.iter().any(|(index, _)| *index == 0 || *index == 2));
    let level_reason = errors[0]["reason"].as_str().unwrap_or_default();
    assert!(
        level_reason.contains("warning"),
        "lists accepted levels: {level_reason}"
    );

    // A request sent after the rejected one is stored. Once it is there, the valid events
    // of the rejected request would have arrived too, had any been published.
    let (status, _) = app.post_logs(&key, &event("sentinel")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let db = app.db().await;
    let user = user_id(&db, &username).await;
    assert_eq!(
        wait_for_rows(&db, user, 1, Duration::from_secs(30)).await,
        1
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages: Vec<String> = db
        .query("SELECT message FROM logs WHERE user_id = $1", &[&user])
        .await
        .expect("select")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(messages, vec!["sentinel".to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_text_rejected() {
    let app = TestApp::start().await;
    let (_, _, key) = app.user_with_key("nul").await;
    let body = json!({"service_name": "svc", "log_level": "info", "message": "a\u{0}b"});
    let (status, response) = app.post_logs(&key, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{response}");
    assert_eq!(response["error"]["errors"][0]["field"], "message");

    let invalid_utf8 =
        b"{\"service_name\":\"svc\",\"log_level\":\"info\",\"message\":\"\xff\xfe\"}".to_vec();
    let (status, response) = read(app.post_logs_raw(&key, invalid_utf8).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(response["error"]["code"], "invalid_json");

    let surrogate = br#"{"service_name":"svc","log_level":"info","message":"\ud800"}"#.to_vec();
    let (status, response) = read(app.post_logs_raw(&key, surrogate).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(response["error"]["code"], "invalid_json");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_key_unauthorized() {
    let app = TestApp::start().await;
    let response = app
        .client
        .post(app.url("/api/logs/"))
        .json(&event("no key"))
        .send()
        .await
        .expect("sent");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");

    for key in ["lp_unknown", "", "   "] {
        let (status, _) = app.post_logs(key, &event("bad key")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "key {key:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_blocks_after_burst() {
    let app = TestApp::start().await;
    let (_, _, key) = app.user_with_key("ratelimit").await;
    let body = serde_json::to_vec(&event("tick")).expect("json");

    // GCRA with limit 100/min and burst 100: the first 100 pass at once, then one more
    // every 600 ms. Count passes until the first 429 and bound it by the elapsed time.
    let started = Instant::now();
    let mut passed = 0u32;
    let mut blocked = None;
    for _ in 0..200 {
        let response = app.post_logs_raw(&key, body.clone()).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            blocked = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let remaining: u32 = response.headers()["ratelimit-remaining"]
            .to_str()
            .expect("header")
            .parse()
            .expect("number");
        assert!(remaining < 100);
        passed += 1;
    }
    let elapsed = started.elapsed();
    let blocked = blocked.expect("a 429 within 200 requests");
    let refills = (elapsed.as_millis() / 600) as u32;
    assert!(passed >= 100, "only {passed} passed");
    assert!(
        passed <= 100 + refills + 1,
        "{passed} passed in {elapsed:?}"
    );

    let retry_after: u64 = blocked.headers()["retry-after"]
        .to_str()
        .expect("header")
        .parse()
        .expect("seconds");
    assert_eq!(retry_after, 1, "next slot is at most 600 ms away");
    assert_eq!(blocked.headers()["ratelimit-limit"], "100");
    assert_eq!(blocked.headers()["ratelimit-remaining"], "0");
    let (_, body) = read(blocked).await;
    assert_eq!(body["error"]["code"], "rate_limited");

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let response = app.post_logs_raw(&key, body_bytes()).await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "allowed again after Retry-After"
    );
    app.stop().await;
}

fn body_bytes() -> Vec<u8> {
    serde_json::to_vec(&event("after wait")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413() {
    let mut config = test_config();
    config.http.body_limit_bytes = 4096;
    let app = TestApp::start_with(config, Role::All).await;
    let (_, _, key) = app.user_with_key("big").await;
    let body = json!({"service_name": "svc", "log_level": "info", "message": "x".repeat(5000)});
    let (status, response) = app.post_logs(&key, &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response["error"]["code"], "payload_too_large");

    let (status, _) = app.post_logs(&key, &event("small")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_64k_rejected() {
    let app = TestApp::start().await;
    let (_, _, key) = app.user_with_key("longmsg").await;
    let body =
        json!({"service_name": "svc", "log_level": "info", "message": "x".repeat(64 * 1024 + 1)});
    let (status, response) = app.post_logs(&key, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(response["error"]["errors"][0]["field"], "message");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_share_json_shape() {
    let app = TestApp::start().await;
    let response = app
        .client
        .get(app.url("/no/such/path"))
        .send()
        .await
        .expect("sent");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");

    let response = app
        .client
        .get(app.url("/api/logs/"))
        .send()
        .await
        .expect("sent");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let response = app
        .client
        .get(app.url("/api/logs/"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["allow"], "POST");

    let response = app
        .client
        .post(app.url("/api/auth/login/"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_json");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let app = TestApp::start().await;
    let response = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    for path in ["/healthz", "/healthz/", "/readyz"] {
        let head = app.client.head(app.url(path)).send().await.expect("sent");
        assert_eq!(head.status(), StatusCode::OK, "HEAD {path}");
    }

    let (status, body) = read(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for check in ["postgres", "redis", "kafka", "consumers"] {
        assert_eq!(body["checks"][check], "ok", "{check}: {body}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_gets_503() {
    let mut config = test_config();
    config.kafka.brokers = "127.0.0.1:1".into();
    config.kafka.create_topic = false;
    config.producer.delivery_timeout_ms = 1000;
    config.http.ingest_deadline_ms = 2000;
    let app = TestApp::start_with(config, Role::Api).await;
    let (_, _, key) = app.user_with_key("nokafka").await;

    let started = Instant::now();
    let response = app.post_logs_raw(&key, body_bytes()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let (_, body) = read(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after.is_some());
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        !body.to_string().to_lowercase().contains("broker"),
        "no Kafka error text: {body}"
    );
    assert!(elapsed < Duration::from_secs(5), "answered in {elapsed:?}");

    let (status, body) = read(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["kafka"], "unavailable");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("kafka"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_kafka_message_rejected() {
    let mut config = test_config();
    config.producer.max_message_bytes = 4000;
    let app = TestApp::start_with(config, Role::All).await;
    let (username, _, key) = app.user_with_key("bigmsg").await;
    let big = json!({"service_name": "svc", "log_level": "info", "message": "x", "blob": "y".repeat(5000)});
    let (status, body) = app
        .post_logs(&key, &json!([event("small first"), big]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["errors"][0]["index"], 1);
    let reason = body["error"]["errors"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("over the limit of 4000 bytes"), "{reason}");

    let (status, _) = app.post_logs(&key, &event("sentinel")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let db = app.db().await;
    let user = user_id(&db, &username).await;
    assert_eq!(
        wait_for_rows(&db, user, 1, Duration::from_secs(30)).await,
        1
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        log_count(&db, user).await,
        1,
        "nothing of the rejected request was published"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_for_missing_user_unauthorized() {
    let app = TestApp::start().await;
    let claims = json!({"sub": i64::MAX.to_string(), "exp": unix_now() + 600, "iat": unix_now(),
                        "jti": Uuid::now_v7(), "typ": "access"});
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign");
    let response = app
        .client
        .post(app.url("/api/key/"))
        .bearer_auth(&token)
        .json(&json!({"name": "orphan"}))
        .send()
        .await
        .expect("sent");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    app.stop().await;
}
