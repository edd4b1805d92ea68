//! Hostile timing and resource bounds: every waiter told, every session
//! bounded, every thread recoverable. Each test synchronises on what the
//! broker shows (a frame, a metric, a snapshot), never on a sleep.

mod common;

use common::{config, key_of, Client, TestServer, BASIC};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A simulate evaluator that lets an evaluation overrun its timeout.
const OVERRUNNING: &str = r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
timeout_ms = 300
max_sleep_ms = 10000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_reaches_who_subscribed_after_the_timeout() {
    let server = TestServer::start(config(OVERRUNNING)).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let input = json!({"sleep_ms": 1500, "late": true});
    let key = key_of("default", &input);
    a.send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    let timed_out = a.recv_type("result").await;
    assert_eq!(timed_out["error"]["code"], "eval_timeout");

    // After the timeout the key has no job; a subscriber still gets its outcome.
    let sub = b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(sub["state"], "unknown");
    let late = b.recv_type("result").await;
    assert_eq!(late["id"], "s");
    assert_eq!(late["key"], key);
    assert_eq!(
        late["output"]["key"], key,
        "the late success itself: {late}"
    );

    // The late success was cached too.
    let again = a
        .request(json!({"op": "submit", "id": 2, "input": input}))
        .await;
    assert_eq!(again["source"], "cache");
    let stats = server.settled_stats().await;
    assert_eq!(stats["timeouts"], 1);
    assert_eq!(stats["evaluations"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_kept_for_error_ttl_like_any_failure() {
    let server = TestServer::start(config(&format!(
        "[cache]\nerror_ttl_s = 60\n[limits]\ndrain_timeout_s = 1\n{OVERRUNNING}"
    )))
    .await;
    let mut a = server.client().await;
    let input = json!({"sleep_ms": 5000, "kept": true});
    a.send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    assert_eq!(a.recv_type("result").await["error"]["code"], "eval_timeout");
    let again = a
        .request(json!({"op": "submit", "id": 2, "input": input}))
        .await;
    assert_eq!(again["type"], "result", "{again}");
    assert_eq!(again["source"], "cache");
    assert_eq!(again["error"]["code"], "eval_timeout");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    let server =
        TestServer::start(config(&format!("[limits]\nheartbeat_ms = 1000\n{BASIC}"))).await;
    let big = json!({"sleep_ms": 1, "output_bytes": 1_000_000});
    let mut warm = server.client().await;
    let first = warm
        .request(json!({"op": "submit", "id": 0, "input": big}))
        .await;
    assert_eq!(first["type"], "accepted");
    assert!(warm.recv_type("result").await["output"].is_object());
    drop(warm);

    let mut stalled = server.client().await;
    for id in 0..30 {
        stalled
            .send(json!({"op": "submit", "id": id, "input": big}))
            .await;
    }
    // It never reads again; the broker must let it go.
    let closed = |v: f64| v >= 1.0;
    let by = tokio::select! {
        _ = server.wait_metric("herd_closes_total{code=\"4001\"}", closed) => 4001,
        _ = server.wait_metric("herd_closes_total{code=\"4002\"}", closed) => 4002,
    };
    assert!(by == 4001 || by == 4002);
    server.wait_metric("herd_connections", |v| v == 0.0).await;
    drop(stalled);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_subscriptions_of_one_key_hold_one_wait() {
    let server = TestServer::basic().await;
    let mut sub = server.client().await;
    let mut agent = server.client().await;
    let input = json!({"sleep_ms": 50, "many": "subs"});
    let key = key_of("default", &input);
    for id in 0..100 {
        let r = sub
            .request(json!({"op": "subscribe", "id": id, "key": key}))
            .await;
        assert_eq!(r["type"], "subscribed");
    }
    let accepted = agent.request(json!({"op": "submit", "input": input})).await;
    assert_eq!(accepted["waiters"], 2, "one subscription and this submit");
    let result = sub.recv_type("result").await;
    assert_eq!(result["id"], 0);
    assert_eq!(result["shared"], 2);
    // Frames arrive in order: the pong comes next, no second result.
    assert_eq!(sub.request(json!({"op": "ping"})).await["type"], "pong");
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_bytes_bound_what_one_session_can_pin() {
    let server = TestServer::start(config(
        r#"
[limits]
outbound_bytes = 2300000
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 2
max_output_bytes = 600000
"#,
    ))
    .await;
    let mut greedy = server.client().await;
    let input = json!({"sleep_ms": 100, "output_bytes": 600000});
    for id in 0..20 {
        greedy
            .send(json!({"op": "submit", "id": id, "input": input}))
            .await;
    }
    // Twenty waiters of one 600 kB result are 12 MB of frames at once: over the bound.
    let mut code = None;
    while let Some(message) = tokio::time::timeout(common::FRAME_WAIT, greedy.ws.next())
        .await
        .expect("the session ends in time")
    {
        match message {
            Ok(Message::Close(frame)) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    server
        .wait_metric("herd_closes_total{code=\"4001\"}", |v| v == 1.0)
        .await;
    assert!(matches!(code, None | Some(4001)), "{code:?}");

    // A reader that keeps up with the same twenty results is not closed.
    let mut reader = server.client().await;
    let other = json!({"sleep_ms": 100, "output_bytes": 600000, "n": 2});
    for id in 0..3 {
        reader
            .send(json!({"op": "submit", "id": id, "input": other}))
            .await;
    }
    for _ in 0..3 {
        assert!(reader.recv_type("result").await["output"].is_object());
    }
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluation_queue_is_bounded_in_bytes() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
max_input_bytes = 2048
queue_bytes = 4096
"#,
    ))
    .await;
    let mut c = server.client().await;
    occupy_the_thread(&server, &mut c, 400).await;
    let pad = "x".repeat(1500);
    for n in 0..2 {
        let r = c
            .request(json!({"op": "submit", "wait": false, "input": {"pad": pad, "n": n}}))
            .await;
        assert_eq!(r["type"], "accepted", "{r}");
    }
    let refused = c
        .request(json!({"op": "submit", "id": "x", "wait": false, "input": {"pad": pad, "n": 3}}))
        .await;
    assert_eq!(refused["code"], "busy");
    assert!(refused["message"].as_str().unwrap().contains("queue_bytes"));
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_lost_past_its_timeout_is_replaced_and_reclaimed() {
    let server = TestServer::start(config(OVERRUNNING)).await;
    let mut c = server.client().await;
    let stuck = json!({"sleep_ms": 2000, "stuck": true});
    let stuck_key = key_of("default", &stuck);
    c.send(json!({"op": "submit", "id": 1, "input": stuck}))
        .await;
    assert_eq!(c.recv_type("result").await["error"]["code"], "eval_timeout");
    server
        .wait_metric("herd_evaluator_lost_threads{fn=\"default\"}", |v| v == 1.0)
        .await;
    assert_eq!(
        server
            .metric("herd_evaluator_healthy{fn=\"default\"}")
            .await,
        Some(0.0)
    );
    // The only configured thread is still asleep, yet new work is served.
    let next = c
        .request(json!({"op": "submit", "id": 2, "input": {"sleep_ms": 1, "next": 1}}))
        .await;
    assert_eq!(next["type"], "accepted");
    assert!(c.recv_type("result").await["output"].is_object());
    assert_eq!(
        c.request(json!({"op": "get", "key": stuck_key})).await["state"],
        "unknown",
        "answered while the lost thread was still inside its evaluation"
    );
    // When the lost thread comes back the evaluator is healthy again.
    server
        .wait_metric("herd_evaluator_lost_threads{fn=\"default\"}", |v| v == 0.0)
        .await;
    server
        .wait_metric("herd_evaluator_healthy{fn=\"default\"}", |v| v == 1.0)
        .await;
    assert_eq!(
        c.request(json!({"op": "get", "key": stuck_key})).await["state"],
        "done"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_submits_count_against_max_pending() {
    let server = TestServer::start(config(&format!("[limits]\nmax_pending = 4\n{BASIC}"))).await;
    let mut greedy = server.client().await;
    let mut answers = Vec::new();
    for n in 0..6 {
        let r = greedy
            .request(json!({"op": "submit", "wait": false, "input": {"sleep_ms": 300, "fair": n}}))
            .await;
        answers.push(r["type"].as_str().unwrap().to_string());
        if r["type"] == "error" {
            assert_eq!(r["code"], "busy");
        }
    }
    assert_eq!(answers.iter().filter(|t| *t == "accepted").count(), 4);
    assert_eq!(answers.iter().filter(|t| *t == "error").count(), 2);
    // Another session is not affected.
    let mut other = server.client().await;
    let r = other
        .request(json!({"op": "submit", "wait": false, "input": {"sleep_ms": 1, "other": 1}}))
        .await;
    assert_eq!(r["type"], "accepted");
    // Finished evaluations give the room back.
    server.settled_stats().await;
    let r = greedy
        .request(json!({"op": "submit", "wait": false, "input": {"sleep_ms": 1, "fair": "later"}}))
        .await;
    assert_eq!(r["type"], "accepted");
    server.settled_stats().await;
    server.stop().await;
}

/// Sends a WebSocket upgrade with these `Host` and `Origin` values; returns the status.
async fn upgrade_status(server: &TestServer, host: &str, origin: Option<&str>) -> u16 {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\n{origin}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(common::FRAME_WAIT, tcp.read_exact(&mut head))
        .await
        .expect("a status line in time")
        .unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_local_hosts_may_upgrade() {
    let server = TestServer::start(config(&format!(
        "allowed_hosts = [\"herd.internal\"]\n{BASIC}"
    )))
    .await;
    let port = server.addr.port();
    let evil = format!("rebind.example:{port}");
    let evil_origin = format!("http://rebind.example:{port}");
    assert_eq!(
        upgrade_status(&server, &evil, Some(&evil_origin)).await,
        403
    );
    assert_eq!(upgrade_status(&server, &evil, None).await, 403);
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("herd.internal:{port}"),
        "app.localhost".to_string(),
    ] {
        assert_eq!(upgrade_status(&server, &host, None).await, 101, "{host}");
    }
    let page = format!("http://localhost:{port}");
    assert_eq!(
        upgrade_status(&server, &format!("localhost:{port}"), Some(&page)).await,
        101
    );
    // /metrics too: a rebound name is refused, this machine's are served.
    assert_eq!(get_status(&server, "/metrics", &evil).await, 403);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        assert_eq!(get_status(&server, "/metrics", &host).await, 200, "{host}");
    }
    server.stop().await;
}

/// Sends `GET path` with this `Host`; returns the status.
async fn get_status(server: &TestServer, path: &str, host: &str) -> u16 {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(common::FRAME_WAIT, tcp.read_exact(&mut head))
        .await
        .expect("a status line in time")
        .unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_counted_as_1006() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    assert_eq!(c.request(json!({"op": "ping"})).await["type"], "pong");
    // Vanish without a close frame: shut the TCP stream down under the WebSocket.
    let tcp = match c.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("plain test connection"),
    };
    tcp.shutdown().await.unwrap();
    drop(c);
    server
        .wait_metric("herd_closes_total{code=\"1006\"}", |v| v == 1.0)
        .await;
    assert_eq!(
        server.metric("herd_closes_total{code=\"1002\"}").await,
        None
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_registered_while_sessions_close_closes_too() {
    let broker = herd::server::broker::Broker::start(config(BASIC)).unwrap();
    broker.close_sessions(1001);
    let late = Arc::new(herd::outbox::SessionCtl::new(
        broker.next_session_id(),
        1 << 20,
    ));
    broker.register_session(&late);
    assert_eq!(late.code(), 1001);
    assert!(late.closing().is_cancelled());
    broker.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_snapshot_is_built_per_tick_for_every_watcher() {
    let server =
        TestServer::start(config(&format!("[dashboard]\nmax_watchers = 10\n{BASIC}"))).await;
    let mut watchers = Vec::new();
    for n in 0..10 {
        let mut w = server.client().await;
        w.send(json!({"op": "watch", "id": n, "interval_ms": 100}))
            .await;
        watchers.push(w);
    }
    let mut seen = 0;
    for (n, w) in watchers.iter_mut().enumerate() {
        for _ in 0..5 {
            let snap = w.recv_type("snapshot").await;
            assert_eq!(snap["id"], n);
            assert!(snap["stats"]["connections"].is_number());
            seen += 1;
        }
    }
    let rendered = server
        .metric("herd_snapshots_rendered_total")
        .await
        .expect("the renderer counts");
    assert!(
        rendered < seen as f64 / 2.0,
        "{rendered} snapshots built for {seen} delivered"
    );
    // Beyond max_watchers a watch is refused.
    let mut one_more = server.client().await;
    let refused = one_more
        .request(json!({"op": "watch", "id": "x", "interval_ms": 100}))
        .await;
    assert_eq!(refused["code"], "busy", "{refused}");
    server.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// What one churning session has asked for and been told.
#[derive(Default)]
struct Tally {
    waiting: usize,
    results: usize,
    cancelled: usize,
}

impl Tally {
    /// Reads one frame, counts it, and returns its type.
    async fn read(&mut self, ws: &mut Ws) -> Option<String> {
        loop {
            let Some(Ok(message)) = tokio::time::timeout(common::FRAME_WAIT, ws.next())
                .await
                .expect("every waiter that stayed is answered")
            else {
                panic!("connection ended early");
            };
            let Message::Text(text) = message else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["type"].as_str() {
                // A wait:false submit of a cached key is answered too,
                // without an id; it is not a wait.
                Some("result") if !frame["id"].is_null() => self.results += 1,
                Some("cancelled") => self.cancelled += 1,
                _ => {}
            }
            return frame["type"].as_str().map(str::to_string);
        }
    }
}

/// Sessions that submit, join, subscribe, cancel and vanish mid-flight:
/// afterwards nothing is left behind, and every waiter that stayed was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 16
"#,
    ))
    .await;
    let url = server.url();
    let mut tasks = Vec::new();
    for s in 0..240u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            ws.next().await.unwrap().unwrap(); // hello
            let mut tally = Tally::default();
            let cancels = usize::from(s % 4 == 1);
            let rounds = 20 + s % 20;
            for round in 0..rounds {
                let input = json!({"sleep_ms": 20 + (s * 7 + round) % 40, "k": (s + round) % 25});
                let key = key_of("default", &input);
                send(&mut ws, json!({"op": "submit", "id": format!("{s}-{round}"), "input": input})).await;
                tally.waiting += 1;
                if round % 2 == 0 {
                    send(&mut ws, json!({"op": "subscribe", "id": format!("s{s}-{round}"), "key": key})).await;
                    tally.waiting += 1;
                }
                if round % 3 == 0 {
                    send(&mut ws, json!({"op": "submit", "wait": false, "input": {"k": s % 25, "sleep_ms": 30}})).await;
                }
                if cancels == 1 && round == 1 {
                    send(&mut ws, json!({"op": "cancel", "key": key})).await;
                }
                // Pace the session by what the broker answers.
                tally.read(&mut ws).await;
            }
            match s % 4 {
                // Vanish mid-flight: half with a close handshake, half by dropping TCP.
                0 => {
                    let _ = ws.close(None).await;
                    0
                }
                2 => {
                    drop(ws);
                    0
                }
                // Stay until every wait is answered; a cancelled wait is
                // answered only if its result came before the cancel.
                _ => {
                    let mut pinged = false;
                    loop {
                        if tally.cancelled == cancels
                            && tally.results + cancels >= tally.waiting
                            && !pinged
                        {
                            // Frames come in order: after the pong nothing is owed.
                            send(&mut ws, json!({"op": "ping"})).await;
                            pinged = true;
                        }
                        if tally.read(&mut ws).await == Some("pong".into()) {
                            break;
                        }
                    }
                    let (results, waiting) = (tally.results, tally.waiting);
                    assert!(
                        results == waiting || results + cancels == waiting,
                        "{results} results for {waiting} waits"
                    );
                    let _ = ws.close(None).await;
                    results
                }
            }
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert!(answered > 0);
    for gauge in [
        "herd_wait_table_entries",
        "herd_queued",
        "herd_running",
        "herd_connections",
    ] {
        server.wait_metric(gauge, |v| v == 0.0).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queued_jobs_do_not_hold_the_queue() {
    // Jobs cancelled while queued leave the queue's count at once, although
    // their threads have not yet skipped them: new jobs are taken.
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
queue_capacity = 2
"#,
    ))
    .await;
    let mut c = server.client().await;
    occupy_the_thread(&server, &mut c, 500).await;
    for n in 0..2 {
        let r = c
            .request(json!({"op": "submit", "id": n, "input": {"sleep_ms": 10, "doomed": n}}))
            .await;
        assert_eq!(r["type"], "accepted", "{r}");
        let key = key_of("default", &json!({"sleep_ms": 10, "doomed": n}));
        let r = c.request(json!({"op": "cancel", "key": key})).await;
        assert_eq!(r["type"], "cancelled", "{r}");
    }
    for n in 0..2 {
        let r = c
            .request(json!({"op": "submit", "id": 10 + n, "input": {"sleep_ms": 10, "fresh": n}}))
            .await;
        assert_eq!(r["type"], "accepted", "{r}");
    }
    for _ in 0..2 {
        let r = c.recv_type("result").await;
        assert!(r["output"].is_object() || r["output"].is_string(), "{r}");
    }
    server.settled_stats().await;
    server.stop().await;
}

/// Submits (without waiting) an evaluation of `sleep_ms` and returns once
/// it runs: a one-thread evaluator is then busy for that long.
async fn occupy_the_thread(server: &TestServer, c: &mut Client, sleep_ms: u64) {
    let blocker = json!({"sleep_ms": sleep_ms, "n": "blocker"});
    c.send(json!({"op": "submit", "wait": false, "input": blocker}))
        .await;
    c.recv_type("accepted").await;
    server
        .wait_inflight(&key_of("default", &blocker), "running")
        .await;
}

/// Sends the head of `POST /v1/submit` and one byte of a 100-byte body,
/// then holds the connection open.
async fn slow_submit(addr: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = "POST /v1/submit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

/// The status of the response a connection gets (0 if it is closed without one).
async fn status_of_response(mut tcp: TcpStream) -> u16 {
    let mut head = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(30), tcp.read_exact(&mut head)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0),
        Ok(Err(_)) => 0,
        Err(_) => panic!("no response within 30 s"),
    }
}

/// The broker at `addr` answers `/healthz` and serves a WebSocket session.
async fn serves_health_and_sessions(addr: &str) {
    let mut health = TcpStream::connect(addr).await.unwrap();
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status_of_response(health).await, 200);
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    assert_eq!(
        c.request(json!({"op": "ping", "id": 1})).await["type"],
        "pong"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_bodies_cannot_take_every_file_descriptor() {
    // A broker with 256 file descriptors; more slow bodies than that.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[limits]\nmax_http_requests = 32\nhttp_body_timeout_ms = 4000\n{BASIC}");
    let (_broker, addr) =
        common::cluster::serve_child_under(&dir, &toml, &["prlimit", "--nofile=256:256", "--"]);
    let slow = 300;
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..slow {
        let tcp = slow_submit(&addr).await;
        let answered = answered.clone();
        tokio::spawn(async move {
            let _ = answered.send(status_of_response(tcp).await);
        });
    }
    // All but the 32 being read are refused at once, with 503.
    for n in 0..slow - 32 {
        let status = answers.recv().await.unwrap();
        assert_eq!(status, 503, "answer {n}");
    }
    // Meanwhile the broker serves its health check and WebSocket sessions.
    serves_health_and_sessions(&addr).await;
    // The 32 whose bodies never come are answered 408 at http_body_timeout_ms.
    for _ in 0..32 {
        assert_eq!(answers.recv().await.unwrap(), 408);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_take_every_file_descriptor() {
    // A broker with 256 file descriptors that waits a minute for a request's
    // head; more silent connections than that. Past max_idle_connections
    // the one idle longest is closed, so the health check and sessions
    // still get in.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[limits]\nmax_idle_connections = 64\nheader_timeout_ms = 60000\n{BASIC}");
    let (_broker, addr) =
        common::cluster::serve_child_under(&dir, &toml, &["prlimit", "--nofile=256:256", "--"]);
    // A connection that made a request and keeps alive is idle again
    // once answered: the first in line to be closed.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    kept.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer[9..12], b"200");
    let mut silent = vec![kept];
    for _ in 0..400 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    serves_health_and_sessions(&addr).await;
    // The oldest were closed by the broker: each reads end of stream
    // (the kept-alive one after the rest of its answer).
    for (n, mut tcp) in silent.drain(..300).enumerate() {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(common::FRAME_WAIT, tcp.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "connection {n} still open: {read:?}"
        );
    }
}
