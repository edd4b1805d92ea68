//! Signed tokens (JWT): what verifies, what is refused with 401, the
//! session closed at `exp`, keys from PEM files, `herd token`, and that no
//! token reaches the log. Real brokers over real sockets; the broker of the
//! log test is a real `herd serve` process.

mod common;

use common::{config, Client, TestServer, BASIC};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET_ENV: &str = "HERD_TEST_JWT_SECRET";
const SECRET: &str = "a-test-secret-of-reasonable-length";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A broker accepting HS256 tokens for audience `herd-test` from issuer
/// `tests`, with no leeway.
async fn broker(extra: &str) -> TestServer {
    std::env::set_var(SECRET_ENV, SECRET);
    let toml = format!(
        "{BASIC}[auth]\njwt_secret_env = \"{SECRET_ENV}\"\njwt_audience = \"herd-test\"\njwt_issuer = \"tests\"\njwt_leeway_s = 0\n{extra}"
    );
    TestServer::start(config(&toml)).await
}

/// Claims that verify, with `changes` applied (a null removes a claim).
fn claims(changes: Value) -> Value {
    let mut c = json!({
        "role": "agent", "ns": "team-a", "sub": "alice",
        "exp": now() + 600, "aud": "herd-test", "iss": "tests",
    });
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_valid_token_gives_its_role_and_namespace() {
    let server = broker("").await;
    let token = hs256(&claims(json!({"fns": ["echo"]})));
    let mut c = Client::connect(&format!("{}?token={token}", server.url())).await;
    assert_eq!(c.hello["role"], "agent");
    assert_eq!(c.hello["namespace"], "team-a");
    let r = c
        .request(json!({"op": "submit", "id": 1, "fn": "default", "input": 1}))
        .await;
    assert_eq!(r["code"], "forbidden", "the token's fns: {r}");
    let viewer = hs256(&claims(json!({"role": "viewer", "ns": "*"})));
    let c = Client::connect(&format!("{}?token={viewer}", server.url())).await;
    assert_eq!(
        (c.hello["role"].as_str(), c.hello["namespace"].as_str()),
        (Some("viewer"), Some("*"))
    );
    server.stop().await;
}

/// The result of `request`, a submit.
async fn result(c: &mut Client, request: Value) -> Value {
    c.send(request).await;
    c.recv_type("result").await
}

/// A session of namespace `ns` by a signed agent token.
async fn agent_of(server: &TestServer, ns: &str) -> Client {
    let token = hs256(&claims(json!({"ns": ns})));
    Client::connect(&format!("{}?token={token}", server.url())).await
}

#[tokio::test]
async fn a_namespace_named_only_by_a_signed_token_gets_the_default_quotas() {
    let server = broker(
        "[namespace_defaults]\nsubmits_per_s = 5\nmax_sessions = 2\nmax_pending = 3\n[[namespace]]\nname = \"listed\"\nmax_sessions = 3\n",
    )
    .await;
    // max_sessions: a third session of an unlisted namespace gets 429.
    let mut z1 = agent_of(&server, "team-z").await;
    let mut z2 = agent_of(&server, "team-z").await;
    let token = hs256(&claims(json!({"ns": "team-z"})));
    assert_eq!(server.upgrade_status(&token).await, 429);
    // Another unlisted namespace has bounds of its own.
    let mut y = agent_of(&server, "team-y").await;

    // submits_per_s = 5 (burst 5): 60 rapid submits, most refused.
    for n in 0..60 {
        z1.send(json!({"op": "submit", "id": n, "fn": "echo", "input": n}))
            .await;
    }
    // (Of those let through, the fourth and fifth find max_pending full.)
    let (mut answered, mut limited) = (0, 0);
    while answered + limited < 60 {
        let f = z1.recv().await;
        match (f["type"].as_str(), f["code"].as_str()) {
            (Some("error"), Some("rate_limited")) => {
                assert!(
                    f["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 1000),
                    "{f}"
                );
                limited += 1
            }
            (Some("result"), _) | (Some("error"), Some("busy")) => answered += 1,
            _ => {}
        }
    }
    // Five at once, then one more for each 200 ms the 60 take to arrive.
    assert!(
        answered <= 15 && limited >= 45,
        "{answered} answered, {limited} limited"
    );
    let r = result(
        &mut y,
        json!({"op": "submit", "id": 1, "fn": "echo", "input": 1}),
    )
    .await;
    assert_eq!(r["output"], 1, "team-y's bucket is its own: {r}");

    // max_pending = 3 across the namespace's sessions.
    let subscribe = |n: u32| json!({"op": "subscribe", "id": n, "key": format!("{n:032x}")});
    for n in 0..2 {
        assert_eq!(z1.request(subscribe(n)).await["type"], "subscribed");
    }
    assert_eq!(z2.request(subscribe(2)).await["type"], "subscribed");
    let r = z2.request(subscribe(3)).await;
    assert_eq!(r["code"], "busy", "{r}");
    assert!(r["message"].as_str().unwrap().contains("namespace"), "{r}");

    // A listed namespace takes the defaults its entry leaves unset.
    let mut listed = Vec::new();
    for _ in 0..3 {
        listed.push(agent_of(&server, "listed").await);
    }
    let token = hs256(&claims(json!({"ns": "listed"})));
    assert_eq!(server.upgrade_status(&token).await, 429);
    for n in 0..3 {
        assert_eq!(listed[0].request(subscribe(n)).await["type"], "subscribed");
    }
    assert_eq!(listed[0].request(subscribe(3)).await["code"], "busy");

    // The shared namespace is bound by [limits] alone.
    let mut shared = Vec::new();
    for _ in 0..3 {
        shared.push(agent_of(&server, "").await);
    }
    for n in 0..10 {
        let submit = json!({"op": "submit", "id": n, "fn": "echo", "input": n});
        let r = result(&mut shared[0], submit).await;
        assert_eq!(r["output"], n, "{r}");
    }
    server.stop().await;
}

#[tokio::test]
async fn unlisted_namespaces_keep_their_results_together_apart_from_the_rest() {
    let server = broker(
        "[cache]\nmax_bytes = 100000\n[namespace_defaults]\ncache_bytes_together = 100000\n",
    )
    .await;
    let mut shared = agent_of(&server, "").await;
    let input = json!(["precious", "x".repeat(400)]);
    let submit = json!({"op": "submit", "id": "p", "fn": "echo", "input": input});
    let r = result(&mut shared, submit.clone()).await;
    assert_eq!(r["source"], "eval", "{r}");
    // Unlisted namespaces write many times both stores' bound.
    let filler = "x".repeat(400);
    for ns in ["team-y", "team-z"] {
        let mut flood = agent_of(&server, ns).await;
        for n in 0..2500 {
            flood
                .send(json!({"op": "submit", "id": n, "fn": "echo", "input": [n, filler]}))
                .await;
        }
        let mut results = 0;
        while results < 2500 {
            if flood.recv().await["type"] == "result" {
                results += 1;
            }
        }
    }
    let r = result(&mut shared, submit).await;
    assert_eq!(r["source"], "cache", "kept apart from the flood: {r}");
    let (_, metrics) = server.http_get("/metrics").await;
    let bytes = common::metric_in(&metrics, "herd_cache_bytes").unwrap();
    assert!(bytes <= 200_000.0, "both stores within bounds: {bytes}");
    server.stop().await;
}

#[tokio::test]
async fn tampered_expired_early_and_foreign_tokens_are_refused() {
    let server = broker("").await;
    assert_eq!(server.upgrade_status(&hs256(&claims(json!({})))).await, 101);
    let good = hs256(&claims(json!({})));
    // Another payload under the same signature.
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    let forged = hs256(&claims(json!({"role": "admin"})));
    parts[1] = forged.split('.').nth(1).unwrap().to_string();
    let tampered = parts.join(".");
    // {"alg":"none","typ":"JWT"}, base64url, over a payload that verifies.
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );
    let other_secret = encode(
        &Header::default(),
        &claims(json!({})),
        &EncodingKey::from_secret(b"another-secret"),
    )
    .unwrap();
    let cases = [
        ("tampered", tampered),
        ("alg none", unsigned),
        ("another secret", other_secret),
        ("expired", hs256(&claims(json!({"exp": now() - 10})))),
        ("not yet valid", hs256(&claims(json!({"nbf": now() + 600})))),
        (
            "wrong audience",
            hs256(&claims(json!({"aud": "elsewhere"}))),
        ),
        ("no audience", hs256(&claims(json!({"aud": null})))),
        ("wrong issuer", hs256(&claims(json!({"iss": "mallory"})))),
        ("no role", hs256(&claims(json!({"role": null})))),
        ("bad namespace", hs256(&claims(json!({"ns": "a:b"})))),
        (
            "an agent of every namespace",
            hs256(&claims(json!({"role": "agent", "ns": "*"}))),
        ),
        (
            "an admin of every namespace",
            hs256(&claims(json!({"role": "admin", "ns": "*"}))),
        ),
        ("no exp", hs256(&claims(json!({"exp": null})))),
    ];
    for (what, token) in cases {
        assert_eq!(server.upgrade_status(&token).await, 401, "{what}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_session_is_closed_with_1008_when_its_token_expires() {
    let server = broker("").await;
    let token = hs256(&claims(json!({"exp": now() + 2})));
    let mut c = Client::connect(&format!("{}?token={token}", server.url())).await;
    let r = c.request(json!({"op": "ping", "id": 1})).await;
    assert_eq!(r["type"], "pong");
    let close = c.recv_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "token expired");
    server.stop().await;
}

#[tokio::test]
async fn tokens_signed_with_ed25519_and_p256_keys_verify_from_a_pem_file() {
    for (alg, rcgen_alg) in [
        (Algorithm::EdDSA, &rcgen::PKCS_ED25519),
        (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("jwt.pub.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let toml = format!(
            "{BASIC}[auth]\njwt_public_key_file = {:?}\n",
            public.display().to_string()
        );
        let server = TestServer::start(config(&toml)).await;
        let private = pair.serialize_pem();
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        };
        let claims = json!({"role": "viewer", "ns": "ops", "exp": now() + 600});
        let token = encode(&Header::new(alg), &claims, &key).unwrap();
        let c = Client::connect(&format!("{}?token={token}", server.url())).await;
        assert_eq!(c.hello["namespace"], "ops", "{alg:?}");
        // An HS256 token is not accepted by a broker with only a public key.
        let hs = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"guess"),
        )
        .unwrap();
        assert_eq!(server.upgrade_status(&hs).await, 401, "{alg:?}");
        server.stop().await;
    }
}

#[tokio::test]
async fn herd_token_mints_what_the_broker_accepts_and_no_token_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!("{BASIC}[auth]\njwt_secret_env = \"{SECRET_ENV}\"\n"),
    )
    .unwrap();
    let minted = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "token",
            "--secret-env",
            SECRET_ENV,
            "--role",
            "admin",
            "--ns",
            "team-b",
            "--sub",
            "cron",
        ])
        .env(SECRET_ENV, SECRET)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();

    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(common::cluster::SERVE_ARGS)
        .arg(&path)
        .env(SECRET_ENV, SECRET)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = lines_rx.recv().expect("herd serve logs");
        let parsed: Value = serde_json::from_str(&line).unwrap();
        if let Some(addr) = parsed["fields"]["addr"].as_str() {
            break addr.to_string();
        }
    };
    let url = format!("ws://{addr}/ws");
    let mut c = Client::connect(&format!("{url}?token={token}")).await;
    assert_eq!(
        (c.hello["role"].as_str(), c.hello["namespace"].as_str()),
        (Some("admin"), Some("team-b"))
    );
    c.request(json!({"op": "ping", "id": 1})).await;
    drop(c);
    let bad = format!("{token}x");
    let refused = tokio_tungstenite::connect_async(format!("{url}?token={bad}")).await;
    assert!(refused.is_err());
    let _ = child.kill();
    let _ = child.wait();
    let log: Vec<String> = lines_rx.iter().collect();
    let log = log.join("\n");
    assert!(
        log.contains("upgrade refused"),
        "the refusal is logged: {log}"
    );
    assert!(log.contains("cron"), "the session is named by sub: {log}");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token reached the log: {log}");
}
