//! Several brokers over one real redis-server, started and stopped by the
//! tests on a free port.

mod common;

use common::cluster::{
    broker, broker_with, evaluations, redis_cli, serve_child, serve_logging, signal, wait_redis,
    Broker, Redis, SIMULATE,
};
use common::{key_of, Client, TestServer};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A three-master Redis Cluster of the test's own.
struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                ])
                .args(["--cluster-config-file", "nodes.conf", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            nodes.push(Redis {
                child: Some(child),
                port,
                dir,
            });
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let deadline = std::time::Instant::now() + common::FRAME_WAIT;
        // redis-cli --cluster create retries nothing: wait until every node answers.
        for node in &nodes {
            while !redis_cli(node.port, &["ping"]).contains("PONG") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a cluster node did not start"
                );
            }
        }
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = redis_cli(nodes[0].port, &create);
        assert!(out.contains("[OK]"), "{out}");
        for node in &nodes {
            while !redis_cli(node.port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not form"
                );
            }
        }
        RedisCluster { nodes }
    }

    fn config(&self, node: &str, extra: &str) -> String {
        format!("{}redis_cluster = true\n", self.nodes[0].config(node, "")) + extra
    }
}

/// The name of a result of fn version `version` in Redis (epoch 0).
fn result_name(key: &str, version: &str) -> String {
    format!("herd:result:{{{key}}}:0:{version}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_on_one_broker_holds_on_every_broker() {
    // A and B both hold a key's result (B in its own cache). Once A says
    // `invalidated`, B evaluates the key again and never serves its copy;
    // then the same for a whole fn.
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let input = json!({"sleep_ms": 5, "cluster": "invalidate"});
    let key = key_of("default", &input);
    let submit = |id: &str| json!({"op": "submit", "id": id, "input": input});
    assert_eq!(answer(&mut on_a, submit("a1")).await["source"], "eval");
    let r = answer(&mut on_b, submit("b1")).await;
    assert_eq!(r["source"], "cluster", "{r}");
    assert!(
        r["age_ms"].is_u64(),
        "a result from Redis says its age: {r}"
    );
    let r = answer(&mut on_b, submit("b2")).await;
    assert_eq!(r["source"], "cache", "B keeps its own copy: {r}");

    let r = on_a
        .request(json!({"op": "invalidate", "id": "k", "key": key}))
        .await;
    assert_eq!(r, json!({"type": "invalidated", "id": "k", "key": key}));
    assert_eq!(
        redis_cli(redis.port, &["EXISTS", &result_name(&key, "")]).trim(),
        "0"
    );
    let r = answer(&mut on_b, submit("b3")).await;
    assert_eq!(r["source"], "eval", "B's copy is not served: {r}");
    assert_eq!(evaluations(&[&a, &b]).await, 2);

    let r = answer(&mut on_a, submit("a2")).await;
    assert_eq!(r["source"], "cluster", "B's new result reached Redis: {r}");
    let r = on_b
        .request(json!({"op": "invalidate", "id": "f", "fn": "default"}))
        .await;
    assert_eq!(
        r,
        json!({"type": "invalidated", "id": "f", "fn": "default"})
    );
    let r = answer(&mut on_a, submit("a3")).await;
    assert_eq!(r["source"], "eval", "A drops the whole fn: {r}");
    let r = answer(&mut on_b, submit("b4")).await;
    assert_eq!(
        r["source"], "cluster",
        "and stores a result under the new epoch: {r}"
    );
    assert_eq!(evaluations(&[&a, &b]).await, 3);
    a.stop().await;
    b.stop().await;
}

/// Two teams' tokens (agents) and an admin of team A's.
const TEAMS: &str = r#"
[[token]]
name = "a"
role = "agent"
secret = "team-a"
namespace = "team-a"
[[token]]
name = "a-admin"
role = "admin"
secret = "team-a-admin"
namespace = "team-a"
[[token]]
name = "b"
role = "agent"
secret = "team-b"
namespace = "team-b"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_namespaces_apart_in_redis_and_between_brokers() {
    let redis = Redis::start().await;
    let a = broker_with(&redis.config("a", &format!("{SIMULATE}{TEAMS}"))).await;
    let b = broker_with(&redis.config("b", &format!("{SIMULATE}{TEAMS}"))).await;
    let on = |server: &TestServer, token: &str| {
        let url = format!("{}?token={token}", server.url());
        async move { Client::connect(&url).await }
    };
    let (mut a_on_a, mut a_on_b) = (on(&a, "team-a").await, on(&b, "team-a").await);
    let mut b_on_b = on(&b, "team-b").await;
    let input = json!({"sleep_ms": 5, "cluster": "namespaces"});
    let key = key_of("default", &input);
    let submit = |id: &str| json!({"op": "submit", "id": id, "input": input});

    // Within a namespace the cluster shares; across namespaces it does not.
    assert_eq!(answer(&mut a_on_a, submit("1")).await["source"], "eval");
    let r = answer(&mut a_on_b, submit("2")).await;
    assert_eq!(r["source"], "cluster", "team A's result, from Redis: {r}");
    let r = answer(&mut b_on_b, submit("3")).await;
    assert_eq!(r["source"], "eval", "team B evaluates its own: {r}");
    for team in ["team-a", "team-b"] {
        let name = format!("herd:{team}/result:{{{key}}}:0:");
        assert_eq!(
            redis_cli(redis.port, &["EXISTS", &name]).trim(),
            "1",
            "{name}"
        );
    }
    assert_eq!(
        redis_cli(redis.port, &["EXISTS", &result_name(&key, "")]).trim(),
        "0",
        "nothing in the shared namespace"
    );

    // Subscribers of both teams on B; team A's result made on A reaches
    // team A's only (once it has, a leak to team B would be queued before
    // B's pong).
    let fresh = json!({"sleep_ms": 5, "cluster": "namespaces", "n": 2});
    let fresh_key = key_of("default", &fresh);
    for c in [&mut b_on_b, &mut a_on_b] {
        let r = c
            .request(json!({"op": "subscribe", "id": "s", "key": fresh_key}))
            .await;
        assert_eq!(r["state"], "unknown");
    }
    let r = answer(
        &mut a_on_a,
        json!({"op": "submit", "id": "4", "input": fresh}),
    )
    .await;
    assert_eq!(r["source"], "eval");
    let r = a_on_b.recv_type("result").await;
    assert_eq!(r["id"], "s", "team A sees its own on B: {r}");
    let r = b_on_b.request(json!({"op": "ping", "id": 5})).await;
    assert_eq!(r["type"], "pong", "nothing reached team B: {r}");
    let r = b_on_b
        .request(json!({"op": "get", "id": 6, "key": fresh_key}))
        .await;
    assert_eq!(r["state"], "unknown", "{r}");

    // Invalidating team A's fn leaves team B's results standing.
    let mut admin = on(&a, "team-a-admin").await;
    let r = admin
        .request(json!({"op": "invalidate", "id": "f", "fn": "default"}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    let r = answer(&mut a_on_b, submit("7")).await;
    assert_eq!(r["source"], "eval", "team A's results are gone: {r}");
    let r = answer(&mut b_on_b, submit("8")).await;
    assert_ne!(r["source"], "eval", "team B's stand: {r}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_missed_an_invalidation_serves_nothing_from_its_cache() {
    // B's subscription goes silent (a relay passes nothing), so B cannot
    // hear A's invalidation: from a lease after its last confirmed ping B
    // serves no cached result, and A answers `invalidated` only a lease
    // after Redis has it.
    let redis = Redis::start().await;
    let relay = Relay::start(redis.port).await;
    let a = broker(&redis, "a").await;
    let b = broker_with(
        &redis
            .config("b", SIMULATE)
            .replace(&redis.url(), &relay.url()),
    )
    .await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let input = json!({"sleep_ms": 5, "cluster": "missed"});
    let key = key_of("default", &input);
    let submit = |id: &str| json!({"op": "submit", "id": id, "input": input});
    assert_eq!(answer(&mut on_b, submit("b1")).await["source"], "eval");
    // B keeps its result once Redis has stored it.
    b.wait_cached(&key).await;
    assert_eq!(answer(&mut on_b, submit("b2")).await["source"], "cache");
    relay.silence_subscriptions();
    let r = on_a
        .request(json!({"op": "invalidate", "id": 1, "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    let r = answer(&mut on_b, submit("b3")).await;
    assert_eq!(
        r["source"], "eval",
        "B's unconfirmed copy is not served: {r}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_serves_no_result_of_the_old_one_from_redis() {
    let redis = Redis::start().await;
    let v1 = broker_with(&redis.config("v1", &versioned("1"))).await;
    let mut c = v1.client().await;
    let input = json!({"sleep_ms": 5, "cluster": "version"});
    let key = key_of("default", &input);
    let submit = |id: &str| json!({"op": "submit", "id": id, "input": input});
    assert_eq!(answer(&mut c, submit("1")).await["source"], "eval");
    v1.stop().await;
    // A broker of the same version finds it; one of version 2 does not.
    let again = broker_with(&redis.config("again", &versioned("1"))).await;
    let mut c = again.client().await;
    assert_eq!(answer(&mut c, submit("2")).await["source"], "cluster");
    again.stop().await;
    let v2 = broker_with(&redis.config("v2", &versioned("2"))).await;
    let mut c = v2.client().await;
    assert_eq!(answer(&mut c, submit("3")).await["source"], "eval");
    assert!(redis_cli(redis.port, &["GET", &result_name(&key, "1")]).contains("output"));
    // Delivered at once; stored in Redis alongside.
    wait_redis(redis.port, &result_name(&key, "2"), |v| {
        v.contains("output")
    })
    .await;
    v2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_ms_passes_over_an_older_result_in_redis_and_replaces_it() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let input = json!({"sleep_ms": 5, "cluster": "max_age"});
    let key = key_of("default", &input);
    let submit = |id: &str, max_age: u64| json!({"op": "submit", "id": id, "input": input, "max_age_ms": max_age});
    assert_eq!(
        answer(&mut on_a, submit("a", 600_000)).await["source"],
        "eval"
    );
    let stored_at = |text: String| -> u64 {
        let v: Value = serde_json::from_str(text.trim()).expect("a stored result");
        v["at_ms"].as_u64().expect("at_ms")
    };
    // Delivered at once; stored in Redis alongside.
    let name = result_name(&key, "");
    let first = stored_at(wait_redis(redis.port, &name, |v| !v.is_empty()).await);
    let r = answer(&mut on_b, submit("young", 600_000)).await;
    assert_eq!(r["source"], "cluster", "young enough: {r}");
    let r = answer(&mut on_b, submit("fresh", 0)).await;
    assert_eq!(
        r["source"], "eval",
        "Redis's result is older than 0 ms: {r}"
    );
    // The fresh result replaces it.
    wait_redis(redis.port, &name, |v| {
        serde_json::from_str::<Value>(v).is_ok_and(|v| v["at_ms"].as_u64() > Some(first))
    })
    .await;
    assert_eq!(evaluations(&[&a, &b]).await, 2);
    a.stop().await;
    b.stop().await;
}

/// The builtin `default` fn at `version`.
fn versioned(version: &str) -> String {
    format!("[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 8\nversion = \"{version}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_evaluate_each_key_once() {
    let redis = Redis::start().await;
    let brokers = [
        broker(&redis, "a").await,
        broker(&redis, "b").await,
        broker(&redis, "c").await,
    ];
    three_brokers_share_every_key(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_on_a_redis_cluster_evaluate_each_key_once() {
    let redis = RedisCluster::start().await;
    let brokers = [
        broker_with(&redis.config("a", SIMULATE)).await,
        broker_with(&redis.config("b", SIMULATE)).await,
        broker_with(&redis.config("c", SIMULATE)).await,
    ];
    three_brokers_share_every_key(brokers).await;
}

/// Agents spread over three brokers submit the same ten inputs at once:
/// one evaluation per key across the cluster, every waiter answered.
async fn three_brokers_share_every_key(brokers: [TestServer; 3]) {
    let mut agents = Vec::new();
    for a in 0..12 {
        agents.push(brokers[a % 3].client().await);
    }
    // Every agent submits the same ten inputs, all at once.
    for agent in agents.iter_mut() {
        for n in 0..10 {
            agent
                .send(json!({"op": "submit", "id": n, "input": {"sleep_ms": 100, "n": n}}))
                .await;
        }
    }
    for agent in agents.iter_mut() {
        for _ in 0..10 {
            let r = agent.recv_type("result").await;
            assert!(r["output"].is_object(), "{r}");
        }
    }
    let [a, b, c] = &brokers;
    assert_eq!(
        evaluations(&[a, b, c]).await,
        10,
        "one evaluation per key across the cluster"
    );
    for b in brokers {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_broker_gets_a_result_evaluated_on_another() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 20, "across": true});
    let key = key_of("default", &input);
    let mut subscriber = b.client().await;
    let s = subscriber
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(s["state"], "unknown");
    let mut agent = a.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    let evaluated = agent.recv_type("result").await;
    assert_eq!(evaluated["source"], "eval");
    let r = subscriber.recv_type("result").await;
    assert_eq!(r["id"], "s");
    assert_eq!(r["source"], "cluster");
    assert_eq!(r["output"], evaluated["output"]);
    // A later subscriber there finds it in Redis (and then in its own cache).
    let mut late = b.client().await;
    let again = late
        .request(json!({"op": "subscribe", "id": "t", "key": key_of("default", &input)}))
        .await;
    assert_eq!(again["type"], "result", "{again}");
    assert_eq!(evaluations(&[&a, &b]).await, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_serves_earlier_results_from_redis() {
    let redis = Redis::start().await;
    let input = json!({"sleep_ms": 10, "kept": "across restarts"});
    let first = broker(&redis, "a").await;
    let r = first
        .client()
        .await
        .request(json!({"op": "submit", "input": input}))
        .await;
    assert_eq!(r["type"], "accepted");
    first.settled_stats().await;
    first.stop().await;

    let second = broker(&redis, "a2").await;
    let mut c = second.client().await;
    let r = c.request(json!({"op": "submit", "input": input})).await;
    let r = if r["type"] == "accepted" {
        c.recv_type("result").await
    } else {
        r
    };
    assert_eq!(r["source"], "cluster", "{r}");
    assert!(r["output"].is_object());
    assert_eq!(second.settled_stats().await["evaluations"], 0);
    // Now it is in this broker's own cache.
    let cached = c.request(json!({"op": "submit", "input": input})).await;
    assert_eq!(cached["source"], "cache");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_the_claimant_does_not_fail_other_brokers() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 800, "cancelled": "here only"});
    let key = key_of("default", &input);
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "input": input})).await;
    a.wait_inflight(&key, "running").await;
    let mut on_b = b.client().await;
    on_b.send(json!({"op": "submit", "id": "b", "input": input}))
        .await;
    assert_eq!(on_b.recv_type("accepted").await["first"], true);
    let c = on_a.request(json!({"op": "cancel", "key": key})).await;
    let c = if c["type"] == "accepted" {
        on_a.recv_type("cancelled").await
    } else {
        c
    };
    assert_eq!(c["type"], "cancelled");
    let r = on_b.recv_type("result").await;
    assert_eq!(r["id"], "b");
    assert_eq!(r["source"], "cluster");
    assert_eq!(evaluations(&[&a, &b]).await, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_brokers_serve_alone_and_rejoin() {
    let mut redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    redis.stop();
    // Still answering, in local mode.
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "input": {"sleep_ms": 1, "alone": 1}}))
        .await;
    assert!(on_a.recv_type("result").await["output"].is_object());
    a.wait_metric("herd_cluster_up", |v| v == 0.0).await;
    assert_eq!(a.stats().await["cluster"], "degraded");
    assert_eq!(a.http_get("/readyz").await.0, 200);

    redis.restart().await;
    // Once each broker has spoken with Redis again, they coalesce again.
    let mut on_b = b.client().await;
    for (server, client) in [(&a, &mut on_a), (&b, &mut on_b)] {
        client
            .send(json!({"op": "submit", "input": {"sleep_ms": 1, "probe": server.addr.port()}}))
            .await;
        client.recv_type("result").await;
        server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    }
    let before = evaluations(&[&a, &b]).await;
    let input = json!({"sleep_ms": 300, "together": "again"});
    on_a.send(json!({"op": "submit", "input": input})).await;
    a.wait_inflight(&key_of("default", &input), "running").await;
    on_b.send(json!({"op": "submit", "input": input})).await;
    for c in [&mut on_a, &mut on_b] {
        assert!(c.recv_type("result").await["output"].is_object());
    }
    assert_eq!(evaluations(&[&a, &b]).await - before, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_claimant_dies_another_broker_takes_over() {
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut claimant, addr) = serve_child(&dir, &redis.config("doomed", SIMULATE));
    let survivor = broker(&redis, "survivor").await;
    let input = json!({"sleep_ms": 4000, "orphaned": true});
    let key = key_of("default", &input);
    let mut on_claimant = Client::connect(&format!("ws://{addr}/ws")).await;
    on_claimant
        .send(json!({"op": "submit", "input": input}))
        .await;
    assert_eq!(on_claimant.recv_type("accepted").await["first"], true);
    // Wait until the claimant runs it (its own snapshot says so).
    on_claimant
        .send(json!({"op": "watch", "interval_ms": 100}))
        .await;
    loop {
        let snap = on_claimant.recv_type("snapshot").await;
        if snap["inflight"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == key.as_str() && e["state"] == "running")
        {
            break;
        }
    }
    let mut waiter = survivor.client().await;
    waiter
        .send(json!({"op": "submit", "id": "w", "input": input}))
        .await;
    assert_eq!(waiter.recv_type("accepted").await["state"], "queued");
    // The survivor has found the claim and waits on the claimant.
    survivor
        .wait_inflight_row(&key, |row| row["broker"] == "doomed")
        .await;
    claimant.kill().unwrap();
    claimant.wait().unwrap();
    // Within about lease_ms the survivor claims the key and evaluates it.
    let r = waiter.recv_type("result").await;
    assert_eq!(r["id"], "w");
    assert_eq!(r["source"], "eval", "{r}");
    assert_eq!(survivor.settled_stats().await["evaluations"], 1);
    survivor
        .wait_metric("herd_cluster_takeovers_total", |v| v == 1.0)
        .await;

    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_benchmark_spreads_over_a_cluster_and_sums_its_figures() {
    let redis = Redis::start().await;
    let brokers = [
        broker(&redis, "a").await,
        broker(&redis, "b").await,
        broker(&redis, "c").await,
    ];
    let mut args: Vec<String> = vec!["bench".into(), "--json".into(), "/dev/stdout".into()];
    for b in &brokers {
        args.extend(["--url".into(), b.url()]);
    }
    args.extend(
        [
            "agents",
            "--fn",
            "default",
            "--submits",
            "300",
            "--distinct",
            "30",
            "--agents",
            "6",
            "--inflight",
            "12",
        ]
        .map(String::from),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(&args)
            .env_remove("HERD_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(report["evaluations"], report["distinct_keys"], "{report}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("one of"),
        "every broker was given"
    );
    // Every broker served agents.
    for b in &brokers {
        assert!(b.settled_stats().await["submits"].as_u64().unwrap() > 0);
    }
    // Given one broker of the three, the benchmark says its figures are
    // that broker's, once every broker shows in the cluster's totals.
    brokers[0]
        .wait_stats(|s| s["cluster_totals"]["brokers"] == 3)
        .await;
    let one = brokers[0].url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args([
                "bench",
                "--url",
                &one,
                "agents",
                "--fn",
                "default",
                "--submits",
                "20",
                "--distinct",
                "5",
            ])
            .env_remove("HERD_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("is one of 3 brokers").count(), 1, "{said}");
    for b in brokers {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stalled_and_every_queue_full_each_submit_is_answered() {
    // Redis is paused, so each cluster command waits out redis_timeout_ms
    // and the cluster task's inbox (hub_queue) fills; the evaluation queue
    // holds one job. Every submit still gets its answer, and the broker
    // keeps serving.
    let mut redis = Redis::start().await;
    let toml = format!(
        "[limits]\nhub_queue = 2\n[cluster]\nredis = \"{}\"\nlease_ms = 1000\nredis_timeout_ms = 200\n{}",
        redis.url(),
        "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 1\nqueue_capacity = 1\n"
    );
    let server = broker_with(&toml).await;
    let pid = redis.child.as_ref().unwrap().id();
    signal(pid, "-STOP");
    let mut agent = server.client().await;
    let total = 12;
    for n in 0..total {
        agent
            .send(json!({"op": "submit", "id": n, "input": {"sleep_ms": 50, "stalled": n}}))
            .await;
    }
    let mut answered = std::collections::HashMap::new();
    while answered.len() < total {
        let frame = agent.recv().await;
        match frame["type"].as_str().unwrap() {
            "accepted" => {}
            "result" | "error" => {
                let id = frame["id"].as_u64().unwrap();
                assert!(
                    answered.insert(id, frame.clone()).is_none(),
                    "two answers for {id}: {frame}"
                );
                if frame["type"] == "error" {
                    assert_eq!(frame["code"], "busy", "{frame}");
                }
            }
            other => panic!("unexpected {other}: {frame}"),
        }
    }
    let pong = agent.request(json!({"op": "ping", "id": "p"})).await;
    assert_eq!(pong["type"], "pong");
    signal(pid, "-CONT");
    server.settled_stats().await;
    server.stop().await;
    redis.stop();
}

/// A remote fn `embed` with the given timeout.
fn remote_embed(timeout_ms: u64) -> String {
    format!("[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\ntimeout_ms = {timeout_ms}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_broker_never_fails_a_key_another_broker_computes() {
    // B waits on A's claim from before A's worker starts the task. B's own
    // wait is not a deadline for A: A's agent gets the result its worker
    // computed within A's timeout, and so does B's.
    let redis = Redis::start().await;
    let a = broker_with(&redis.config("a", &remote_embed(2500))).await;
    let b = broker_with(&redis.config("b", &remote_embed(2500))).await;
    let input = json!({"fenced": "timer"});
    let key = key_of("embed", &input);
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "id": "a", "fn": "embed", "input": input}))
        .await;
    on_a.recv_type("accepted").await;
    a.wait_inflight(&key, "queued").await;
    let mut on_b = b.client().await;
    on_b.send(json!({"op": "submit", "id": "b", "fn": "embed", "input": input}))
        .await;
    on_b.recv_type("accepted").await;
    b.wait_inflight(&key, "queued").await;
    // The worker arrives late: A's job starts once B has waited 800 ms
    // (B's own snapshot says so).
    b.wait_inflight_row(&key, |row| row["age_ms"].as_u64() >= Some(800))
        .await;
    let mut worker = a.client().await;
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 1}))
        .await;
    assert_eq!(r["type"], "serving");
    let task = worker.recv_type("task").await;
    // Hold the task past B's submit + timeout_ms, within A's own deadline.
    if let Some(frame) = worker
        .try_recv(std::time::Duration::from_millis(2000))
        .await
    {
        panic!("the worker was told {frame} while its task was within its deadline");
    }
    worker
        .send(json!({"op": "complete", "task": task["task"], "output": {"done": true}}))
        .await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["output"]["done"], true, "{r}");
    let r = on_b.recv_type("result").await;
    assert_eq!(r["output"]["done"], true, "{r}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_that_lost_its_claim_never_overwrites_the_result() {
    // A claims a key and is paused past its lease; B takes it over, every
    // pub/sub connection is killed, and B's worker answers "b". A, resumed
    // without B's notice, hears "a" from its own worker: the result in
    // Redis stays B's, which A's own waiter and every later reader get.
    let input = json!({"fenced": "store"});
    let key = key_of("embed", &input);
    let Takeover {
        redis,
        mut a,
        a_url,
        b,
        mut worker_a,
        task_a,
        mut on_a,
        mut worker_b,
        task_b,
        mut on_b,
        _dir,
    } = Takeover::start(&input).await;
    let killed = redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim().parse::<u32>().unwrap() >= 2, "{killed}");
    worker_b
        .send(json!({"op": "complete", "task": task_b["task"], "output": {"by": "b"}}))
        .await;
    let r = on_b.recv_type("result").await;
    assert_eq!(r["output"]["by"], "b", "{r}");
    signal(a.id(), "-CONT");
    worker_a
        .send(json!({"op": "complete", "task": task_a["task"], "output": {"by": "a"}}))
        .await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["output"]["by"], "b", "A's waiter and Redis disagree: {r}");
    assert_eq!(r["source"], "cluster", "{r}");
    // A has dealt with its worker's answer once its job has left its table.
    let mut watch = Client::connect(&a_url).await;
    watch.send(json!({"op": "watch", "interval_ms": 100})).await;
    loop {
        let snap = watch.recv_type("snapshot").await;
        if snap["stats"]["wait_table"] == 0 && snap["stats"]["running"] == 0 {
            break;
        }
    }
    let stored = redis_cli(redis.port, &["GET", &result_name(&key, "")]);
    assert!(stored.contains("\"b\""), "Redis holds {stored}");
    let c = broker_with(&redis.config("c", &remote_embed(20_000))).await;
    let mut on_c = c.client().await;
    let r = answer(
        &mut on_c,
        json!({"op": "submit", "id": "c", "fn": "embed", "input": input}),
    )
    .await;
    assert_eq!(r["output"]["by"], "b", "{r}");
    a.kill().unwrap();
    a.wait().unwrap();
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_served_although_its_notice_was_lost() {
    // Every pub/sub connection is killed while A evaluates, so B misses A's
    // notice; B looks its subscribed key up again and serves it from Redis.
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 300, "notice": "lost"});
    let key = key_of("default", &input);
    let mut on_b = b.client().await;
    let r = on_b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let mut on_a = a.client().await;
    on_a.send(json!({"op": "submit", "id": "a", "input": input}))
        .await;
    a.wait_inflight(&key, "running").await;
    let killed = redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim().parse::<u32>().unwrap() >= 2, "{killed}");
    assert_eq!(on_a.recv_type("result").await["id"], "a");
    let r = on_b.recv_type("result").await;
    assert_eq!(r["id"], "s", "{r}");
    assert_eq!(r["source"], "cluster", "{r}");
    b.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_new_keys_run_at_once_not_one_timeout_each() {
    // Once a command has timed out, the breaker answers "away" at once: 30
    // new keys are evaluated side by side, not one per redis_timeout_ms.
    let redis = Redis::start().await;
    let server = broker(&redis, "alone").await;
    let pid = redis.child.as_ref().unwrap().id();
    signal(pid, "-STOP");
    let mut agent = server.client().await;
    let total = 30;
    for n in 0..total {
        agent
            .send(json!({"op": "submit", "id": n, "input": {"sleep_ms": 300, "paused": n}}))
            .await;
    }
    // Side by side: most of them run at once (16 threads).
    server
        .wait_stats(|s| s["running"].as_u64() >= Some(10))
        .await;
    let mut results = 0;
    while results < total {
        let frame = agent.recv().await;
        if frame["type"] == "result" {
            assert_eq!(frame["source"], "eval", "{frame}");
            results += 1;
        }
    }
    server.wait_metric("herd_cluster_up", |v| v == 0.0).await;
    signal(pid, "-CONT");
    server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_caches_only_the_results_someone_there_waited_for() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let mut agent = a.client().await;
    let unwanted = json!({"sleep_ms": 10, "wanted": false});
    let r = agent
        .request(json!({"op": "submit", "id": 1, "input": unwanted}))
        .await;
    assert_eq!(r["type"], "accepted");
    assert_eq!(agent.recv_type("result").await["id"], 1);
    // A later notice on the same channel: once B's subscriber has it, B
    // has handled the first one too.
    let wanted = json!({"sleep_ms": 10, "wanted": true});
    let mut on_b = b.client().await;
    let s = on_b
        .request(json!({"op": "subscribe", "id": "s", "key": key_of("default", &wanted)}))
        .await;
    assert_eq!(s["type"], "subscribed");
    agent
        .send(json!({"op": "submit", "id": 2, "input": wanted}))
        .await;
    assert_eq!(on_b.recv_type("result").await["id"], "s");
    let r = on_b
        .request(json!({"op": "get", "key": key_of("default", &unwanted)}))
        .await;
    assert_eq!(r["state"], "unknown", "{r}");
    assert_eq!(b.settled_stats().await["cache_entries"], 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_in_redis_is_not_served() {
    // Whatever wrote it, a stored result larger than any fn may output is
    // not taken from Redis: the key is evaluated here.
    let redis = Redis::start().await;
    let server = broker_with(&redis.config(
        "strict",
        "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nmax_output_bytes = 1024\n",
    ))
    .await;
    let input = json!({"sleep_ms": 10, "planted": true});
    let key = key_of("default", &input);
    let planted = format!(
        "{{\"fn\":\"default\",\"tag\":\"0:\",\"at_ms\":1,\"output\":\"{}\"}}",
        "x".repeat(100_000)
    );
    let set = redis_cli(redis.port, &["SET", &result_name(&key, ""), &planted]);
    assert!(set.contains("OK"), "{set}");
    let mut agent = server.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    let r = agent.recv_type("result").await;
    assert_eq!(r["source"], "eval", "{r}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_output_reaches_another_broker_s_waiters_from_redis() {
    // Past notice_inline_bytes the notice names the key only; the broker
    // with a subscriber reads the output from Redis.
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 200, "output_bytes": 20_000, "large": true});
    let key = key_of("default", &input);
    let mut on_b = b.client().await;
    let s = on_b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(s["state"], "unknown");
    let mut agent = a.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "input": input}))
        .await;
    let evaluated = agent.recv_type("result").await;
    assert_eq!(evaluated["source"], "eval");
    assert!(evaluated["output"].to_string().len() > 4096);
    let r = on_b.recv_type("result").await;
    assert_eq!(r["source"], "cluster", "{r}");
    assert_eq!(r["output"], evaluated["output"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_claimant_s_failure_neither_ends_the_takeover_nor_strands_the_key() {
    // A is paused past its lease and B takes the key over. A resumes and its
    // worker fails: that failure was computed under A's old claim, so B's
    // job goes on; B's worker answers, B's claim is released, and the key
    // is answered at once afterwards, with no claim left behind.
    let input = json!({"leaked": "claim"});
    let key = key_of("embed", &input);
    let Takeover {
        redis,
        mut a,
        a_url,
        b,
        mut worker_a,
        task_a,
        mut on_a,
        mut worker_b,
        task_b,
        mut on_b,
        _dir,
    } = Takeover::start(&input).await;
    signal(a.id(), "-CONT");
    worker_a
        .send(json!({"op": "complete", "task": task_a["task"], "error": "a gave up"}))
        .await;
    let r = on_a.recv_type("result").await;
    assert_eq!(r["error"]["code"], "eval_failed", "{r}");
    // B's waiter is not told A's failure: its answer is B's worker's.
    worker_b
        .send(json!({"op": "complete", "task": task_b["task"], "output": {"by": "b"}}))
        .await;
    let r = on_b.recv_type("result").await;
    assert_eq!(r["output"]["by"], "b", "{r}");
    b.settled_stats().await;
    let claim = redis_cli(redis.port, &["EXISTS", &format!("herd:claim:{{{key}}}:0:")]);
    assert_eq!(claim.trim(), "0", "a claim is left on the key");
    let mut again = Client::connect(&a_url).await;
    let r = answer(
        &mut again,
        json!({"op": "submit", "id": "again", "fn": "embed", "input": input}),
    )
    .await;
    assert_eq!(r["output"]["by"], "b", "{r}");
    a.kill().unwrap();
    a.wait().unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_subscription_stays_up() {
    // With Redis healthy, the broker's one subscription is never dropped
    // and made again (a drop loses notices): Redis reports the same pub/sub
    // connection until it has lived three times the lease.
    let redis = Redis::start().await;
    let server = broker(&redis, "steady").await;
    server
        .wait_metric("herd_cluster_pubsub_up", |v| v == 1.0)
        .await;
    let pubsub = || {
        let list = redis_cli(redis.port, &["CLIENT", "LIST", "TYPE", "pubsub"]);
        let field = |line: &str, name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .map(str::to_string)
        };
        let line = list.lines().next().unwrap_or_default().to_string();
        (field(&line, "id="), field(&line, "age="))
    };
    let (first, _) = pubsub();
    assert!(first.is_some(), "no pub/sub connection");
    // Each snapshot (every 100 ms) is a moment to look at Redis again.
    let mut watch = server.client().await;
    watch.send(json!({"op": "watch", "interval_ms": 100})).await;
    loop {
        watch.recv_type("snapshot").await;
        let (id, age) = pubsub();
        assert_eq!(id, first, "the subscription was dropped and made again");
        if age.and_then(|a| a.parse::<u64>().ok()) >= Some(3) {
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_noticed_and_made_again() {
    // B reaches Redis through a relay that goes silent on B's subscription:
    // the socket stays open and carries nothing, as with a dead peer. B's
    // ping goes unanswered, its pub/sub health drops, it subscribes again,
    // and its subscriber gets the result A published meanwhile.
    let redis = Redis::start().await;
    let relay = Relay::start(redis.port).await;
    let b = broker_with(
        &redis
            .config("b", SIMULATE)
            .replace(&redis.url(), &relay.url()),
    )
    .await;
    b.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    let a = broker(&redis, "a").await;
    let input = json!({"sleep_ms": 50, "subscription": "silent"});
    let key = key_of("default", &input);
    let mut on_b = b.client().await;
    let r = on_b
        .request(json!({"op": "subscribe", "id": "s", "key": key}))
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    relay.silence_subscriptions();
    let mut on_a = a.client().await;
    let r = answer(
        &mut on_a,
        json!({"op": "submit", "id": "a", "input": input}),
    )
    .await;
    assert_eq!(r["type"], "result", "{r}");
    b.wait_metric("herd_cluster_pubsub_up", |v| v == 0.0).await;
    b.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    assert!(relay.subscriptions() >= 2, "B never subscribed again");
    let r = on_b.recv_type("result").await;
    assert_eq!(r["id"], "s", "{r}");
    assert_eq!(r["source"], "cluster", "{r}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_are_claimed_side_by_side_not_one_round_trip_each() {
    // Redis's answers to commands are held back by a relay: ten new keys'
    // claims all go out before the first answer comes back (one slow
    // round trip never queues the others), and then all ten are claimed,
    // evaluated and stored.
    let redis = Redis::start().await;
    let relay = Relay::start(redis.port).await;
    let config = redis
        .config("b", SIMULATE)
        .replace(&redis.url(), &relay.url())
        .replace("redis_timeout_ms = 500", "redis_timeout_ms = 900");
    let server = broker_with(&config).await;
    let mut agent = server.client().await;
    let inputs: Vec<Value> = (0..10)
        .map(|n| json!({"sleep_ms": 0, "side_by_side": n}))
        .collect();
    let before = relay.requests(b"EVALSHA");
    relay.hold_answers(true);
    for (n, input) in inputs.iter().enumerate() {
        agent
            .send(json!({"op": "submit", "id": n, "input": input}))
            .await;
    }
    assert!(
        relay.wait_requests(b"EVALSHA", before + inputs.len()).await,
        "the claims were sent one round trip at a time"
    );
    relay.hold_answers(false);
    for _ in &inputs {
        let r = agent.recv_type("result").await;
        assert!(r["output"].is_object(), "{r}");
    }
    // A result reaches its waiters as it goes to Redis; the broker keeps
    // it once Redis has stored it.
    for input in &inputs {
        let key = key_of("default", input);
        server.wait_cached(&key).await;
        let stored = redis_cli(redis.port, &["GET", &result_name(&key, "")]);
        assert!(
            stored.contains("output"),
            "{input} was not stored: {stored}"
        );
    }
    server.stop().await;
}

/// A TCP relay to a redis-server that can go silent on the connections
/// that have subscribed to something: they stay open and carry nothing.
/// It can also hold back Redis's answers on the other connections, and
/// counts the commands sent.
struct Relay {
    port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<RelayConn>>>,
    gate: std::sync::Arc<Gate>,
    /// Every request relayed to Redis, in order.
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Notified after each request relayed.
    sent: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Gate {
    closed: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

#[derive(Clone)]
struct RelayConn {
    subscribed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gate: std::sync::Arc<Gate>,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    sent: std::sync::Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(redis_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let gate = std::sync::Arc::new(Gate::default());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sent = std::sync::Arc::new(tokio::sync::Notify::new());
        let all = std::sync::Arc::clone(&conns);
        let template = RelayConn {
            subscribed: Default::default(),
            silent: Default::default(),
            gate: std::sync::Arc::clone(&gate),
            log: std::sync::Arc::clone(&log),
            sent: std::sync::Arc::clone(&sent),
        };
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                let conn = RelayConn {
                    subscribed: Default::default(),
                    silent: Default::default(),
                    ..template.clone()
                };
                all.lock().unwrap().push(conn.clone());
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                tokio::spawn(pump(client_rx, server_tx, conn.clone(), true));
                tokio::spawn(pump(server_rx, client_tx, conn, false));
            }
        });
        Relay {
            port,
            conns,
            gate,
            log,
            sent,
            task,
        }
    }

    /// Holds back (or lets through again) Redis's answers on connections
    /// that have not subscribed.
    fn hold_answers(&self, hold: bool) {
        self.gate
            .closed
            .store(hold, std::sync::atomic::Ordering::SeqCst);
        if !hold {
            self.gate.opened.notify_waiters();
        }
    }

    /// How many requests relayed so far contain `command`.
    fn requests(&self, command: &[u8]) -> usize {
        let log = self.log.lock().unwrap();
        log.windows(command.len()).filter(|w| *w == command).count()
    }

    /// Waits until `n` requests containing `command` have been relayed;
    /// false if they were not within `FRAME_WAIT`.
    async fn wait_requests(&self, command: &[u8], n: usize) -> bool {
        let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
        loop {
            let sent = self.sent.notified();
            if self.requests(command) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, sent).await.is_err() {
                return false;
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// From now on, nothing passes on a connection that has subscribed.
    fn silence_subscriptions(&self) {
        use std::sync::atomic::Ordering;
        for conn in self.conns.lock().unwrap().iter() {
            if conn.subscribed.load(Ordering::SeqCst) {
                conn.silent.store(true, Ordering::SeqCst);
            }
        }
    }

    /// How many connections have subscribed.
    fn subscriptions(&self) -> usize {
        use std::sync::atomic::Ordering;
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| c.subscribed.load(Ordering::SeqCst))
            .count()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a relayed connection; a silent connection's
/// bytes are read and dropped (its socket stays open).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: RelayConn,
    to_redis: bool,
) {
    use std::sync::atomic::Ordering;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while !to_redis
            && conn.gate.closed.load(Ordering::SeqCst)
            && !conn.subscribed.load(Ordering::SeqCst)
        {
            let opened = conn.gate.opened.notified();
            if !conn.gate.closed.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to_redis {
            if buf[..n].windows(9).any(|w| w == b"SUBSCRIBE") {
                conn.subscribed.store(true, Ordering::SeqCst);
            }
            conn.log.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        if conn.silent.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if to_redis {
            conn.sent.notify_waiters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broker_shows_the_whole_cluster_s_figures() {
    // A submit on A: B's snapshots sum both brokers' counters (from Redis),
    // while B's own counters stay its own.
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let mut on_a = a.client().await;
    let r = answer(
        &mut on_a,
        json!({"op": "submit", "id": 1, "input": {"sleep_ms": 1, "totals": 1}}),
    )
    .await;
    assert_eq!(r["type"], "result", "{r}");
    let stats = b
        .wait_stats(|s| {
            s["cluster_totals"]["brokers"] == 2 && s["cluster_totals"]["evaluations"] == 1
        })
        .await;
    assert_eq!(stats["cluster_totals"]["submits"], 1, "{stats}");
    assert_eq!(stats["submits"], 0, "{stats}");
    a.stop().await;
    b.stop().await;
}

/// The answer to a submit: its `result` (a cache hit, or after `accepted`).
async fn answer(client: &mut Client, submit: Value) -> Value {
    let r = client.request(submit).await;
    if r["type"] == "accepted" {
        client.recv_type("result").await
    } else {
        r
    }
}

/// A key claimed by broker A (a child process), paused past its lease, and
/// taken over by broker B: each broker has a worker holding the key's task
/// and an agent waiting on it. A is still paused.
struct Takeover {
    redis: Redis,
    _dir: tempfile::TempDir,
    a: Broker,
    a_url: String,
    b: TestServer,
    worker_a: Client,
    task_a: Value,
    on_a: Client,
    worker_b: Client,
    task_b: Value,
    on_b: Client,
}

impl Takeover {
    async fn start(input: &Value) -> Takeover {
        let redis = Redis::start().await;
        let dir = tempfile::tempdir().unwrap();
        let (a, a_addr) = serve_child(&dir, &redis.config("a", &remote_embed(20_000)));
        let b = broker_with(&redis.config("b", &remote_embed(20_000))).await;
        let a_url = format!("ws://{a_addr}/ws");
        let mut worker_a = Client::connect(&a_url).await;
        serve_embed(&mut worker_a).await;
        let mut on_a = Client::connect(&a_url).await;
        on_a.send(json!({"op": "submit", "id": "a", "fn": "embed", "input": input}))
            .await;
        let task_a = worker_a.recv_type("task").await;
        let mut worker_b = b.client().await;
        serve_embed(&mut worker_b).await;
        let mut on_b = b.client().await;
        on_b.send(json!({"op": "submit", "id": "b", "fn": "embed", "input": input}))
            .await;
        on_b.recv_type("accepted").await;
        signal(a.id(), "-STOP");
        // B takes the key over once A's lease has run out.
        let task_b = worker_b.recv_type("task").await;
        Takeover {
            redis,
            _dir: dir,
            a,
            a_url,
            b,
            worker_a,
            task_a,
            on_a,
            worker_b,
            task_b,
            on_b,
        }
    }
}

/// Serves `embed` with one slot on this session.
async fn serve_embed(worker: &mut Client) {
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 1}))
        .await;
    assert_eq!(r["type"], "serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_redis_refuses_it_warns_with_redis_s_words_while_it_lasts() {
    let redis = Redis::start().await;
    redis_cli(
        redis.port,
        &["CONFIG", "SET", "requirepass", "right-password"],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\nredis = \"redis://:wrong-password@127.0.0.1:{}/\"\nlease_ms = 500\nredis_timeout_ms = 200\ndown_warning_s = 1\n",
            redis.port
        ),
    )
    .unwrap();
    let mut child = serve_logging(&path);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + common::FRAME_WAIT;
    let next_log = |level: &str, says: &str| loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("a {level} saying {says:?} in time"));
        assert!(
            !line.contains("wrong-password"),
            "a password logged: {line}"
        );
        let parsed: Value = serde_json::from_str(&line).unwrap();
        if parsed["level"] == level
            && parsed["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says))
        {
            return parsed;
        }
    };
    // Redis's own words, and again while it lasts.
    for _ in 0..2 {
        let warning = next_log("WARN", "Redis is unreachable");
        let error = warning["fields"]["error"].as_str().unwrap_or("");
        assert!(
            error.to_lowercase().contains("authentication failed"),
            "{warning}"
        );
    }
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_invalidate_on_a_cluster_says_why_it_waits() {
    // The answer comes a lease after Redis recorded the invalidation: the
    // CLI says what it is waiting for, then prints what was dropped.
    let redis = Redis::start().await;
    let toml = redis
        .config("a", SIMULATE)
        .replace("lease_ms = 1000", "lease_ms = 3000");
    let a = broker_with(&toml).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["invalidate", "--url", &a.url(), "--fn", "default"])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout} {stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(stdout.trim()).unwrap(),
        json!({"fn": "default", "invalidated": true})
    );
    assert!(
        stderr.contains("waiting for the broker") && stderr.contains("cluster.lease_ms"),
        "{stderr}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refused_by_redis_joins_once_its_password_is_accepted() {
    // Redis asks for a password the broker does not have; the broker serves
    // alone. Once Redis takes the broker's password, it joins its cluster
    // with no restart.
    let redis = Redis::start().await;
    redis_cli(
        redis.port,
        &["CONFIG", "SET", "requirepass", "not-the-brokers"],
    );
    let url = format!("redis://:the-brokers@127.0.0.1:{}/", redis.port);
    let toml = redis.config("a", SIMULATE).replace(&redis.url(), &url);
    let a = TestServer::start(common::config(&toml)).await;
    let mut c = a.client().await;
    let r = answer(
        &mut c,
        json!({"op": "submit", "id": 1, "input": {"alone": 1}}),
    )
    .await;
    assert_eq!(r["source"], "eval", "{r}");
    assert_eq!(a.metric("herd_cluster_up").await, Some(0.0));
    assert_eq!(a.metric("herd_cluster_configured").await, Some(1.0));
    let set = redis_cli(
        redis.port,
        &[
            "-a",
            "not-the-brokers",
            "--no-auth-warning",
            "CONFIG",
            "SET",
            "requirepass",
            "the-brokers",
        ],
    );
    assert!(set.contains("OK"), "{set}");
    a.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    a.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_reaches_redis_over_tls() {
    // A redis-server that speaks only TLS, with a certificate for
    // 127.0.0.1 that the broker trusts through SSL_CERT_FILE (how the
    // system's CA store is found); the broker joins it at rediss://.
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Killed when dropped, even if the test fails.
    let _redis = common::cluster::Broker(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::env::set_var("SSL_CERT_FILE", &cert);
    let toml = format!(
        "[cluster]\nredis = \"rediss://127.0.0.1:{port}/\"\nnode = \"tls\"\nlease_ms = 1000\nredis_timeout_ms = 500\n{SIMULATE}"
    );
    let a = TestServer::start(common::config(&toml)).await;
    a.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    a.wait_metric("herd_cluster_pubsub_up", |v| v == 1.0).await;
    let mut c = a.client().await;
    let r = answer(
        &mut c,
        json!({"op": "submit", "id": 1, "input": {"over": "tls"}}),
    )
    .await;
    assert_eq!(r["source"], "eval", "{r}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_broker_gets_the_claimant_s_progress() {
    let redis = Redis::start().await;
    let (a, b) = (broker(&redis, "a").await, broker(&redis, "b").await);
    let input = json!({"sleep_ms": 1500, "progress": 5, "across": "progress"});
    let mut first = a.client().await;
    first
        .send(json!({"op": "submit", "id": "a", "input": input, "progress": true}))
        .await;
    assert_eq!(first.recv().await["type"], "accepted");
    // Broker a runs it (its first report is out); b's waiter joins it.
    assert_eq!(first.recv().await["type"], "progress");
    let mut far = b.client().await;
    far.send(json!({"op": "submit", "id": "b", "input": input, "progress": true}))
        .await;
    let mut seqs = Vec::new();
    let result = loop {
        let f = far.recv().await;
        match f["type"].as_str() {
            Some("progress") => {
                let seq = f["seq"].as_u64().unwrap();
                assert_eq!(f["data"], json!({"step": seq, "of": 5}), "{f}");
                seqs.push(seq);
            }
            Some("result") => break f,
            _ => {}
        }
    };
    assert_eq!(result["source"], "cluster", "{result}");
    assert!(seqs.len() >= 2, "b's waiter heard {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&5), "{seqs:?}");
    assert_eq!(evaluations(&[&a, &b]).await, 1);
    a.stop().await;
    b.stop().await;
}
