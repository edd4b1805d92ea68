//! The HTTP API against a real broker over real sockets: answers and
//! statuses, coalescing with WebSocket submits, timeouts, credentials and
//! quotas, and a waiting request cancelled when its client goes away.

mod common;

use common::{config, key_of, Client, TestServer, BASIC};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer: status, headers (lowercase names), JSON body.
struct Answer {
    status: u16,
    headers: String,
    body: Value,
}

fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request_text(addr, method, path, token, body).as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn post(server: &TestServer, path: &str, token: Option<&str>, body: Value) -> Answer {
    http(server.addr, "POST", path, token, &body.to_string()).await
}

const TOKENS: &str = r#"
[[token]]
name = "agent"
role = "agent"
secret = "agent-secret"
[[token]]
name = "ops"
role = "admin"
secret = "admin-secret"
[[token]]
name = "limited"
role = "agent"
secret = "limited-secret"
namespace = "limited"
[[namespace]]
name = "limited"
submits_per_s = 1
burst = 1
"#;

#[tokio::test]
async fn submit_get_and_invalidate_over_http() {
    let server = TestServer::start(config(&format!("{BASIC}{TOKENS}"))).await;
    let agent = Some("agent-secret");
    let input = json!({"http": 1});
    let key = key_of("default", &input);

    let a = http(server.addr, "GET", &format!("/v1/keys/{key}"), agent, "").await;
    assert_eq!((a.status, &a.body), (404, &json!({"state": "unknown"})));
    let a = post(&server, "/v1/submit", agent, json!({"input": input})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        (a.body["key"].as_str(), a.body["source"].as_str()),
        (Some(key.as_str()), Some("eval"))
    );
    assert!(
        a.body["output"].is_object() && a.body.get("type").is_none(),
        "{}",
        a.body
    );
    let a = post(&server, "/v1/submit", agent, json!({"input": input})).await;
    assert_eq!(a.body["source"], "cache", "{}", a.body);
    let a = http(server.addr, "GET", &format!("/v1/keys/{key}"), agent, "").await;
    assert_eq!((a.status, a.body["state"].as_str()), (200, Some("done")));

    // Only an admin invalidates.
    let a = post(&server, "/v1/invalidate", agent, json!({"key": key})).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let a = post(
        &server,
        "/v1/invalidate",
        Some("admin-secret"),
        json!({"key": key}),
    )
    .await;
    assert_eq!((a.status, &a.body), (200, &json!({"key": key})));
    let a = http(server.addr, "GET", &format!("/v1/keys/{key}"), agent, "").await;
    assert_eq!(a.status, 404);

    // wait:false: 202 with the key's state.
    let a = post(
        &server,
        "/v1/submit",
        agent,
        json!({"input": {"sleep_ms": 200}, "wait": false}),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["key"], key_of("default", &json!({"sleep_ms": 200})));
    assert!(["queued", "running"].contains(&a.body["state"].as_str().unwrap()));
    server.stop().await;
}

#[tokio::test]
async fn errors_have_their_statuses() {
    let server = TestServer::start(config(&format!("{BASIC}{TOKENS}"))).await;
    let agent = Some("agent-secret");
    let cases = [
        (None, "{\"input\":1}", 401, "unauthorized"),
        (Some("wrong"), "{\"input\":1}", 401, "unauthorized"),
        (agent, "not json", 400, "bad_json"),
        (agent, "[1]", 400, "bad_request"),
        (agent, "{\"fn\":\"echo\"}", 400, "bad_request"),
        (agent, "{\"input\":1,\"fn\":\"nope\"}", 404, "unknown_fn"),
        (agent, "{\"input\":{\"fail\":\"boom\"}}", 502, "eval_failed"),
    ];
    for (token, body, status, code) in cases {
        let a = http(server.addr, "POST", "/v1/submit", token, body).await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {}",
            a.body
        );
        assert!(a.body["error"]["message"].is_string());
    }
    let a = http(server.addr, "GET", "/v1/keys/nothex", agent, "").await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    // A body over max_frame_bytes: 413; a method a path does not take: 405;
    // both with the JSON error body.
    let big = format!("{{\"input\":\"{}\"}}", "x".repeat(1 << 20));
    let a = http(server.addr, "POST", "/v1/submit", agent, &big).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (413, Some("bad_request")),
        "{}",
        a.body
    );
    let a = http(server.addr, "GET", "/v1/submit", agent, "").await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (405, Some("bad_request")),
        "{}",
        a.body
    );

    // A namespace's rate limit: 429 with Retry-After in whole seconds.
    let limited = Some("limited-secret");
    let a = post(
        &server,
        "/v1/submit",
        limited,
        json!({"input": 1, "fn": "echo"}),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = post(
        &server,
        "/v1/submit",
        limited,
        json!({"input": 2, "fn": "echo"}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(a.headers.contains("retry-after: 1"), "{}", a.headers);
    server.stop().await;
}

#[tokio::test]
async fn an_http_submit_joins_a_websocket_submit_s_evaluation() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 400, "joined": true});
    let mut ws = server.client().await;
    ws.send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    assert_eq!(ws.recv_type("accepted").await["first"], true);
    let a = post(&server, "/v1/submit", None, json!({"input": input})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        (a.body["source"].as_str(), a.body["shared"].as_u64()),
        (Some("eval"), Some(2))
    );
    assert_eq!(ws.recv_type("result").await["shared"], 2);
    assert_eq!(server.settled_stats().await["evaluations"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_submit_past_its_timeout_answers_202_and_its_wait_leaves() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 3000, "late": true});
    let a = post(
        &server,
        "/v1/submit",
        None,
        json!({"input": input, "timeout_ms": 100}),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(
        (a.body["key"].as_str(), a.body["state"].as_str()),
        (Some(key_of("default", &input).as_str()), Some("running"))
    );
    // The evaluation goes on without the HTTP request's wait.
    let mut c: Client = server.client().await;
    let r = c
        .request(json!({"op": "get", "id": 1, "key": key_of("default", &input)}))
        .await;
    assert_eq!(
        (r["state"].as_str(), r["waiters"].as_u64()),
        (Some("running"), Some(0))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_request_whose_client_goes_away_leaves_the_wait_table() {
    // A remote fn no worker serves: the submit waits in its queue.
    let server = TestServer::start(config(&format!(
        "{BASIC}[[evaluator]]\nfn = \"remote\"\nkind = \"remote\"\n"
    )))
    .await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let body = json!({"input": 1, "fn": "remote"}).to_string();
    tcp.write_all(request_text(server.addr, "POST", "/v1/submit", None, &body).as_bytes())
        .await
        .unwrap();
    server
        .wait_metric("herd_wait_table_entries", |v| v == 1.0)
        .await;
    drop(tcp);
    server
        .wait_metric("herd_wait_table_entries", |v| v == 0.0)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_credentials_from_one_address_are_throttled_on_every_route() {
    let server = TestServer::start(config(&format!(
        "metrics_need_token = true\n[limits]\nfailed_logins_per_min = 12\n{BASIC}{TOKENS}"
    )))
    .await;
    // A missing token costs nothing; twelve wrong ones (the burst) get 401.
    // (One more is allowed every 5 s: far longer than these take.)
    for _ in 0..70 {
        let a = post(&server, "/v1/submit", None, json!({"input": 1})).await;
        assert_eq!(a.status, 401);
    }
    for n in 0..12 {
        let status = match n % 3 {
            0 => {
                post(&server, "/v1/submit", Some("wrong"), json!({"input": 1}))
                    .await
                    .status
            }
            1 => server.upgrade_status("wrong").await,
            _ => server.http_get("/metrics?token=wrong").await.0,
        };
        assert_eq!(status, 401, "failure {n}");
    }
    // The next is refused before its credential is looked at: wrong or right.
    for token in ["wrong", "agent-secret"] {
        let a = post(&server, "/v1/submit", Some(token), json!({"input": 1})).await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (429, Some("rate_limited")),
            "{}",
            a.body
        );
        let retry: u64 = a
            .headers
            .split("retry-after: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}", a.headers));
        assert!((1..=5).contains(&retry), "{}", a.headers);
        assert_eq!(server.upgrade_status(token).await, 429);
        assert_eq!(server.http_get("/metrics?token=admin-secret").await.0, 429);
    }
    // A refused attempt does not count: once the bucket holds one again
    // (within 5 s), the right token is let in.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.upgrade_status("agent-secret").await != 101 {
        assert!(tokio::time::Instant::now() < deadline, "never let in again");
        tokio::task::yield_now().await;
    }
    server.stop().await;
}
