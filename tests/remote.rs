//! Remote workers: real brokers, real worker sessions (the Rust worker API,
//! raw WebSocket workers driven by the test, and `herd work` with real
//! children).

mod common;

use common::cluster::Broker;
use common::{config, key_of, Client, TestServer};
use herd::client::worker::{serve, Task, WorkerOptions, WorkerStats};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const TWO_FNS: &str = r#"
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 5000
[[evaluator]]
fn = "rank"
kind = "remote"
timeout_ms = 5000
"#;

/// A worker started with the Rust API; stops (draining) when dropped.
struct ApiWorker {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), herd::client::ClientError>>,
    stats: Arc<WorkerStats>,
}

impl ApiWorker {
    fn start<H, Fut>(url: &str, fn_name: &str, concurrency: usize, handler: H) -> ApiWorker
    where
        H: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, String>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let stats = Arc::new(WorkerStats::default());
        let (url, fn_name, s) = (url.to_string(), fn_name.to_string(), Arc::clone(&stats));
        let task = tokio::spawn(async move {
            let options = WorkerOptions {
                concurrency,
                ..WorkerOptions::default()
            };
            serve(&url, &fn_name, &options, s, handler, async {
                let _ = rx.await;
            })
            .await
        });
        ApiWorker {
            stop: Some(tx),
            task,
            stats,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Starts serving `fn_name` on a raw session and waits for `serving`.
async fn raw_worker(server: &TestServer, fn_name: &str, concurrency: usize) -> Client {
    let mut w = server.client().await;
    let r = w
        .request(json!({"op": "serve", "id": "s", "fn": fn_name, "concurrency": concurrency}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    assert_eq!(r["concurrency"], concurrency);
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_two_fns_evaluate_each_key_once() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    // Evaluations are held until every submit has reached the broker, so
    // each identical submit finds its key's evaluation under way.
    let (release, gate) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for (n, fn_name) in ["embed", "embed", "embed", "rank", "rank"]
        .iter()
        .enumerate()
    {
        let (calls, gate) = (Arc::clone(&calls), gate.clone());
        workers.push(ApiWorker::start(
            &server.url(),
            fn_name,
            2,
            move |task: Task| {
                let (calls, mut gate) = (Arc::clone(&calls), gate.clone());
                async move {
                    *calls.lock().unwrap().entry(task.key.clone()).or_default() += 1;
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(json!({"fn": task.fn_name, "input": task.input, "worker": n}))
                }
            },
        ));
    }
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 3.0)
        .await;
    server
        .wait_metric("herd_remote_workers{fn=\"rank\"}", |v| v == 2.0)
        .await;
    let mut agents = Vec::new();
    for a in 0..12 {
        agents.push(server.client().await);
        let agent = agents.last_mut().unwrap();
        for n in 0..10 {
            let fn_name = if n % 2 == 0 { "embed" } else { "rank" };
            agent
                .send(json!({"op": "submit", "id": n, "fn": fn_name, "input": {"n": n % 5, "a": a % 3}}))
                .await;
        }
    }
    server.wait_stats(|s| s["submits"] == 120).await;
    release.send(true).unwrap();
    for agent in agents.iter_mut() {
        let mut results = 0;
        while results < 10 {
            let r = agent.recv_type("result").await;
            assert!(r["output"].is_object(), "{r}");
            results += 1;
        }
    }
    let calls = calls.lock().unwrap().clone();
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    let stats = server.settled_stats().await;
    assert_eq!(stats["evaluations"], calls.len() as u64);
    let done: u64 = workers
        .iter()
        .map(|w| w.stats.done.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(done, calls.len() as u64, "one complete per evaluation");
    for w in workers {
        w.stop().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_s_tasks_finish_on_another() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let mut doomed = raw_worker(&server, "embed", 2).await;
    let mut agent = server.client().await;
    let mut other = server.client().await;
    for n in 0..2 {
        agent
            .send(json!({"op": "submit", "id": n, "fn": "embed", "input": {"lost": n}}))
            .await;
        other
            .send(json!({"op": "submit", "id": n, "fn": "embed", "input": {"lost": n}}))
            .await;
    }
    for _ in 0..2 {
        let task = doomed.recv_type("task").await;
        assert_eq!(task["fn"], "embed");
        assert!(task.get("attempt").is_none());
    }
    // Every submit has joined its key before the worker is lost, so both
    // agents wait on each re-run evaluation.
    server.wait_stats(|s| s["submits"] == 4).await;
    let attempts: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    let survivor = ApiWorker::start(&server.url(), "embed", 2, move |task: Task| {
        seen.lock().unwrap().push(task.attempt);
        async move { Ok(json!({"echo": task.input})) }
    });
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 2.0)
        .await;
    drop(doomed);
    for c in [&mut agent, &mut other] {
        for _ in 0..2 {
            let r = c.recv_type("result").await;
            assert!(r["output"]["echo"]["lost"].is_number(), "{r}");
            assert_eq!(r["shared"], 2);
        }
    }
    assert_eq!(*attempts.lock().unwrap(), vec![2, 2]);
    server.settled_stats().await;
    survivor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_times_out_is_revoked_and_its_late_complete_is_stale() {
    let server = TestServer::start(config(
        "[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\ntimeout_ms = 300\n",
    ))
    .await;
    let mut silent = raw_worker(&server, "embed", 1).await;
    let mut agent = server.client().await;
    let input = json!({"silent": 1});
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "embed", "input": input}))
        .await;
    let task = silent.recv_type("task").await;
    assert_eq!(task["key"], key_of("embed", &input));
    assert!(task["deadline_ms"].as_u64().unwrap() > 0);
    let r = agent.recv_type("result").await;
    assert_eq!(r["error"]["code"], "eval_timeout");
    let revoke = silent.recv_type("revoke").await;
    assert_eq!(revoke["task"], task["task"]);
    let late = silent
        .request(json!({"op": "complete", "id": "late", "task": task["task"], "output": 1}))
        .await;
    assert_eq!(late["code"], "stale_task");
    assert_eq!(late["id"], "late");
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_attempts_the_waiters_hear_worker_lost() {
    let server = TestServer::start(config(
        "[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\nmax_attempts = 2\n",
    ))
    .await;
    let mut agent = server.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "embed", "input": {"cursed": true}}))
        .await;
    assert_eq!(agent.recv_type("accepted").await["state"], "queued");
    for attempt in 1..=2u64 {
        let mut w = raw_worker(&server, "embed", 1).await;
        let task = w.recv_type("task").await;
        assert_eq!(task["attempt"].as_u64().unwrap_or(1), attempt);
        drop(w);
    }
    let r = agent.recv_type("result").await;
    assert_eq!(r["error"]["code"], "eval_failed");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("worker lost"));
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_every_waiter_revokes_the_task() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let mut w = raw_worker(&server, "rank", 1).await;
    let mut agent = server.client().await;
    let input = json!({"cancel": "me"});
    agent
        .send(json!({"op": "submit", "fn": "rank", "input": input}))
        .await;
    let task = w.recv_type("task").await;
    let key = key_of("rank", &input);
    let c = agent.request(json!({"op": "cancel", "key": key})).await;
    // The `accepted` comes first.
    let c = if c["type"] == "accepted" {
        agent.recv_type("cancelled").await
    } else {
        c
    };
    assert_eq!(c["type"], "cancelled");
    assert_eq!(w.recv_type("revoke").await["task"], task["task"]);
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_say_who_may_serve_what() {
    let server = TestServer::start(config(&format!(
        r#"
[[token]]
name = "gpu-box"
role = "worker"
secret = "w"
fns = ["embed"]
[[token]]
name = "agent"
role = "agent"
secret = "a"
{TWO_FNS}"#
    )))
    .await;
    let connect = |token: &str| {
        let url = format!("{}?token={token}", server.url());
        async move { Client::connect(&url).await }
    };
    let mut worker = connect("w").await;
    assert_eq!(worker.hello["role"], "worker");
    let refused = worker
        .request(json!({"op": "serve", "id": 1, "fn": "rank"}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    let unknown = worker
        .request(json!({"op": "serve", "id": 2, "fn": "nope"}))
        .await;
    assert_eq!(unknown["code"], "unknown_fn");
    let ok = worker
        .request(json!({"op": "serve", "id": 3, "fn": "embed", "concurrency": 4}))
        .await;
    assert_eq!(ok["type"], "serving");
    for op in [
        json!({"op": "submit", "input": 1, "fn": "embed"}),
        json!({"op": "subscribe", "key": key_of("embed", &json!(1))}),
        json!({"op": "watch"}),
    ] {
        assert_eq!(worker.request(op).await["code"], "forbidden");
    }
    let mut agent = connect("a").await;
    let refused = agent
        .request(json!({"op": "serve", "id": 1, "fn": "embed"}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    let unserved = worker
        .request(json!({"op": "unserve", "id": 4, "fn": "embed"}))
        .await;
    assert_eq!(unserved["concurrency"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_the_queue_holds_until_one_serves() {
    let server = TestServer::start(config(TWO_FNS)).await;
    assert_eq!(
        server.metric("herd_evaluator_healthy{fn=\"embed\"}").await,
        Some(0.0)
    );
    let stats = server.stats().await;
    assert_eq!(stats["evaluators"]["embed"], "no_workers");
    let mut agent = server.client().await;
    let accepted = agent
        .request(json!({"op": "submit", "id": 1, "fn": "embed", "input": {"wait": "for me"}}))
        .await;
    assert_eq!(accepted["state"], "queued");
    let w = ApiWorker::start(&server.url(), "embed", 1, |task: Task| async move {
        Ok(json!({"late": task.input}))
    });
    let r = agent.recv_type("result").await;
    assert_eq!(r["output"]["late"]["wait"], "for me");
    server
        .wait_metric("herd_evaluator_healthy{fn=\"embed\"}", |v| v == 1.0)
        .await;
    w.stop().await;
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 0.0)
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_which_worker_runs_a_task() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let mut w = raw_worker(&server, "embed", 1).await;
    let mut agent = server.client().await;
    let input = json!({"shown": 1});
    agent
        .send(json!({"op": "submit", "fn": "embed", "input": input}))
        .await;
    let task = w.recv_type("task").await;
    let key = key_of("embed", &input);
    server.wait_inflight(&key, "running").await;
    let mut viewer = server.client().await;
    viewer
        .send(json!({"op": "watch", "interval_ms": 100}))
        .await;
    let snap = viewer.recv_type("snapshot").await;
    let row = snap["inflight"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key.as_str())
        .cloned()
        .unwrap();
    assert!(
        row["worker"].as_str().unwrap().starts_with("anonymous/"),
        "{row}"
    );
    w.send(json!({"op": "complete", "task": task["task"], "output": {"ok": 1}}))
        .await;
    assert_eq!(agent.recv_type("result").await["output"]["ok"], 1);
    server.stop().await;
}

fn test_worker() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workers/test_worker.py")
        .display()
        .to_string()
}

/// `herd work` as a child process serving `fn_name` with the test worker
/// (killed when dropped: a failed test leaves none behind).
fn herd_work(url: &str, fn_name: &str, concurrency: usize) -> Broker {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "work",
            "--url",
            url,
            "--fn",
            fn_name,
            "--concurrency",
            &concurrency.to_string(),
            "--timeout-ms",
            "5000",
            "--",
            "python3",
            &test_worker(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Broker(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_list_workers_and_remote_queues() {
    // One worker serves embed (concurrency 2) and completes one task; one
    // more task waits while rank has no worker: the snapshot says each.
    let server = TestServer::start(config(TWO_FNS)).await;
    let mut worker = server.client().await;
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 2}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    let mut agent = server.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "embed", "input": {"n": 1}}))
        .await;
    let task = worker.recv_type("task").await;
    worker
        .send(json!({"op": "complete", "task": task["task"], "output": 1}))
        .await;
    agent.recv_type("result").await;
    agent
        .send(json!({"op": "submit", "id": 2, "fn": "rank", "input": {"n": 2}, "wait": false}))
        .await;
    agent.recv_type("accepted").await;
    let mut watch = server.client().await;
    watch.send(json!({"op": "watch", "interval_ms": 100})).await;
    loop {
        let snap = watch.recv_type("snapshot").await;
        let w = &snap["workers"][0];
        let rank = snap["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["fn"] == "rank")
            .cloned();
        if w["done"] == 1 && rank.as_ref().is_some_and(|q| q["queued"] == 1) {
            assert_eq!(w["fns"], json!(["embed"]), "{snap}");
            assert_eq!(w["concurrency"], 2, "{snap}");
            assert_eq!(w["in_flight"], 0, "{snap}");
            assert_eq!(rank.unwrap()["workers"], 0, "{snap}");
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_work_off_a_terminal_says_what_it_serves_what_fails_and_when_it_stops() {
    // With stderr not a terminal (a service, a pipe), herd work logs that it
    // connected and what it serves, at what concurrency; each task its
    // program fails, and why; and its stopping.
    let server = TestServer::start(config(TWO_FNS)).await;
    let mut work = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "work",
            "--url",
            &server.url(),
            "--fn",
            "embed",
            "--concurrency",
            "3",
        ])
        .args(["--", "python3", &test_worker()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = work.stderr.take().unwrap();
    let work = Broker(work);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut read_until = |what: &str| {
        while !seen.iter().any(|l: &String| l.contains(what)) {
            let line = rx
                .recv_timeout(common::FRAME_WAIT)
                .unwrap_or_else(|_| panic!("herd work said only {seen:?}"));
            seen.push(line);
        }
        seen.iter().find(|l| l.contains(what)).unwrap().clone()
    };
    let serving = read_until("serving");
    assert!(
        serving.contains("\"embed\"") && serving.contains('3'),
        "{serving}"
    );
    read_until("connected");
    let mut agent = server.client().await;
    for (n, mode) in ["crash", "garbage"].into_iter().enumerate() {
        agent
            .send(json!({"op": "submit", "id": n, "fn": "embed", "input": {"mode": mode}}))
            .await;
        let r = agent.recv_type("result").await;
        assert_eq!(r["error"]["code"], "eval_failed", "{r}");
    }
    let crashed = read_until("its last line on stderr: \"crashing on purpose\"");
    assert!(crashed.contains("WARN"), "{crashed}");
    let garbled = read_until("not a JSON reply");
    assert!(garbled.contains("task failed"), "{garbled}");
    let pid = work.id();
    let lines = std::thread::spawn(move || {
        let mut rest = seen;
        rest.extend(rx.iter());
        rest
    });
    terminate(work).await;
    let lines = lines.join().unwrap();
    for said in ["stopping", "stopped"] {
        assert!(
            lines.iter().any(|l| l.contains(said)),
            "herd work {pid} did not say {said:?}: {lines:?}"
        );
    }
    server.stop().await;
}

async fn terminate(mut child: Broker) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.0.wait().unwrap()),
    )
    .await
    .expect("herd work drains and exits on SIGTERM")
    .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_work_replaces_a_crashing_child() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let work = herd_work(&server.url(), "embed", 2);
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 1.0)
        .await;
    let mut agent = server.client().await;
    let crash = agent
        .request(json!({"op": "submit", "id": 1, "fn": "embed", "input": {"mode": "crash"}}))
        .await;
    assert_eq!(crash["type"], "accepted");
    let r = agent.recv_type("result").await;
    assert_eq!(r["error"]["code"], "eval_failed", "{r}");
    for n in 0..4 {
        agent
            .send(json!({"op": "submit", "id": n, "fn": "embed", "input": {"mode": "ok", "n": n}}))
            .await;
    }
    for _ in 0..4 {
        let r = agent.recv_type("result").await;
        assert_eq!(r["output"]["fn"], "embed", "{r}");
    }
    terminate(work).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_work_comes_back_after_a_broker_restart() {
    let first = TestServer::start(config(TWO_FNS)).await;
    let addr = first.addr;
    let work = herd_work(&first.url(), "rank", 1);
    first
        .wait_metric("herd_remote_workers{fn=\"rank\"}", |v| v == 1.0)
        .await;
    first.stop().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = TestServer::start_on(listener, config(TWO_FNS)).await;
    let mut agent = second.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "rank", "input": {"mode": "ok", "after": "restart"}}))
        .await;
    let r = agent.recv_type("result").await;
    assert_eq!(r["output"]["echo"]["after"], "restart", "{r}");
    terminate(work).await;
    second.stop().await;
}

#[test]
fn the_shipped_remote_config_parses() {
    std::env::set_var("HERD_WORKER_TOKEN", "w");
    std::env::set_var("HERD_AGENT_TOKEN", "a");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/remote.toml");
    let config = herd::Config::load(&path).unwrap();
    herd::server::auth::Gate::new(&config).unwrap();
    assert!(config
        .evaluators
        .iter()
        .any(|e| e.name == "embed" && e.kind == herd::config::EvaluatorKind::Remote));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_reads_is_never_closed_by_dispatch() {
    // More tasks queued than the worker's outbound queue holds frames: the
    // broker offers what the queue can take and more as the worker drains.
    let server = TestServer::start(config(
        r#"
[limits]
outbound_queue = 64
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 20000
queue_capacity = 1000
"#,
    ))
    .await;
    let mut agent = server.client().await;
    let total = 100;
    for n in 0..total {
        let r = agent
            .request(json!({"op": "submit", "id": n, "fn": "embed", "wait": false, "input": {"flow": n}}))
            .await;
        assert_eq!(r["type"], "accepted", "{r}");
    }
    let mut worker = raw_worker(&server, "embed", 64).await;
    for _ in 0..total {
        let task = worker.recv().await;
        assert_eq!(
            task["type"], "task",
            "the worker was closed or sent something else: {task}"
        );
        worker
            .send(json!({"op": "complete", "task": task["task"], "output": {"ok": task["input"]["flow"]}}))
            .await;
    }
    server.settled_stats().await;
    for n in 0..total {
        let key = key_of("embed", &json!({"flow": n}));
        let r = agent.request(json!({"op": "get", "key": key})).await;
        assert_eq!(r["state"], "done", "{r}");
    }
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_task_at_once() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let worker = ApiWorker::start(&server.url(), "embed", 1, |task: Task| async move {
        if task.input["panic"] == true {
            panic!("the handler gave up");
        }
        Ok(json!({"echo": task.input}))
    });
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 1.0)
        .await;
    let mut agent = server.client().await;
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "embed", "input": {"panic": true}}))
        .await;
    let r = agent.recv_type("result").await;
    assert_eq!(r["error"]["code"], "eval_failed", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("panicked"),
        "{r}"
    );
    // The slot is free again: the next task runs on the same worker.
    agent
        .send(json!({"op": "submit", "id": 2, "fn": "embed", "input": {"panic": false}}))
        .await;
    let r = agent.recv_type("result").await;
    assert_eq!(r["output"]["echo"]["panic"], false, "{r}");
    worker.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_work_gives_a_revoked_task_s_slot_a_fresh_child() {
    // The broker's deadline (2 s) is shorter than the child's (5 s): the task
    // sent after a revoke must not wait for the revoked task's child.
    let server = TestServer::start(config(
        r#"
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 2000
"#,
    ))
    .await;
    let work = herd_work(&server.url(), "embed", 1);
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 1.0)
        .await;
    let mut agent = server.client().await;
    let hang = json!({"mode": "hang"});
    agent
        .send(json!({"op": "submit", "id": 1, "fn": "embed", "input": hang}))
        .await;
    agent.recv_type("accepted").await;
    let key = key_of("embed", &hang);
    server.wait_inflight(&key, "running").await;
    let r = agent.request(json!({"op": "cancel", "key": key})).await;
    assert_eq!(r["type"], "cancelled");
    server.settled_stats().await;
    agent
        .send(json!({"op": "submit", "id": 2, "fn": "embed", "input": {"mode": "ok", "after": "revoke"}}))
        .await;
    let r = agent.recv_type("result").await;
    assert_eq!(r["output"]["fn"], "embed", "{r}");
    terminate(work).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_work_passes_its_child_s_progress_lines_on() {
    let server = TestServer::start(config(TWO_FNS)).await;
    let work = herd_work(&server.url(), "embed", 1);
    let mut agent = server.client().await;
    let input = json!({"mode": "progress", "reports": 3, "n": "herd-work"});
    agent
        .send(json!({"op": "submit", "id": "p", "fn": "embed", "input": input, "progress": true}))
        .await;
    let mut reports = Vec::new();
    let result = loop {
        let f = agent.recv().await;
        match f["type"].as_str() {
            Some("progress") => reports.push((f["seq"].clone(), f["data"].clone())),
            Some("result") => break f,
            _ => {}
        }
    };
    assert_eq!(
        reports,
        (1..=3)
            .map(|n| (json!(n), json!({"step": n})))
            .collect::<Vec<_>>()
    );
    assert_eq!(result["output"]["echo"], input, "{result}");
    drop(work);
    server.stop().await;
}
