//! The broker end to end: protocol v1 over real sockets against `server::run`.

mod common;

use common::{config, key_of, TestServer, BASIC};
use futures::SinkExt;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_ping() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    assert_eq!(c.hello["protocol"], 1);
    assert_eq!(c.hello["role"], "agent");
    assert!(c.hello["server"].as_str().unwrap().starts_with("herd/"));
    assert_eq!(c.hello["session"].as_str().unwrap().len(), 36);
    assert_eq!(c.hello["limits"]["max_frame_bytes"], 1048576);
    assert_eq!(c.hello["limits"]["max_pending"], 1024);
    let pong = c.request(json!({"op": "ping", "id": "p1"})).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], "p1");
    assert!(pong["server_time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_evaluates_then_answers_from_cache() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 20, "q": "a"});
    let key = key_of("default", &input);
    let accepted = c
        .request(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    assert_eq!(accepted["type"], "accepted");
    assert_eq!(accepted["id"], 1);
    assert_eq!(accepted["key"], key);
    assert_eq!(accepted["first"], true);
    assert_eq!(accepted["waiters"], 1);
    assert!(accepted["state"] == "queued" || accepted["state"] == "running");
    let result = c.recv().await;
    assert_eq!(result["type"], "result");
    assert_eq!(result["id"], 1);
    assert_eq!(result["key"], key);
    assert_eq!(result["source"], "eval");
    assert_eq!(result["shared"], 1);
    assert!(result["eval_ms"].as_f64().unwrap() >= 20.0);
    assert_eq!(result["output"]["key"], key);

    // Member order and whitespace do not change the key.
    let again = c
        .request(json!({"op": "submit", "id": "two", "fn": "default", "input": {"q": "a", "sleep_ms": 20}}))
        .await;
    assert_eq!(again["type"], "result");
    assert_eq!(again["id"], "two");
    assert_eq!(again["source"], "cache");
    assert_eq!(again["output"], result["output"]);

    let echo = c
        .request(json!({"op": "submit", "fn": "echo", "input": {"b": [1, 2], "a": "hi"}}))
        .await;
    assert_eq!(echo["type"], "accepted");
    assert_eq!(echo["key"], "cd0e2525f1f40969c08f2ffa4a70c6b5");
    assert!(echo.get("id").is_none());
    let echoed = c.recv().await;
    assert_eq!(echoed["output"], json!({"a": "hi", "b": [1, 2]}));

    let stats = server.settled_stats().await;
    assert_eq!(stats["submits"], 3);
    assert_eq!(stats["evaluations"], 2);
    assert_eq!(stats["cache_hits"], 1);
    assert_eq!(stats["cache_entries"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_wait_still_runs() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 50, "nowait": true});
    let accepted = c
        .request(json!({"op": "submit", "id": 9, "input": input, "wait": false}))
        .await;
    assert_eq!(accepted["type"], "accepted");
    assert_eq!(accepted["first"], true);
    assert_eq!(accepted["waiters"], 0);
    assert_eq!(c.try_recv(Duration::from_millis(300)).await, None);
    let status = c
        .request(json!({"op": "get", "id": 10, "key": accepted["key"]}))
        .await;
    assert_eq!(status["type"], "status");
    assert_eq!(status["state"], "done");
    assert_eq!(status["id"], 10);
    assert!(status["output"].is_object());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_in_each_state() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
"#,
    ))
    .await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let running = json!({"sleep_ms": 600, "r": 1});
    let queued = json!({"sleep_ms": 10, "r": 2});
    let (kr, kq) = (key_of("default", &running), key_of("default", &queued));

    let unknown = b.request(json!({"op": "get", "key": kq})).await;
    assert_eq!(unknown["state"], "unknown");

    a.send(json!({"op": "submit", "id": "r", "input": running}))
        .await;
    a.recv_type("accepted").await;
    a.send(json!({"op": "submit", "id": "q", "input": queued}))
        .await;
    let acc = a.recv_type("accepted").await;
    assert_eq!(acc["state"], "queued");

    // The single thread picks up the first job.
    server.wait_inflight(&kr, "running").await;
    let s = b.request(json!({"op": "get", "key": kr})).await;
    assert_eq!(s["state"], "running");
    assert_eq!(s["waiters"], 1);
    assert!(s["age_ms"].as_u64().is_some());
    let s = b.request(json!({"op": "get", "id": 3, "key": kq})).await;
    assert_eq!(s["state"], "queued");
    assert_eq!(s["waiters"], 1);
    assert_eq!(s["id"], 3);

    a.recv_type("result").await;
    a.recv_type("result").await;
    let done = b.request(json!({"op": "get", "key": kq})).await;
    assert_eq!(done["state"], "done");
    assert_eq!(done["output"]["key"], kq);
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_submits_share_one_evaluation() {
    let server = TestServer::basic().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(server.client().await);
    }
    let input = json!({"sleep_ms": 200, "burst": "one"});
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let input = input.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            c.send(json!({"op": "submit", "id": i, "input": input}))
                .await;
            let accepted = c.recv().await;
            let result = c.recv().await;
            (accepted, result)
        }));
    }
    let mut firsts = 0;
    let mut outputs = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (accepted, result) = t.await.unwrap();
        assert_eq!(accepted["type"], "accepted", "{accepted}");
        if accepted["first"] == true {
            firsts += 1;
        }
        assert_eq!(result["type"], "result");
        assert_eq!(result["id"], i);
        assert_eq!(result["source"], "eval");
        assert_eq!(result["shared"], 50);
        outputs.push(result["output"].clone());
    }
    assert_eq!(firsts, 1);
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    let stats = server.settled_stats().await;
    assert_eq!(stats["evaluations"], 1);
    assert_eq!(stats["coalesced"], 49);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_before_anyone_submits() {
    let server = TestServer::basic().await;
    let mut sub = server.client().await;
    let mut agent = server.client().await;
    let input = json!({"sleep_ms": 30, "later": 1});
    let key = key_of("default", &input);
    let ack = sub
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["state"], "unknown");
    assert_eq!(ack["id"], "s");

    let acc = agent
        .request(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    assert_eq!(acc["first"], true);
    assert_eq!(acc["waiters"], 2);
    let r1 = sub.recv().await;
    let r2 = agent.recv().await;
    assert_eq!(r1["type"], "result");
    assert_eq!(r1["id"], "s");
    assert_eq!(r2["id"], "a");
    assert_eq!(r1["shared"], 2);
    assert_eq!(r1["output"], r2["output"]);

    // A subscription to a cached key is answered at once.
    let cached = sub
        .request(json!({"op": "subscribe", "id": "s2", "key": key}))
        .await;
    assert_eq!(cached["type"], "result");
    assert_eq!(cached["source"], "cache");
    assert_eq!(cached["id"], "s2");
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_reaches_every_waiter_and_is_not_cached() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 100, "fail": "no luck"});
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.client().await);
    }
    for c in clients.iter_mut() {
        c.send(json!({"op": "submit", "input": input})).await;
    }
    for c in clients.iter_mut() {
        let r = c.recv_type("result").await;
        assert_eq!(r["error"]["code"], "eval_failed");
        assert_eq!(r["error"]["message"], "no luck");
        assert_eq!(r["shared"], 3);
        assert!(r.get("output").is_none());
    }
    let again = clients[0]
        .request(json!({"op": "submit", "input": input}))
        .await;
    assert_eq!(again["type"], "accepted");
    assert_eq!(again["first"], true);
    clients[0].recv_type("result").await;
    let stats = server.settled_stats().await;
    assert_eq!(stats["evaluations"], 2);
    assert_eq!(stats["failures"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_cached_when_configured() {
    let server = TestServer::start(config(&format!("[cache]\nerror_ttl_s = 60\n{BASIC}"))).await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 1, "fail": "kept"});
    c.send(json!({"op": "submit", "input": input})).await;
    let first = c.recv_type("result").await;
    assert_eq!(first["error"]["code"], "eval_failed");
    let second = c.request(json!({"op": "submit", "input": input})).await;
    assert_eq!(second["type"], "result");
    assert_eq!(second["source"], "cache");
    assert_eq!(second["error"]["message"], "kept");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_evaluation() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
"#,
    ))
    .await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let boom = json!({"sleep_ms": 50, "panic": true});
    a.send(json!({"op": "submit", "input": boom})).await;
    b.send(json!({"op": "submit", "input": boom})).await;
    for c in [&mut a, &mut b] {
        let r = c.recv_type("result").await;
        assert_eq!(r["error"]["code"], "eval_failed");
        assert!(r["error"]["message"].as_str().unwrap().contains("panicked"));
    }
    // The one thread survived and serves the next evaluations.
    for n in 0..3 {
        a.send(json!({"op": "submit", "input": {"sleep_ms": 1, "after": n}}))
            .await;
        let r = a.recv_type("result").await;
        assert!(r["output"].is_object());
    }
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fails_every_waiter() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 2
timeout_ms = 200
max_sleep_ms = 600
"#,
    ))
    .await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let input = json!({"sleep_ms": 600, "slow": true});
    a.send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    assert_eq!(a.recv_type("accepted").await["first"], true);
    b.send(json!({"op": "submit", "id": 2, "input": input}))
        .await;
    for c in [&mut a, &mut b] {
        let r = c.recv_type("result").await;
        assert_eq!(r["error"]["code"], "eval_timeout");
        assert_eq!(r["shared"], 2);
    }
    let stats = server.settled_stats().await;
    assert_eq!(stats["timeouts"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drops_a_queued_job_nobody_waits_for() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
"#,
    ))
    .await;
    let mut c = server.client().await;
    let blocker = json!({"sleep_ms": 400, "n": "blocker"});
    let doomed = json!({"sleep_ms": 1, "n": "doomed"});
    let kd = key_of("default", &doomed);
    c.send(json!({"op": "submit", "input": blocker})).await;
    c.recv_type("accepted").await;
    c.send(json!({"op": "submit", "input": doomed})).await;
    assert_eq!(c.recv_type("accepted").await["state"], "queued");
    let cancelled = c
        .request(json!({"op": "cancel", "id": "c", "key": kd}))
        .await;
    assert_eq!(cancelled["type"], "cancelled");
    assert_eq!(cancelled["id"], "c");
    assert_eq!(cancelled["key"], kd);
    let gone = c.request(json!({"op": "get", "key": kd})).await;
    assert_eq!(gone["state"], "unknown");
    c.recv_type("result").await; // the blocker
    let stats = server.settled_stats().await;
    assert_eq!(stats["evaluations"], 1, "the cancelled job never ran");
    assert_eq!(
        c.request(json!({"op": "get", "key": kd})).await["state"],
        "unknown"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_job_still_caches_it() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 200, "n": "running"});
    let key = key_of("default", &input);
    c.send(json!({"op": "submit", "input": input})).await;
    c.recv_type("accepted").await;
    server.wait_inflight(&key, "running").await;
    assert_eq!(
        c.request(json!({"op": "cancel", "key": key})).await["type"],
        "cancelled"
    );
    assert_eq!(
        c.try_recv(Duration::from_millis(400)).await,
        None,
        "no result after cancel"
    );
    let s = c.request(json!({"op": "get", "key": key})).await;
    assert_eq!(s["state"], "done");
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_keep_the_connection_open() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let cases: Vec<(&str, &str, Value)> = vec![
        ("{nope", "bad_json", Value::Null),
        ("[1,2]", "bad_request", Value::Null),
        (r#"{"id":4}"#, "bad_request", json!(4)),
        (r#"{"op":"submit","id":5}"#, "bad_request", json!(5)),
        (
            r#"{"op":"get","id":6,"key":"short"}"#,
            "bad_request",
            json!(6),
        ),
        (r#"{"op":"fly","id":"x"}"#, "unknown_op", json!("x")),
        (
            r#"{"op":"submit","fn":"nope","input":1,"id":7}"#,
            "unknown_fn",
            json!(7),
        ),
        (
            r#"{"op":"watch","interval_ms":5}"#,
            "bad_request",
            Value::Null,
        ),
    ];
    for (text, code, id) in cases {
        c.send_text(text).await;
        let e = c.recv().await;
        assert_eq!(e["type"], "error", "{text}");
        assert_eq!(e["code"], code, "{text}");
        assert_eq!(e["id"], id, "{text}");
        assert!(e["message"].as_str().unwrap().len() > 3);
    }
    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1, 2, 3,
    ]))
    .await
    .unwrap();
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(c.request(json!({"op": "ping"})).await["type"], "pong");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_when_pending_waits_or_the_queue_are_full() {
    let server = TestServer::start(config(
        r#"
[limits]
max_pending = 2
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
queue_capacity = 1
"#,
    ))
    .await;
    let mut c = server.client().await;
    for n in 0..2 {
        let key = key_of("default", &json!({"never": n}));
        assert_eq!(
            c.request(json!({"op": "subscribe", "key": key})).await["type"],
            "subscribed"
        );
    }
    let key = key_of("default", &json!({"never": 3}));
    let e = c
        .request(json!({"op": "subscribe", "id": 3, "key": key}))
        .await;
    assert_eq!(e["code"], "busy");
    assert_eq!(e["id"], 3);

    // The evaluation queue: one running, one queued, the third is refused.
    let mut d = server.client().await;
    let running = json!({"sleep_ms": 300, "q": 1});
    d.send(json!({"op": "submit", "wait": false, "input": running}))
        .await;
    d.recv_type("accepted").await;
    server
        .wait_inflight(&key_of("default", &running), "running")
        .await;
    d.send(json!({"op": "submit", "wait": false, "input": {"sleep_ms": 1, "q": 2}}))
        .await;
    d.recv_type("accepted").await;
    let e = d
        .request(json!({"op": "submit", "id": "x", "input": {"sleep_ms": 1, "q": 3}}))
        .await;
    assert_eq!(e["code"], "busy", "{e}");
    assert_eq!(e["id"], "x");
    drop(c);
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start(config(&format!(
        "[limits]\nmax_frame_bytes = 4096\n{BASIC}"
    )))
    .await;
    let mut c = server.client().await;
    let big = json!({"op": "submit", "input": {"pad": "x".repeat(8192)}});
    c.send(big).await;
    let frame = c.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009);
    drop(c);
    server
        .wait_metric("herd_closes_total{code=\"1009\"}", |v| v == 1.0)
        .await;
    let mut other = server.client().await;
    assert_eq!(other.request(json!({"op": "ping"})).await["type"], "pong");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_with_4002() {
    let server = TestServer::start(config(&format!("[limits]\nheartbeat_ms = 100\n{BASIC}"))).await;
    // A client that answers no ping.
    let mut silent = common::raw_websocket(server.addr).await;
    server
        .wait_metric("herd_closes_total{code=\"4002\"}", |v| v == 1.0)
        .await;
    let frames = common::read_frames(&mut silent).await;
    let (opcode, payload) = frames.last().expect("frames were sent");
    assert_eq!(*opcode, 0x8, "the last frame is a close");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4002);

    // A client that reads (and so answers pings) stays.
    let mut live = server.client().await;
    assert_eq!(live.try_recv(Duration::from_millis(700)).await, None);
    assert_eq!(live.request(json!({"op": "ping"})).await["type"], "pong");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_snapshots_until_unwatch() {
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
"#,
    ))
    .await;
    let mut agent = server.client().await;
    let mut viewer = server.client().await;
    let slow = json!({"sleep_ms": 800, "label": "x".repeat(300)});
    let key = key_of("default", &slow);
    agent.send(json!({"op": "submit", "input": slow})).await;
    agent
        .send(json!({"op": "submit", "input": {"sleep_ms": 1, "behind": 1}}))
        .await;
    agent.recv_type("accepted").await;
    agent.recv_type("accepted").await;
    viewer
        .send(json!({"op": "watch", "id": "w", "interval_ms": 100}))
        .await;
    let snap = viewer.recv().await;
    assert_eq!(snap["type"], "snapshot");
    assert!(snap["at_ms"].as_u64().unwrap() > 0);
    for field in [
        "connections",
        "submits",
        "cache_hits",
        "evaluations",
        "coalesced",
        "failures",
        "queued",
        "running",
        "cache_entries",
        "cache_bytes",
    ] {
        assert!(snap["stats"][field].is_number(), "stats.{field}");
    }
    let inflight = snap["inflight"].as_array().unwrap();
    assert_eq!(inflight.len(), 2);
    assert_eq!(inflight[0]["key"], key, "oldest first");
    assert_eq!(inflight[0]["fn"], "default");
    assert_eq!(inflight[0]["waiters"], 1);
    assert!(inflight[0]["age_ms"].is_number());
    assert!(
        inflight[0]["input_preview"]
            .as_str()
            .unwrap()
            .chars()
            .count()
            <= 120
    );
    assert_eq!(inflight[1]["state"], "queued");
    assert_eq!(snap["stats"]["connections"], 2);

    let r = agent.recv_type("result").await;
    assert_eq!(r["key"], key);
    agent.recv_type("result").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = viewer.recv_type("snapshot").await;
        if s["inflight"].as_array().unwrap().is_empty() {
            let recent = s["recent"].as_array().unwrap();
            assert_eq!(recent.len(), 2);
            assert_ne!(recent[0]["key"], key, "newest first");
            assert_eq!(recent[1]["key"], key);
            assert_eq!(recent[1]["ok"], true);
            assert_eq!(recent[1]["shared"], 1);
            assert!(recent[1]["eval_ms"].as_f64().unwrap() >= 800.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    viewer.send(json!({"op": "unwatch"})).await;
    // At most one snapshot already on its way, then silence.
    let mut after = 0;
    while let Some(v) = viewer.try_recv(Duration::from_millis(400)).await {
        assert_eq!(v["type"], "snapshot");
        after += 1;
    }
    assert!(after <= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes() {
    let mut server = TestServer::basic().await;
    assert_eq!(server.http_get("/healthz").await.0, 200);
    assert_eq!(server.http_get("/readyz").await.0, 200);
    let (status, body) = server.http_get("/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>herd</title>"));
    let (status, js) = server.http_get("/app.js").await;
    assert_eq!(status, 200);
    assert!(js.contains("\"watch\""));
    assert_eq!(server.http_get("/nope").await.0, 404);
    assert_eq!(server.http_get("/ws").await.0, 426);
    let mut c = server.client().await;
    c.request(json!({"op": "submit", "fn": "echo", "input": 1}))
        .await;
    c.recv_type("result").await;
    let (status, metrics) = server.http_get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "herd_submits_total{fn=\"echo\"} 1",
        "herd_evaluations_total{fn=\"echo\"} 1",
        "herd_cache_hits_total{fn=\"echo\"} 0",
        "herd_submit_latency_seconds_count{fn=\"echo\"} 1",
        "herd_eval_seconds_count{fn=\"echo\"} 1",
        "herd_evaluator_healthy{fn=\"echo\"} 1",
        "herd_cache_entries 1",
        "herd_connections 1",
        "herd_queued 0",
        "herd_wait_table_entries 0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    drop(c);
    server.begin_stop();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_are_refused_cleanly() {
    let server =
        TestServer::start(config(&format!("[limits]\nmax_connections = 2\n{BASIC}"))).await;
    let mut a = server.client().await;
    let _b = server.client().await;
    let refused = tokio_tungstenite::connect_async(server.url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    assert_eq!(a.request(json!({"op": "ping"})).await["type"], "pong");
    drop(a);
    // The slot comes back once a session ends.
    server.wait_metric("herd_connections", |v| v == 1.0).await;
    let (ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .expect("the freed slot is taken");
    drop(ws);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_in_flight_results_before_1001() {
    let mut server = TestServer::basic().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let input = json!({"sleep_ms": 600, "last": "words"});
    a.send(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    b.send(json!({"op": "submit", "id": "b", "input": input}))
        .await;
    a.recv_type("accepted").await;
    b.recv_type("accepted").await;
    let addr = server.addr;
    server.begin_stop();
    // Each look at /readyz is a round trip: the pace of this wait.
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    while common::http_get(addr, "/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
    }
    assert_eq!(common::http_get(addr, "/healthz").await.0, 200);
    let refused = a
        .request(json!({"op": "submit", "id": "late", "input": {"new": 1}}))
        .await;
    assert_eq!(refused["code"], "shutting_down");
    assert_eq!(refused["id"], "late");
    for c in [&mut a, &mut b] {
        let r = c.recv_type("result").await;
        assert!(r["output"].is_object());
        let frame = c.recv_close().await.expect("a close frame");
        assert_eq!(u16::from(frame.code), 1001);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_leave_no_waiters_behind() {
    let server = TestServer::basic().await;
    for n in 0..5 {
        let mut c = server.client().await;
        c.send(json!({"op": "subscribe", "key": key_of("default", &json!({"never": n}))}))
            .await;
        c.send(json!({"op": "submit", "input": {"sleep_ms": 300, "gone": n}}))
            .await;
        c.recv_type("subscribed").await;
        c.recv_type("accepted").await;
        drop(c);
    }
    let stats = server.settled_stats().await;
    assert_eq!(stats["wait_table"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_over_max_input_bytes_are_refused() {
    let server = TestServer::start(config(
        "[[evaluator]]\nfn = \"default\"\nkind = \"echo\"\nthreads = 1\nmax_input_bytes = 64\n",
    ))
    .await;
    let mut c = server.client().await;
    let e = c
        .request(json!({"op": "submit", "id": 1, "input": {"pad": "z".repeat(100)}}))
        .await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("max_input_bytes"));
    let ok = c
        .request(json!({"op": "submit", "input": {"pad": "z"}}))
        .await;
    assert_eq!(ok["type"], "accepted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_asked_for_without_waiting_survives_its_session() {
    // `herd submit --nowait` and close: the queued work still runs.
    let server = TestServer::start(config(
        "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 1\n",
    ))
    .await;
    let mut a = server.client().await;
    a.send(json!({"op": "submit", "input": {"sleep_ms": 300, "n": "ahead"}}))
        .await;
    a.recv_type("accepted").await;
    let wanted = json!({"sleep_ms": 1, "n": "left behind"});
    let key = key_of("default", &wanted);
    let mut b = server.client().await;
    let acc = b
        .request(json!({"op": "submit", "wait": false, "input": wanted}))
        .await;
    assert_eq!(acc["state"], "queued");
    drop(b);
    server.wait_metric("herd_connections", |v| v == 1.0).await;
    a.recv_type("result").await;
    server.settled_stats().await;
    let s = a.request(json!({"op": "get", "key": key})).await;
    assert_eq!(
        s["state"], "done",
        "the wait:false submit's work still ran: {s}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_asked_for_without_waiting_survives_a_cancel() {
    let server = TestServer::start(config(
        "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 1\n",
    ))
    .await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.send(json!({"op": "submit", "input": {"sleep_ms": 300, "n": "blocker"}}))
        .await;
    a.recv_type("accepted").await;
    let wanted = json!({"sleep_ms": 1, "n": "wanted"});
    let key = key_of("default", &wanted);
    let acc = a
        .request(json!({"op": "submit", "wait": false, "input": wanted}))
        .await;
    assert_eq!(acc["state"], "queued");
    assert_eq!(
        b.request(json!({"op": "subscribe", "key": key})).await["type"],
        "subscribed"
    );
    assert_eq!(
        b.request(json!({"op": "cancel", "key": key})).await["type"],
        "cancelled"
    );
    a.recv_type("result").await;
    server.settled_stats().await;
    let s = b.request(json!({"op": "get", "key": key})).await;
    assert_eq!(s["state"], "done", "the wait:false submit's work still ran");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_input_changes_only_how_fast_a_frame_is_answered() {
    let server = TestServer::basic().await;
    let mut c = server.client().await;
    let input = r#"{"b": [1, 2], "a": "hi"}"#;
    // Frames that end in that input but are not requests, or not the same
    // request: their replies before the input is known, and after.
    let others = [
        format!(r#"{{"op":"submit","fn":"echo","id":1,"input":{input},}}"#),
        format!(r#"{{"op":"submit","fn":"echo","id":2,"input":{input}}} x"#),
        format!(r#"{{"op":"submit","fn":"echo","id":3,"input":{input},"input":{input}}}"#),
        format!(r#"{{"op":"submit","fn":"echo","id":4,"input":{input}, "wait":"no"}}"#),
        format!(r#"{{"op":"submit","fn":"echo","id":5,"input":{input}]}}"#),
        format!(r#"{{"op":"submit","fn":"nope","id":6,"input":{input}}}"#),
        format!(r#"{{"op":"submit","fn":7,"id":7,"input":{input}}}"#),
    ];
    let mut before = vec![];
    for text in &others {
        c.send_text(text).await;
        before.push(c.recv().await);
    }
    for reply in &before {
        assert_eq!(reply["type"], "error", "{reply}");
    }

    let submit = format!("{{\"op\":\"submit\",\"fn\":\"echo\",\"id\":8,\"input\": {input} \n}}");
    c.send_text(&submit).await;
    assert_eq!(c.recv().await["type"], "accepted");
    let evaluated = c.recv().await;
    assert_eq!(evaluated["source"], "eval");
    c.send_text(&submit).await;
    let hit = c.recv().await;
    assert_eq!(hit["source"], "cache");
    assert_eq!(hit["output"], evaluated["output"]);

    for (text, reply) in others.iter().zip(&before) {
        c.send_text(text).await;
        assert_eq!(&c.recv().await, reply, "{text}");
    }
    // The same bytes under another fn are another input.
    let other_fn = format!(r#"{{"op":"submit","fn":"default","id":9,"input":{input}}}"#);
    c.send_text(&other_fn).await;
    assert_eq!(c.recv().await["type"], "accepted");
    assert_eq!(c.recv().await["source"], "eval");
    server.stop().await;
}
