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

/// The HTTP status of an upgrade presenting `token` (101 when accepted).
async fn upgrade_status(server: &TestServer, token: &str) -> u16 {
    let url = format!("{}?token={token}", server.url());
    match tokio_tungstenite::connect_async(&url).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
    }
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

#[tokio::test]
async fn tampered_expired_early_and_foreign_tokens_are_refused() {
    let server = broker("").await;
    assert_eq!(
        upgrade_status(&server, &hs256(&claims(json!({})))).await,
        101
    );
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
        assert_eq!(upgrade_status(&server, &token).await, 401, "{what}");
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
        assert_eq!(upgrade_status(&server, &hs).await, 401, "{alg:?}");
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
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--config",
        ])
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
