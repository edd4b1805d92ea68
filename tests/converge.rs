//! A cluster converges once a fault is over: nobody is left waiting, the
//! brokers' caches agree with Redis, no result from before an answered
//! invalidation is served (by a broker that just started either), and a
//! waiting broker waits as long as the claimant may take. Real brokers (in
//! this process, and `herd serve` children) over a real redis-server that
//! the tests stop, pause (SIGSTOP) and restart empty.

mod common;

use common::cluster::{
    broker, broker_with, evaluations, redis_cli, serve_child, signal, wait_redis, Redis, SIMULATE,
};
use common::{key_of, Client, TestServer};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The output a broker's `get` reports for `key` (its cache), if any.
async fn cached(server: &TestServer, key: &str) -> Value {
    let mut client = server.client().await;
    let status = client
        .request(json!({"op": "get", "id": "g", "key": key}))
        .await;
    status["output"].clone()
}

/// The output stored in Redis for `key` under epoch 0 of fn version "".
fn stored(redis: &Redis, key: &str) -> Value {
    let text = redis_cli(redis.port, &["GET", &format!("herd:result:{{{key}}}:0:")]);
    let stored: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    stored["output"].clone()
}

/// A remote fn `embed`: its outputs come from whichever worker the test
/// runs, so two brokers' evaluations of one key can be told apart.
const EMBED: &str = "[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\ntimeout_ms = 10000\n";

/// A worker session serving `embed` on `server`.
async fn worker(server: &TestServer) -> Client {
    let mut worker = server.client().await;
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 4}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_told_of_a_result_computed_while_redis_was_away() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let pid = redis.child.as_ref().unwrap().id();
    signal(pid, "-STOP");
    a.wait_metric("herd_cluster_up", |v| v == 0.0).await;
    b.wait_metric("herd_cluster_up", |v| v == 0.0).await;
    // A evaluates alone; a session on B subscribes to the key meanwhile.
    let input = json!({"sleep_ms": 10, "while": "away"});
    let key = key_of("default", &input);
    let mut on_a = a.client().await;
    let r = on_a
        .request(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    assert_eq!(r["type"], "accepted", "{r}");
    let computed = on_a.recv_type("result").await;
    assert_eq!(computed["source"], "eval", "{computed}");
    let mut on_b = b.client().await;
    let r = on_b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    signal(pid, "-CONT");
    // A writes its result back once Redis answers; B's subscriber is told.
    let told = on_b.recv_type("result").await;
    assert_eq!(told["id"], "s", "{told}");
    assert_eq!(told["output"], computed["output"], "{told}");
    assert_eq!(stored(&redis, &key), computed["output"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_that_lost_its_claim_takes_the_result_that_stands() {
    // A evaluates a key on its worker (slowly), B joins it. A's claim goes
    // (as when Redis pauses past a lease); B takes the key over and its
    // worker answers first. A, finishing later, gives its waiter B's
    // result and keeps it: both brokers' caches and Redis agree.
    let redis = Redis::start().await;
    let a = broker_with(&redis.config("a", EMBED)).await;
    let b = broker_with(&redis.config("b", EMBED)).await;
    let (mut worker_a, mut worker_b) = (worker(&a).await, worker(&b).await);
    let input = json!({"claim": "lost"});
    let key = key_of("embed", &input);
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "id": "a", "fn": "embed", "input": input}))
        .await;
    let task_a = worker_a.recv_type("task").await;
    let mut on_b = b.client().await;
    on_b.send(json!({"op": "submit", "id": "b", "fn": "embed", "input": input}))
        .await;
    b.wait_inflight_row(&key, |row| row["broker"] == "a").await;
    let claim = format!("herd:claim:{{{key}}}:0:");
    assert_eq!(redis_cli(redis.port, &["DEL", &claim]).trim(), "1");
    // B takes the key over at its next look, and its worker answers.
    let task_b = worker_b.recv_type("task").await;
    worker_b
        .send(json!({"op": "complete", "task": task_b["task"], "output": {"by": "b"}}))
        .await;
    assert_eq!(on_b.recv_type("result").await["output"]["by"], "b");
    // Delivered at once; stored in Redis alongside.
    let name = format!("herd:result:{{{key}}}:0:");
    wait_redis(redis.port, &name, |v| v.contains("\"by\":\"b\"")).await;
    // A's worker answers too (its task may have been revoked by then).
    worker_a
        .send(json!({"op": "complete", "task": task_a["task"], "output": {"by": "a"}}))
        .await;
    let from_a = on_a.recv_type("result").await;
    assert_eq!(from_a["output"]["by"], "b", "{from_a}");
    a.wait_stats(|s| s["wait_table"] == 0).await;
    assert_eq!(cached(&a, &key).await["by"], "b");
    assert_eq!(cached(&b, &key).await["by"], "b");
    assert_eq!(stored(&redis, &key)["by"], "b");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_fn_after_redis_restarts_empty_still_drops_its_results() {
    let mut redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let input = json!({"sleep_ms": 5, "epochs": "survive"});
    let submit = json!({"op": "submit", "input": input});
    on_a.send(submit.clone()).await;
    on_a.recv_type("result").await;
    let r = on_a
        .request(json!({"op": "invalidate", "id": 1, "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    // Redis restarts with nothing: its epochs are gone, the brokers' are
    // not. Each broker notices (its connections broke) and is back.
    redis.stop();
    redis.restart().await;
    for server in [&a, &b] {
        server
            .wait_metric("herd_cluster_degraded_total", |v| v >= 1.0)
            .await;
        server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    }
    on_a.send(submit.clone()).await;
    assert!(on_a.recv_type("result").await["output"].is_object());
    let before = evaluations(&[&a, &b]).await;
    let r = on_b
        .request(json!({"op": "invalidate", "id": 2, "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    // The invalidation holds on A: its cached result is gone.
    on_a.send(submit.clone()).await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["source"], "eval", "{r}");
    assert_eq!(evaluations(&[&a, &b]).await, before + 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_broker_waits_as_long_as_the_claimant_may_take() {
    // One thread, timeout_ms 3500: A's key waits in A's queue behind a
    // 3 s job, then runs 3 s. B waits on A's claim all that time (it gave
    // up at the timeout plus a lease, 4.5 s, before).
    let redis = Redis::start().await;
    let one =
        "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 1\ntimeout_ms = 3500\n";
    let a = broker_with(&redis.config("a", one)).await;
    let b = broker_with(&redis.config("b", one)).await;
    let mut on_a = a.client().await;
    let ahead = json!({"sleep_ms": 3000, "ahead": 1});
    on_a.send(json!({"op": "submit", "id": "busy", "input": ahead}))
        .await;
    // The busy job holds the one thread before the other is submitted.
    a.wait_inflight(&key_of("default", &ahead), "running").await;
    let input = json!({"sleep_ms": 3000, "behind": 1});
    let key = key_of("default", &input);
    on_a.send(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    a.wait_inflight(&key, "queued").await;
    // Claimed by A (a key shows "queued" while its broker asks Redis too).
    wait_redis(redis.port, &format!("herd:claim:{{{key}}}:0:"), |v| {
        !v.is_empty()
    })
    .await;
    let mut on_b = b.client().await;
    on_b.send(json!({"op": "submit", "id": "b", "input": input}))
        .await;
    b.wait_inflight_row(&key, |row| row["broker"] == "a").await;
    let from_a = loop {
        let r = on_a.recv_type("result").await;
        if r["id"] == "a" {
            break r;
        }
    };
    assert!(from_a["output"].is_object(), "{from_a}");
    let from_b = on_b.recv_type("result").await;
    assert_eq!(from_b["output"], from_a["output"], "{from_b}");
    a.stop().await;
    b.stop().await;
}

/// A TCP relay to Redis that delays everything Redis sends by `delay`.
struct Far {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Far {
    async fn start(redis_port: u16, delay: Duration) -> Far {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                // Each chunk Redis sends goes on `delay` after it came,
                // in order.
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_rx.read(&mut buf).await {
                        if n == 0
                            || tx
                                .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                                .is_err()
                        {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((at, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(at + delay).await;
                        if client_tx.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Far { port, task }
    }
}

impl Drop for Far {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_s_notice_never_answers_the_next_job() {
    // Redis is 50 ms away and failures are not kept: a failing key
    // submitted again as soon as its error arrives is evaluated again,
    // every time, and never answered by the last failure's notice.
    let redis = Redis::start().await;
    let far = Far::start(redis.port, Duration::from_millis(50)).await;
    let toml = redis
        .config("a", SIMULATE)
        .replace(&redis.url(), &format!("redis://127.0.0.1:{}/", far.port))
        .replace("redis_timeout_ms = 500", "redis_timeout_ms = 600");
    let a = broker_with(&toml).await;
    let mut on_a = a.client().await;
    let submit = json!({"op": "submit", "input": {"sleep_ms": 1, "fail": "again"}});
    let mut answers = Vec::new();
    for _ in 0..8 {
        on_a.send(submit.clone()).await;
        let r = on_a.recv_type("result").await;
        assert_eq!(r["error"]["code"], "eval_failed", "{r}");
        answers.push(r["source"].clone());
    }
    assert!(
        answers.iter().all(|s| s == "eval"),
        "some resubmits were answered by an earlier failure's notice: {answers:?}"
    );
    assert_eq!(a.settled_stats().await["evaluations"], 8);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_invalidated_across_brokers_is_delivered_to_all_its_waiters_once() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 1500, "invalidated": "under way"});
    let key = key_of("default", &input);
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    a.wait_inflight(&key, "running").await;
    let mut on_b = b.client().await;
    on_b.send(json!({"op": "submit", "id": "b", "input": input}))
        .await;
    b.wait_inflight_row(&key, |row| row["broker"] == "a").await;
    let mut admin = b.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": "i", "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    let (from_a, from_b) = (
        on_a.recv_type("result").await,
        on_b.recv_type("result").await,
    );
    assert!(from_a["output"].is_object(), "{from_a}");
    assert_eq!(from_a["output"], from_b["output"]);
    assert_eq!(evaluations(&[&a, &b]).await, 1, "the key ran twice");
    // Delivered, not kept.
    assert!(stored(&redis, &key).is_null());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_just_started_serves_what_redis_holds() {
    let redis = Redis::start().await;
    let a = broker(&redis, "a").await;
    let input = json!({"sleep_ms": 5, "early": "bird"});
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "input": input})).await;
    let computed = on_a.recv_type("result").await;
    // A broker process submitted to the moment it listens, before it has
    // spoken with Redis.
    let dir = tempfile::tempdir().unwrap();
    let (_c, addr) = serve_child(&dir, &redis.config("c", SIMULATE));
    let mut on_c = Client::connect(&format!("ws://{addr}/ws")).await;
    on_c.send(json!({"op": "submit", "input": input})).await;
    let r = on_c.recv_type("result").await;
    assert_eq!(r["source"], "cluster", "{r}");
    assert_eq!(r["output"], computed["output"]);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_after_redis_restarts_an_invalidation_is_recorded() {
    let mut redis = Redis::start().await;
    let a = broker(&redis, "a").await;
    redis.stop();
    // The broker's subscription sees Redis go (nothing else is said to
    // Redis meanwhile), then comes back.
    a.wait_metric("herd_cluster_pubsub_up", |v| v == 0.0).await;
    redis.restart().await;
    a.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    // Once the broker says Redis is back, its commands are answered.
    a.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    let mut admin = a.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": 1, "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    a.stop().await;
}

/// Waits until the sample `name` in a `herd serve` child's `/metrics`
/// satisfies `done`.
async fn wait_child_metric(addr: std::net::SocketAddr, name: &str, done: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = common::http_get(addr, "/metrics").await;
        if common::metric_in(&body, name).is_some_and(&done) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached the expected value:\n{body}"
        );
        tokio::task::yield_now().await;
    }
}

/// Submits `input` on a fresh `herd serve` child of this cluster and
/// returns the answer.
async fn submit_on(addr: &str, input: &Value) -> Value {
    let mut client = Client::connect(&format!("ws://{addr}/ws")).await;
    client.send(json!({"op": "submit", "input": input})).await;
    client.recv_type("result").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_after_an_invalidation_serves_nothing_from_before_it() {
    let redis = Redis::start().await;
    let a = broker(&redis, "a").await;
    let input = json!({"sleep_ms": 5, "before": "invalidation"});
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "input": input})).await;
    on_a.recv_type("result").await;
    let r = on_a
        .request(json!({"op": "invalidate", "id": 1, "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    // C starts after the invalidation: the result from before it is still
    // in Redis (under the old epoch), and C does not serve it.
    let dir = tempfile::tempdir().unwrap();
    let (mut c, addr) = serve_child(&dir, &redis.config("c", SIMULATE));
    let r = submit_on(&addr, &input).await;
    assert_eq!(r["source"], "eval", "{r}");
    // Killed and started again, it still does not.
    let input = json!({"sleep_ms": 5, "before": "second invalidation"});
    on_a.send(json!({"op": "submit", "input": input})).await;
    on_a.recv_type("result").await;
    let r = on_a
        .request(json!({"op": "invalidate", "id": 2, "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    c.kill().unwrap();
    c.wait().unwrap();
    let (_c, addr) = serve_child(&dir, &redis.config("c", SIMULATE));
    let r = submit_on(&addr, &input).await;
    assert_eq!(r["source"], "eval", "{r}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_older_than_an_invalidation_redis_forgot_is_not_stored() {
    // A (a `herd serve` child) evaluates a key on its worker. While A is
    // paused its subscription is killed, so A never hears that B then
    // invalidates the key; and Redis restarts empty, forgetting the
    // invalidation. A's result, begun before it, is still not stored or
    // kept: its waiter has it, and the key is evaluated again after.
    let mut redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = serve_child(&dir, &redis.config("a", EMBED));
    let b = broker_with(&redis.config("b", EMBED)).await;
    let ws = format!("ws://{addr}/ws");
    let mut worker_a = Client::connect(&ws).await;
    let r = worker_a
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 4}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    let input = json!({"forgotten": "invalidation"});
    let key = key_of("embed", &input);
    let submit = json!({"op": "submit", "fn": "embed", "input": input});
    let mut on_a = Client::connect(&ws).await;
    on_a.send(submit.clone()).await;
    let task = worker_a.recv_type("task").await;
    signal(a.id(), "-STOP");
    let killed = redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim().parse::<u32>().unwrap() >= 2, "{killed}");
    let mut admin = b.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": "i", "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    redis.stop();
    redis.restart().await;
    signal(a.id(), "-CONT");
    // A finds Redis lost its data, and is back.
    let a_addr: std::net::SocketAddr = addr.parse().unwrap();
    wait_child_metric(a_addr, "herd_cluster_redis_resets_total", |v| v == 1.0).await;
    wait_child_metric(a_addr, "herd_cluster_up", |v| v == 1.0).await;
    worker_a
        .send(json!({"op": "complete", "task": task["task"], "output": {"by": "before"}}))
        .await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["output"]["by"], "before", "{r}");
    // Asked again (after A's outcome went to Redis: commands for one key
    // run in order), A evaluates it again.
    on_a.send(submit.clone()).await;
    let task = worker_a.recv_type("task").await;
    worker_a
        .send(json!({"op": "complete", "task": task["task"], "output": {"by": "after"}}))
        .await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["output"]["by"], "after", "{r}");
    // Delivered at once; stored in Redis alongside.
    let name = format!("herd:result:{{{key}}}:0:");
    wait_redis(redis.port, &name, |v| v.contains("\"by\":\"after\"")).await;
    // B is given that one, stored (B has no worker of its own), once B
    // too is back on the restarted Redis (until then it would evaluate
    // alone).
    b.wait_metric("herd_cluster_redis_resets_total", |v| v == 1.0)
        .await;
    b.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    let mut on_b = b.client().await;
    on_b.send(submit).await;
    let r = on_b.recv_type("result").await;
    assert_eq!(r["output"]["by"], "after", "{r}");
    assert_eq!(stored(&redis, &key)["by"], "after");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_key_is_not_served_from_a_result_of_another_version() {
    // A rolling upgrade: A runs version 2 of the fn, B still version 1.
    // B invalidates a key A has a result for; that result (stored under
    // version 2's name, which B does not know) is served by nobody after.
    let redis = Redis::start().await;
    let a = broker_with(&redis.config(
        "a",
        &SIMULATE.replace("threads", "version = \"2\"\nthreads"),
    ))
    .await;
    let b = broker(&redis, "b").await;
    let input = json!({"sleep_ms": 5, "versions": "rolling"});
    let key = key_of("default", &input);
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "input": input})).await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["source"], "eval", "{r}");
    let name = format!("herd:result:{{{key}}}:0:2");
    wait_redis(redis.port, &name, |v| v.contains("output")).await;
    let mut admin = b.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": "i", "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    on_a.send(json!({"op": "submit", "input": input})).await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["source"], "eval", "{r}");
    // And the new result replaces the one passed over in Redis.
    let marker: u64 = redis_cli(redis.port, &["GET", &format!("herd:dropped:{{{key}}}")])
        .trim()
        .parse()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = redis_cli(redis.port, &["GET", &name]);
        let stored: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        if stored["began_ms"].as_u64().is_some_and(|b| b > marker) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {text}");
        tokio::task::yield_now().await;
    }
    a.stop().await;
    b.stop().await;
}

/// Waits until the in-flight row of `key` on the broker at `ws` satisfies
/// `done`.
async fn wait_row_on(ws: &str, key: &str, done: impl Fn(&Value) -> bool) {
    let mut c = Client::connect(ws).await;
    c.send(json!({"op": "watch", "interval_ms": 100})).await;
    loop {
        let snap = c.recv_type("snapshot").await;
        let inflight = snap["inflight"].as_array().cloned().unwrap_or_default();
        if inflight.iter().any(|e| e["key"] == key && done(e)) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_after_an_invalidation_is_not_given_what_the_claim_it_joined_stored_before() {
    // A (a `herd serve` child) waits on B's evaluation of a key. A is
    // paused and its subscription killed, so it misses B's result (stored)
    // and then the invalidation of the fn. A second session's submit, sent
    // meanwhile, is taken when A resumes and joins the wait: it is not
    // given that result (from before the invalidation, answered before it
    // came) when A finds it in Redis; the first session is.
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = serve_child(&dir, &redis.config("a", EMBED));
    let b = broker_with(&redis.config("b", EMBED)).await;
    let ws = format!("ws://{addr}/ws");
    let mut worker_a = Client::connect(&ws).await;
    let r = worker_a
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 4}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    let mut worker_b = worker(&b).await;
    let input = json!({"joined": "before the invalidation"});
    let key = key_of("embed", &input);
    let submit = json!({"op": "submit", "fn": "embed", "input": input});
    let mut on_b = b.client().await;
    on_b.send(submit.clone()).await;
    let task = worker_b.recv_type("task").await;
    let mut first = Client::connect(&ws).await;
    first.send(submit.clone()).await;
    wait_row_on(&ws, &key, |row| row["broker"] == "b").await;
    let mut second = Client::connect(&ws).await;
    signal(a.id(), "-STOP");
    let killed = redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim().parse::<u32>().unwrap() >= 2, "{killed}");
    worker_b
        .send(json!({"op": "complete", "task": task["task"], "output": {"by": "before"}}))
        .await;
    assert_eq!(on_b.recv_type("result").await["output"]["by"], "before");
    let mut admin = b.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": "i", "fn": "embed"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    second.send(submit).await;
    signal(a.id(), "-CONT");
    let r = first.recv_type("result").await;
    assert_eq!(r["output"]["by"], "before", "{r}");
    let task = worker_a.recv_type("task").await;
    worker_a
        .send(json!({"op": "complete", "task": task["task"], "output": {"by": "after"}}))
        .await;
    let r = second.recv_type("result").await;
    assert_eq!(r["output"]["by"], "after", "{r}");
    b.stop().await;
}
