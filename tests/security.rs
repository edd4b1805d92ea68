//! Access control and hostile input, against a real broker.

mod common;

use common::{config, Client, TestServer, BASIC};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const TOKENS: &str = r#"
[[token]]
name = "build-agents"
role = "agent"
secret = "agent-secret"
[[token]]
name = "ops"
role = "viewer"
secret = "viewer-secret"
"#;

async fn status_of(request: tokio_tungstenite::tungstenite::handshake::client::Request) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other:?}"),
    }
}

fn request(
    url: &str,
    header: Option<(&'static str, &str)>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut r = url.into_client_request().unwrap();
    if let Some((name, value)) = header {
        r.headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles() {
    let server = TestServer::start(config(&format!("{TOKENS}{BASIC}"))).await;
    let url = server.url();
    assert_eq!(status_of(request(&url, None)).await, 401);
    assert_eq!(
        status_of(request(&url, Some(("authorization", "Bearer wrong")))).await,
        401
    );
    assert_eq!(
        status_of(request(&format!("{url}?token=wrong"), None)).await,
        401
    );

    let mut agent = Client::connect(&format!("{url}?token=agent-secret")).await;
    assert_eq!(agent.hello["role"], "agent");
    let r = agent
        .request(json!({"op": "submit", "fn": "echo", "input": 1}))
        .await;
    assert_eq!(r["type"], "accepted");

    let (ws, _) = tokio_tungstenite::connect_async(request(
        &url,
        Some(("authorization", "Bearer viewer-secret")),
    ))
    .await
    .unwrap();
    let mut viewer = Client::from_socket(ws).await;
    assert_eq!(viewer.hello["role"], "viewer");
    for op in [
        json!({"op": "submit", "id": 1, "input": 1}),
        json!({"op": "subscribe", "id": 2, "key": "0".repeat(32)}),
        json!({"op": "cancel", "id": 3, "key": "0".repeat(32)}),
    ] {
        let e = viewer.request(op).await;
        assert_eq!(e["code"], "forbidden", "{e}");
        assert!(e["id"].is_number());
    }
    assert_eq!(viewer.request(json!({"op": "ping"})).await["type"], "pong");
    assert_eq!(
        viewer
            .request(json!({"op": "get", "key": "0".repeat(32)}))
            .await["type"],
        "status"
    );
    assert_eq!(
        viewer.request(json!({"op": "watch"})).await["type"],
        "snapshot"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_pages_from_other_origins_are_refused() {
    let server = TestServer::start(config(&format!(
        "allowed_origins = [\"https://dash.example.com\"]\n{BASIC}"
    )))
    .await;
    let url = server.url();
    let own = format!("http://{}", server.addr);
    assert_eq!(
        status_of(request(&url, Some(("origin", "https://evil.example")))).await,
        403
    );
    assert_eq!(status_of(request(&url, Some(("origin", &own)))).await, 101);
    assert_eq!(
        status_of(request(&url, Some(("origin", "https://dash.example.com")))).await,
        101
    );
    assert_eq!(
        status_of(request(&url, None)).await,
        101,
        "no Origin: not a browser"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_session_gets_busy_and_others_are_still_served() {
    let server = TestServer::start(config(&format!("[limits]\nmax_pending = 50\n{BASIC}"))).await;
    let mut flood = server.client().await;
    for n in 0..200 {
        flood
            .send(json!({"op": "submit", "id": n, "input": {"sleep_ms": 500, "n": n}}))
            .await;
    }
    let mut busy = 0;
    let mut accepted = 0;
    for _ in 0..200 {
        let r = flood.recv().await;
        match r["type"].as_str().unwrap() {
            "accepted" => accepted += 1,
            "error" => {
                assert_eq!(r["code"], "busy");
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 50);
    assert_eq!(busy, 150);
    let mut other = server.client().await;
    other
        .send(json!({"op": "submit", "fn": "echo", "input": "still served"}))
        .await;
    assert_eq!(other.recv_type("result").await["output"], "still served");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_large_json_is_refused_without_harm() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let deep = format!(
        "{{\"op\":\"submit\",\"input\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    c.send_text(&deep).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("nested deeper"));
    c.send_text(&format!("{{\"op\":{}}}", "[".repeat(100_000)))
        .await;
    assert_eq!(c.recv().await["code"], "bad_json");
    // Deep nesting anywhere in the frame is refused, not only in `input`.
    for depth in [200, 100_000] {
        let ping = format!(
            "{{\"op\":\"ping\",\"id\":7,\"x\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        c.send_text(&ping).await;
        let e = c.recv().await;
        assert_eq!(e["code"], "bad_json", "{e}");
        assert_eq!(e["id"], 7);
    }
    // Up to 128 levels (the frame's own object is one more) is fine.
    let ping = format!(
        "{{\"op\":\"ping\",\"x\":{}{}}}",
        "[".repeat(128),
        "]".repeat(128)
    );
    c.send_text(&ping).await;
    assert_eq!(c.recv().await["type"], "pong");
    // Large but within max_frame_bytes: a 900 KB input is evaluated normally.
    let big = json!({"op": "submit", "fn": "echo", "input": {"blob": "y".repeat(900_000)}});
    c.send(big).await;
    let r = c.recv_type("result").await;
    assert_eq!(r["output"]["blob"].as_str().unwrap().len(), 900_000);
    assert_eq!(c.request(json!({"op": "ping"})).await["type"], "pong");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{BASIC}",
        cert.display().to_string(),
        key.display().to_string()
    )))
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
            client_config,
        ))),
    )
    .await
    .unwrap();
    let mut c = Client::from_socket(ws).await;
    c.send(json!({"op": "submit", "fn": "echo", "input": "over tls"}))
        .await;
    assert_eq!(c.recv_type("result").await["output"], "over tls");

    // Plain WebSocket to the TLS port does not get a session.
    assert!(tokio_tungstenite::connect_async(server.url())
        .await
        .is_err());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_dropped() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(config(&format!(
        "[limits]\nheader_timeout_ms = 300\n{BASIC}"
    )))
    .await;
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the broker closes the idle connection");
    // Closed (possibly after a 408 response), well before the test's own limit.
    match read {
        Ok(n) => {
            if n > 0 {
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
            }
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_token() {
    let tokens = "[[token]]\nname = \"ops\"\nrole = \"viewer\"\nsecret = \"look-only\"\n";
    let open = TestServer::start(config(&format!("{tokens}{BASIC}"))).await;
    assert_eq!(open.http_get("/metrics").await.0, 200, "open by default");
    open.stop().await;

    let closed = TestServer::start(config(&format!(
        "metrics_need_token = true\n{tokens}{BASIC}"
    )))
    .await;
    assert_eq!(closed.http_get("/metrics").await.0, 401);
    assert_eq!(closed.http_get("/metrics?token=wrong").await.0, 401);
    let (status, body) = closed.http_get("/metrics?token=look-only").await;
    assert_eq!(status, 200);
    assert!(body.contains("herd_connections"));
    closed.stop().await;
}
