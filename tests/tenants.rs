//! Namespaces, fn allow-lists and quotas, over real sockets: two teams on
//! one broker never see each other's results and cannot starve each other.

mod common;

use common::{config, key_of, Client, TestServer, AGENTS, BASIC, FRAME_WAIT};
use serde_json::{json, Value};

/// Besides [`AGENTS`], viewers of team-a and of every namespace, and an
/// agent of team-a that may submit only `echo`.
const TEAMS: &str = r#"
[[token]]
name = "a-viewer"
role = "viewer"
secret = "team-a-viewer"
namespace = "team-a"
[[token]]
name = "ops"
role = "viewer"
secret = "ops-secret"
namespace = "*"
[[token]]
name = "echo-only"
role = "agent"
secret = "echo-only-secret"
namespace = "team-a"
fns = ["echo"]
"#;

async fn connect(server: &TestServer, token: &str) -> Client {
    server.client_as(token).await
}

/// Submits and returns the request's last answer.
async fn submit(c: &mut Client, id: &str, request: Value) -> Value {
    let mut op = request;
    op["op"] = json!("submit");
    op["id"] = json!(id);
    c.send(op).await;
    loop {
        let f = c.recv().await;
        if f["id"] == id && f["type"] != "accepted" {
            return f;
        }
    }
}

/// The next frame after everything the broker had queued for `c`: a ping
/// is answered after every frame already pushed to the session.
async fn next_is_pong(c: &mut Client, id: u64) {
    let r = c.request(json!({"op": "ping", "id": id})).await;
    assert_eq!(r["type"], "pong", "nothing else was queued: {r}");
}

#[tokio::test]
async fn two_namespaces_evaluate_apart_and_never_see_each_other() {
    // The slow evaluations are not waited for at the end.
    let toml = format!("[limits]\ndrain_timeout_s = 1\n{BASIC}{AGENTS}{TEAMS}");
    let server = TestServer::start(config(&toml)).await;
    let mut a = connect(&server, "team-a-secret").await;
    let mut b = connect(&server, "team-b-secret").await;
    assert_eq!(a.hello["namespace"], "team-a", "{}", a.hello);
    assert_eq!(b.hello["namespace"], "team-b");

    // B waits on a key before anyone submits it; A then evaluates it.
    let input = json!({"report": "q3"});
    let key = key_of("default", &input);
    let r = b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(r["state"], "unknown", "{r}");
    let r = submit(&mut a, "1", json!({"input": input})).await;
    assert_eq!(
        (r["source"].as_str(), r["key"].as_str()),
        (Some("eval"), Some(key.as_str()))
    );
    // A's result reached A's waiters at once; none was queued for B.
    next_is_pong(&mut b, 2).await;
    let r = b.request(json!({"op": "get", "id": 3, "key": key})).await;
    assert_eq!(r["state"], "unknown", "A's result is not B's: {r}");
    let r = submit(&mut a, "4", json!({"input": input})).await;
    assert_eq!(r["source"], "cache", "A's own result is cached for A: {r}");

    // B's submit of the same input is B's own evaluation, and reaches B's subscriber too.
    let r = submit(&mut b, "5", json!({"input": input})).await;
    assert_eq!(r["source"], "eval", "{r}");
    assert_eq!(r["key"], key, "the key does not depend on the namespace");
    assert_eq!(r["shared"], 2, "B's submit and B's subscription: {r}");
    let evaluations = server
        .metric("herd_evaluations_total{fn=\"default\"}")
        .await;
    assert_eq!(evaluations, Some(2.0));

    // Cancel acts in the session's namespace only: B cancelling a key A
    // waits on leaves A's wait in place.
    let slow = json!({"sleep_ms": 60_000, "slow": true});
    let slow_key = key_of("default", &slow);
    a.send(json!({"op": "submit", "id": "slow", "input": slow}))
        .await;
    assert_eq!(a.recv_type("accepted").await["first"], true);
    let r = b
        .request(json!({"op": "cancel", "id": 6, "key": slow_key}))
        .await;
    assert_eq!(r["type"], "cancelled");
    let r = a
        .request(json!({"op": "get", "id": 7, "key": slow_key}))
        .await;
    assert_eq!(r["waiters"], 1, "A still waits: {r}");

    // Snapshots: a namespace's viewer sees its own rows; "*" sees all, by name.
    let mut b_slow = json!({"sleep_ms": 60_000, "team": "b"});
    b.send(json!({"op": "submit", "id": "bslow", "input": b_slow.take()}))
        .await;
    b.recv_type("accepted").await;
    let mut viewer = connect(&server, "team-a-viewer").await;
    let mut ops = connect(&server, "ops-secret").await;
    assert_eq!(ops.hello["namespace"], "*");
    let rows = |snap: &Value| -> Vec<(String, String)> {
        snap["inflight"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["ns"].as_str().unwrap().to_string(),
                    r["key"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    viewer
        .send(json!({"op": "watch", "interval_ms": 100}))
        .await;
    ops.send(json!({"op": "watch", "interval_ms": 100})).await;
    let all = loop {
        let snap = ops.recv_type("snapshot").await;
        if rows(&snap).len() == 2 {
            break rows(&snap);
        }
    };
    assert!(
        all.contains(&("team-a".into(), slow_key.clone())),
        "{all:?}"
    );
    assert!(all.iter().any(|(ns, _)| ns == "team-b"), "{all:?}");
    let snap = viewer.recv_type("snapshot").await;
    assert_eq!(rows(&snap), vec![("team-a".to_string(), slow_key)]);
    let recent = snap["recent"].as_array().unwrap();
    assert!(
        !recent.is_empty() && recent.iter().all(|r| r["ns"] == "team-a"),
        "{recent:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_agent_may_submit_only_the_fns_its_token_lists() {
    let server = TestServer::start(config(&format!("{BASIC}{AGENTS}{TEAMS}"))).await;
    let mut c = connect(&server, "echo-only-secret").await;
    let r = c
        .request(json!({"op": "submit", "id": 1, "fn": "default", "input": 1}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = submit(&mut c, "2", json!({"fn": "echo", "input": 1})).await;
    assert_eq!(r["output"], 1, "{r}");
    server.stop().await;
}

const QUOTAS: &str = r#"
[[token]]
name = "limited"
role = "agent"
secret = "limited-secret"
namespace = "limited"
[[token]]
name = "free"
role = "agent"
secret = "free-secret"
namespace = "free"
[[token]]
name = "small"
role = "agent"
secret = "small-secret"
namespace = "small"
[[namespace]]
name = "limited"
max_sessions = 1
submits_per_s = 1
burst = 2
[[namespace]]
name = "small"
max_pending = 2
"#;

#[tokio::test]
async fn namespace_quotas_refuse_at_their_bounds_and_spare_other_namespaces() {
    let server = TestServer::start(config(&format!("{BASIC}{QUOTAS}"))).await;
    let mut limited = connect(&server, "limited-secret").await;
    let mut free = connect(&server, "free-secret").await;

    // max_sessions: a second session of the namespace is refused with 429.
    let url = format!("{}?token=limited-secret", server.url());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429)
        }
        other => panic!("expected HTTP 429, got {other:?}"),
    }
    assert_eq!(
        server
            .metric("herd_namespace_refused_sessions_total{ns=\"limited\"}")
            .await,
        Some(1.0)
    );

    // submits_per_s = 1, burst = 2: the third submit at once is refused.
    for n in 0..2 {
        let r = submit(
            &mut limited,
            &n.to_string(),
            json!({"fn": "echo", "input": n}),
        )
        .await;
        assert_eq!(r["output"], n, "{r}");
    }
    let r = limited
        .request(json!({"op": "submit", "id": "x", "fn": "echo", "input": 9}))
        .await;
    assert_eq!(r["code"], "rate_limited", "{r}");
    let retry = r["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 0 && retry <= 1000, "{r}");
    // Another namespace is served meanwhile.
    for n in 0..20 {
        let r = submit(
            &mut free,
            &format!("f{n}"),
            json!({"fn": "echo", "input": n}),
        )
        .await;
        assert_eq!(r["output"], n, "{r}");
    }

    // max_pending = 2 across the namespace's sessions.
    let mut s1 = connect(&server, "small-secret").await;
    let mut s2 = connect(&server, "small-secret").await;
    let subscribe = |n: u32| json!({"op": "subscribe", "id": n, "key": format!("{n:032x}")});
    assert_eq!(s1.request(subscribe(1)).await["type"], "subscribed");
    assert_eq!(s2.request(subscribe(2)).await["type"], "subscribed");
    let r = s2.request(subscribe(3)).await;
    assert_eq!(r["code"], "busy", "{r}");
    assert!(r["message"].as_str().unwrap().contains("namespace"), "{r}");
    let r = free.request(subscribe(4)).await;
    assert_eq!(
        r["type"], "subscribed",
        "another namespace is not bound: {r}"
    );
    // A wait given back makes room again.
    s1.request(json!({"op": "cancel", "id": 5, "key": format!("{:032x}", 1)}))
        .await;
    assert_eq!(s2.request(subscribe(6)).await["type"], "subscribed");

    let metrics = server.http_get("/metrics").await.1;
    assert!(
        metrics.contains("herd_namespace_rate_limited_total{ns=\"limited\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herd_namespace_sessions{ns=\"small\"} 2"));
    assert!(
        metrics.contains("herd_busy_total{reason=\"namespace_max_pending\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herd_cluster_configured 0"), "{metrics}");
    drop(limited);
    server.stop().await;
}

/// Submits one echo of about 400 bytes per number in `range`, all at once,
/// and reads every result.
async fn flood(c: &mut Client, range: std::ops::Range<u32>) {
    let filler = "x".repeat(400);
    let count = range.len();
    for n in range {
        c.send(json!({"op": "submit", "id": n, "fn": "echo", "input": [n, filler]}))
            .await;
    }
    let mut results = 0;
    while results < count {
        let f = tokio::time::timeout(FRAME_WAIT, c.recv()).await.unwrap();
        if f["type"] == "result" {
            results += 1;
        }
    }
}

#[tokio::test]
async fn a_namespace_with_its_own_cache_bytes_keeps_its_results_through_a_flood() {
    let toml = format!(
        "{BASIC}[cache]\nmax_bytes = 100000\n[[token]]\nname = \"kept\"\nrole = \"agent\"\nsecret = \"kept-secret\"\nnamespace = \"kept\"\n[[token]]\nname = \"crowd\"\nrole = \"agent\"\nsecret = \"crowd-secret\"\n[[namespace]]\nname = \"kept\"\ncache_bytes = 100000\n"
    );
    let server = TestServer::start(config(&toml)).await;
    // The shared store is full before the kept namespace's result comes.
    let mut crowd = connect(&server, "crowd-secret").await;
    flood(&mut crowd, 0..2500).await;
    let mut kept = connect(&server, "kept-secret").await;
    let r = submit(
        &mut kept,
        "1",
        json!({"fn": "echo", "input": ["precious", "x".repeat(400)]}),
    )
    .await;
    assert_eq!(r["source"], "eval");

    // The shared namespace writes many times its cache's bound.
    let mut crowd = connect(&server, "crowd-secret").await;
    flood(&mut crowd, 2500..5000).await;
    let r = submit(
        &mut kept,
        "2",
        json!({"fn": "echo", "input": ["precious", "x".repeat(400)]}),
    )
    .await;
    assert_eq!(r["source"], "cache", "kept in its own store: {r}");
    server.stop().await;
}

#[tokio::test]
async fn a_worker_of_namespace_star_serves_every_namespace_and_its_tasks_name_theirs() {
    let toml = format!(
        "{BASIC}{AGENTS}{TEAMS}[[token]]\nname = \"w\"\nrole = \"worker\"\nsecret = \"worker-secret\"\nnamespace = \"*\"\n[[evaluator]]\nfn = \"remote\"\nkind = \"remote\"\n"
    );
    let server = TestServer::start(config(&toml)).await;
    let mut worker = connect(&server, "worker-secret").await;
    let r = worker
        .request(json!({"op": "serve", "id": 1, "fn": "remote", "concurrency": 4}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    for (token, ns) in [("team-a-secret", "team-a"), ("team-b-secret", "team-b")] {
        let mut agent = connect(&server, token).await;
        agent
            .send(json!({"op": "submit", "id": 1, "fn": "remote", "input": {"same": true}}))
            .await;
        let task = worker.recv_type("task").await;
        assert_eq!(task["ns"], ns, "{task}");
        worker
            .send(json!({"op": "complete", "task": task["task"], "output": ns}))
            .await;
        let r = agent.recv_type("result").await;
        assert_eq!(r["output"], ns, "{r}");
    }
    server.stop().await;
}

/// Besides [`AGENTS`], a remote fn and workers of team-a and of every
/// namespace.
const WORKERS: &str = r#"
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 10000
[[token]]
name = "worker-a"
role = "worker"
secret = "worker-a-secret"
namespace = "team-a"
[[token]]
name = "worker-all"
role = "worker"
secret = "worker-all-secret"
namespace = "*"
"#;

/// Serves `embed` on a worker session and waits for `serving`.
async fn serving(server: &TestServer, token: &str) -> Client {
    let mut w = connect(server, token).await;
    let r = w
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 4}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    w
}

/// Completes `task` with an output naming the worker.
async fn complete(w: &mut Client, task: &Value, worker: &str) {
    w.send(json!({"op": "complete", "task": task["task"], "output": {"by": worker}}))
        .await;
}

#[tokio::test]
async fn a_namespaced_worker_is_given_only_its_namespaces_tasks() {
    let server = TestServer::start(config(&format!("{AGENTS}{WORKERS}"))).await;
    let mut worker_a = serving(&server, "worker-a-secret").await;
    let mut a = connect(&server, "team-a-secret").await;
    let mut b = connect(&server, "team-b-secret").await;

    // team-b's private input is submitted first, while only worker-a serves.
    b.send(json!({"op": "submit", "id": "b1", "fn": "embed", "input": {"private": "of team-b"}}))
        .await;
    assert_eq!(b.recv_type("accepted").await["id"], "b1");
    a.send(json!({"op": "submit", "id": "a1", "fn": "embed", "input": {"x": 1}}))
        .await;
    assert_eq!(a.recv_type("accepted").await["id"], "a1");

    let task = worker_a.recv_type("task").await;
    assert_eq!(
        task["ns"], "team-a",
        "worker-a got another team's task: {task}"
    );
    assert_eq!(task["input"], json!({"x": 1}));
    complete(&mut worker_a, &task, "worker-a").await;
    let result = a.recv_type("result").await;
    assert_eq!(result["output"], json!({"by": "worker-a"}));

    // A worker of every namespace takes team-b's task; worker-a never saw it.
    let mut worker_all = serving(&server, "worker-all-secret").await;
    let task = worker_all.recv_type("task").await;
    assert_eq!(task["ns"], "team-b", "{task}");
    assert_eq!(task["input"], json!({"private": "of team-b"}));
    complete(&mut worker_all, &task, "worker-all").await;
    let result = b.recv_type("result").await;
    assert_eq!(result["output"], json!({"by": "worker-all"}));
    next_is_pong(&mut worker_a, 1).await;

    // worker-a's complete of a task it does not hold changes nothing.
    let r = worker_a
        .request(json!({"op": "complete", "id": "c", "task": task["task"], "output": {"by": "worker-a"}}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    server.stop().await;
}

#[tokio::test]
async fn a_namespace_with_its_own_cache_bytes_keeps_its_failures_through_a_flood_of_failures() {
    let toml = format!(
        "{BASIC}[cache]\nmax_bytes = 100000\nerror_ttl_s = 600\n[[token]]\nname = \"kept\"\nrole = \"agent\"\nsecret = \"kept-secret\"\nnamespace = \"kept\"\n[[token]]\nname = \"crowd\"\nrole = \"agent\"\nsecret = \"crowd-secret\"\n[[namespace]]\nname = \"kept\"\ncache_bytes = 100000\n"
    );
    let server = TestServer::start(config(&toml)).await;
    let failing = |n: u32| json!({"sleep_ms": 0, "fail": format!("{n} {}", "x".repeat(400))});
    // The shared failure store is full before the kept namespace's failure comes.
    let mut crowd = connect(&server, "crowd-secret").await;
    fail_many(&mut crowd, 1..300, failing).await;
    let mut kept = connect(&server, "kept-secret").await;
    let r = submit(&mut kept, "1", json!({"input": failing(0)})).await;
    assert_eq!(r["error"]["code"], "eval_failed", "{r}");
    assert_eq!(r["source"], "eval");

    // The shared namespace's failures come to many times its store's bound.
    fail_many(&mut crowd, 300..600, failing).await;
    let r = submit(&mut crowd, "again", json!({"input": failing(300)})).await;
    assert_eq!(r["source"], "eval", "the shared failure store churned: {r}");
    let r = submit(&mut kept, "2", json!({"input": failing(0)})).await;
    assert_eq!(
        r["source"], "cache",
        "kept in its own namespace's budget: {r}"
    );
    assert_eq!(r["error"]["code"], "eval_failed");
    server.stop().await;
}

/// Submits the failing input of every number in `range`, all at once, and
/// reads every result.
async fn fail_many(c: &mut Client, range: std::ops::Range<u32>, failing: impl Fn(u32) -> Value) {
    let count = range.len();
    for n in range {
        c.send(json!({"op": "submit", "id": n, "input": failing(n)}))
            .await;
    }
    let mut results = 0;
    while results < count {
        let f = tokio::time::timeout(FRAME_WAIT, c.recv()).await.unwrap();
        if f["type"] == "result" {
            assert_eq!(f["error"]["code"], "eval_failed", "{f}");
            results += 1;
        }
    }
}
