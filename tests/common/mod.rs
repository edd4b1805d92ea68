//! A real broker on 127.0.0.1:0 and a real WebSocket client for the tests.
#![allow(dead_code)]

pub mod cluster;

use futures::{SinkExt, StreamExt};
use herd::Config;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), herd::HerdError>>>,
}

/// A config from TOML text, every other key at its default.
pub fn config(toml: &str) -> Config {
    Config::from_toml(toml).expect("test config is valid")
}

/// The builtin evaluators with small thread counts.
pub const BASIC: &str = r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 8
[[evaluator]]
fn = "echo"
kind = "echo"
threads = 2
"#;

/// An agent token in each of namespaces team-a and team-b.
pub const AGENTS: &str = r#"
[[token]]
name = "a"
role = "agent"
secret = "team-a-secret"
namespace = "team-a"
[[token]]
name = "b"
role = "agent"
secret = "team-b-secret"
namespace = "team-b"
"#;

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, config).await
    }

    pub async fn start_on(listener: TcpListener, config: Config) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(herd::server::run(listener, config, async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn basic() -> TestServer {
        Self::start(config(BASIC)).await
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A session with `token` (`?token=`).
    pub async fn client_as(&self, token: &str) -> Client {
        Client::connect(&format!("{}?token={token}", self.url())).await
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url()).await
    }

    /// Begins shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts the broker down and waits until `run` returns.
    pub async fn stop(mut self) {
        self.begin_stop();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("broker stops")
            .unwrap()
            .unwrap();
    }

    /// The `stats` of a fresh snapshot.
    pub async fn stats(&self) -> Value {
        let mut c = self.client().await;
        c.send(json!({"op": "watch", "interval_ms": 100})).await;
        let snap = c.recv_type("snapshot").await;
        snap["stats"].clone()
    }

    /// Waits until nothing is queued, running or waiting, and returns the stats.
    pub async fn settled_stats(&self) -> Value {
        self.wait_stats(|s| s["wait_table"] == 0 && s["queued"] == 0 && s["running"] == 0)
            .await
    }

    /// Waits until the snapshot stats satisfy `done` (the watching session
    /// itself counts as one connection), and returns them.
    pub async fn wait_stats(&self, done: impl Fn(&Value) -> bool) -> Value {
        let mut c = self.client().await;
        c.send(json!({"op": "watch", "interval_ms": 100})).await;
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let snap = c.recv_type("snapshot").await;
            let s = &snap["stats"];
            if done(s) {
                return s.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker did not reach the expected state: {s}"
            );
        }
    }

    /// Waits until a snapshot shows `key` in flight in `state` ("queued" or "running").
    pub async fn wait_inflight(&self, key: &str, state: &str) {
        self.wait_inflight_row(key, |row| row["state"] == state)
            .await;
    }

    /// Waits until a snapshot's in-flight row of `key` satisfies `done`.
    pub async fn wait_inflight_row(&self, key: &str, done: impl Fn(&Value) -> bool) {
        let mut c = self.client().await;
        c.send(json!({"op": "watch", "interval_ms": 100})).await;
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let snap = c.recv_type("snapshot").await;
            let inflight = snap["inflight"].as_array().cloned().unwrap_or_default();
            if inflight.iter().any(|e| e["key"] == key && done(e)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never showed as expected: {snap}"
            );
        }
    }

    /// Waits until `key`'s result is in this broker's cache (`get`).
    pub async fn wait_cached(&self, key: &str) {
        let mut c = self.client().await;
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let r = c.request(json!({"op": "get", "id": "g", "key": key})).await;
            if r["state"] == "done" {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never reached the cache: {r}"
            );
        }
    }

    /// The value of one sample in `/metrics` (`name` with its labels, as
    /// written there), or None while it is absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        metric_in(&body, name)
    }

    /// Waits until the sample `name` in `/metrics` satisfies `done`; returns it.
    pub async fn wait_metric(&self, name: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let (_, body) = self.http_get("/metrics").await;
            if let Some(v) = metric_in(&body, name).filter(|v| done(*v)) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never reached the expected value:\n{body}"
            );
            // Each look is a full HTTP round trip to the broker: the pace of polling.
            tokio::task::yield_now().await;
        }
    }

    /// The HTTP status of a WebSocket upgrade presenting `token` in the
    /// URL (101 when accepted).
    pub async fn upgrade_status(&self, token: &str) -> u16 {
        let url = format!("{}?token={token}", self.url());
        match tokio_tungstenite::connect_async(&url).await {
            Ok((_, response)) => response.status().as_u16(),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(other) => panic!("{other}"),
        }
    }

    /// A plain HTTP GET: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }
}

/// One sample's value in a Prometheus text exposition.
pub fn metric_in(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(FRAME_WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A WebSocket opened by hand on a raw TCP stream: it answers nothing (no
/// pong, no close reply) unless the test writes it.
pub async fn raw_websocket(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Reads a raw server stream to its end and splits it into (opcode, payload) frames.
pub async fn read_frames(tcp: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut raw = Vec::new();
    tokio::time::timeout(FRAME_WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("the server ends the stream in time")
        .unwrap();
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 2 <= raw.len() {
        let opcode = raw[at] & 0x0f;
        let (len, header) = match raw[at + 1] & 0x7f {
            126 => (u16::from_be_bytes([raw[at + 2], raw[at + 3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(raw[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let start = at + header;
        frames.push((opcode, raw[start..(start + len).min(raw.len())].to_vec()));
        at = start + len;
    }
    frames
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub hello: Value,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self::from_socket(ws).await
    }

    /// Wraps an open socket and reads its `hello`.
    pub async fn from_socket(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        let mut c = Client {
            ws,
            hello: Value::Null,
        };
        c.hello = c.recv().await;
        assert_eq!(c.hello["type"], "hello");
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).await.unwrap();
    }

    /// The next JSON frame (control frames skipped).
    pub async fn recv(&mut self) -> Value {
        self.try_recv(FRAME_WAIT).await.expect("a frame in time")
    }

    /// The next JSON frame within `wait`, or None.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => panic!("unexpected close: {f:?}"),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// The next frame of `kind`, skipping snapshots and other kinds.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    pub async fn request(&mut self, v: Value) -> Value {
        self.send(v).await;
        self.recv().await
    }

    /// Reads until the close frame and returns it (None: closed without one).
    pub async fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(_)) => continue,
                other => {
                    eprintln!("stream ended without a close frame: {other:?}");
                    return None;
                }
            }
        }
    }
}

/// The key herd derives for `input` under `fn_name`.
pub fn key_of(fn_name: &str, input: &Value) -> String {
    herd::Key::derive(fn_name, herd::key::canonical_json(input).as_bytes()).to_hex()
}
