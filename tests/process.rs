//! Process evaluators with real child processes (tests/workers/test_worker.py).

mod common;

use common::{config, key_of, TestServer};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config with one process evaluator `fn = "py"` running the test worker.
    fn config(&self, extra: &str) -> herd::Config {
        let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/test_worker.py");
        config(&format!(
            r#"
[[evaluator]]
fn = "py"
kind = "process"
command = ["python3", {worker:?}]
env = {{ PIDFILE = {pids:?}, CALLS = {calls:?}, FAIL_AT_START_IF = {flag:?} }}
grace_ms = 500
{extra}
"#,
            worker = worker.display().to_string(),
            pids = self.path("pids").display().to_string(),
            calls = self.path("calls").display().to_string(),
            flag = self.path("fail-at-start").display().to_string(),
        ))
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every child the broker ever started has exited and been reaped.
    fn assert_no_children_left(&self) {
        let pids = self.lines("pids");
        assert!(!pids.is_empty(), "the worker recorded its pid");
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "worker process {pid} is still there"
            );
        }
    }
}

async fn submit(c: &mut common::Client, input: serde_json::Value) -> serde_json::Value {
    c.send(json!({"op": "submit", "fn": "py", "input": input}))
        .await;
    c.recv_type("result").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_flow_and_identical_submits_run_the_child_once() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config("threads = 4")).await;
    let input = json!({"mode": "ok", "sleep": 0.3, "n": 1});
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(server.client().await);
    }
    for c in clients.iter_mut() {
        c.send(json!({"op": "submit", "fn": "py", "input": input}))
            .await;
    }
    for c in clients.iter_mut() {
        let r = c.recv_type("result").await;
        assert_eq!(r["output"]["echo"], input);
        assert_eq!(r["output"]["fn"], "py");
        assert_eq!(r["shared"], 30);
    }
    assert_eq!(fx.lines("calls"), vec![key_of("py", &input)]);

    // An evaluator-reported error reaches the waiter; stderr stays out of results.
    let e = submit(&mut clients[0], json!({"mode": "error"})).await;
    assert_eq!(e["error"]["code"], "eval_failed");
    assert_eq!(e["error"]["message"], "bad input");
    let noted = submit(&mut clients[0], json!({"mode": "stderr"})).await;
    assert_eq!(noted["output"]["echo"]["mode"], "stderr");
    drop(clients);
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_crashes_mid_task_is_replaced() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config("threads = 1")).await;
    let mut c = server.client().await;
    let r = submit(&mut c, json!({"mode": "crash"})).await;
    assert_eq!(r["error"]["code"], "eval_failed");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("exited")
            && message.contains("its last line on stderr: \"crashing on purpose\""),
        "{r}"
    );
    let ok = submit(&mut c, json!({"mode": "ok", "after": "crash"})).await;
    assert_eq!(ok["output"]["echo"]["after"], "crash");
    assert_eq!(fx.lines("pids").len(), 2, "one replacement child");
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_prints_garbage_is_replaced() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config("threads = 1")).await;
    let mut c = server.client().await;
    let r = submit(&mut c, json!({"mode": "garbage"})).await;
    assert_eq!(r["error"]["code"], "eval_failed");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a JSON reply"),
        "{r}"
    );
    let ok = submit(&mut c, json!({"mode": "ok", "after": "garbage"})).await;
    assert_eq!(ok["output"]["echo"]["after"], "garbage");
    assert_eq!(fx.lines("pids").len(), 2);
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_hangs_is_killed_at_its_timeout() {
    let fx = Fixture::new();
    // The timeout also bounds the replacement child's start-up and the next
    // task: long enough for a python3 to start on a loaded machine.
    let server = TestServer::start(fx.config("threads = 1\ntimeout_ms = 1500")).await;
    let mut c = server.client().await;
    let r = submit(&mut c, json!({"mode": "hang"})).await;
    assert_eq!(r["error"]["code"], "eval_timeout");
    let ok = submit(&mut c, json!({"mode": "ok", "after": "hang"})).await;
    assert_eq!(ok["output"]["echo"]["after"], "hang", "{ok}");
    let pids = fx.lines("pids");
    assert_eq!(pids.len(), 2);
    assert!(
        !Path::new(&format!("/proc/{}", pids[0])).exists(),
        "the hung child was killed and reaped"
    );
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_dies_at_start_up_shows_unhealthy_without_a_task() {
    // No task comes: the broker restarts the program on its backoff
    // schedule by itself, and health says so once it keeps dying; when it
    // can start again, health comes back, still without a task.
    let fx = Fixture::new();
    std::fs::write(fx.path("fail-at-start"), "").unwrap();
    let server = TestServer::start(fx.config(
        "threads = 1\nrestart_backoff_ms = 50\nrestart_backoff_max_ms = 200\nunhealthy_after = 3",
    ))
    .await;
    server
        .wait_metric("herd_evaluator_healthy{fn=\"py\"}", |v| v == 0.0)
        .await;
    let (_, ready) = server.http_get("/readyz").await;
    assert!(ready.contains("evaluator py unhealthy"), "{ready}");
    assert!(fx.lines("pids").len() >= 3, "restarted without a task");
    std::fs::remove_file(fx.path("fail-at-start")).unwrap();
    // A program that starts and stays up is healthy once it answers.
    let mut c = server.client().await;
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    loop {
        let r = submit(&mut c, json!({"mode": "ok", "back": true})).await;
        if r["output"].is_object() {
            break;
        }
        // Refused during a backoff; each submit is a round trip.
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {r}"
        );
    }
    server
        .wait_metric("herd_evaluator_healthy{fn=\"py\"}", |v| v == 1.0)
        .await;
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_failing_at_start_up_backs_off_and_recovers() {
    let fx = Fixture::new();
    std::fs::write(fx.path("fail-at-start"), "").unwrap();
    let server = TestServer::start(fx.config(
        "threads = 1\nrestart_backoff_ms = 200\nrestart_backoff_max_ms = 400\nunhealthy_after = 2",
    ))
    .await;
    let mut c = server.client().await;
    // Submit for a second while the worker cannot start.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut n = 0;
    while tokio::time::Instant::now() < until {
        let r = submit(&mut c, json!({"mode": "ok", "n": n})).await;
        assert_eq!(r["error"]["code"], "eval_failed", "{r}");
        // Every refusal says what the program said before it died.
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains("\"refusing to start\""), "{r}");
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Backoff: far fewer starts than tasks (two at once, then 200 ms, then
    // 400 ms between tries).
    let starts = fx.lines("pids").len();
    assert!(n >= 10, "{n} submits");
    assert!(
        (2..=6).contains(&starts),
        "{starts} start attempts for {n} tasks"
    );
    let (_, ready) = server.http_get("/readyz").await;
    assert!(ready.contains("evaluator py unhealthy"), "{ready}");
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains("herd_evaluator_healthy{fn=\"py\"} 0"),
        "{metrics}"
    );

    std::fs::remove_file(fx.path("fail-at-start")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = submit(&mut c, json!({"mode": "ok", "recovered": n})).await;
        if r["output"].is_object() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {r}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, ready) = server.http_get("/readyz").await;
    assert_eq!(ready, "ready\n");
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains("herd_evaluator_healthy{fn=\"py\"} 1"),
        "{metrics}"
    );
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_python_example_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cfg = herd::Config::load(&root.join("config/python-worker.toml")).unwrap();
    cfg.evaluators[0].cwd = Some(root.to_path_buf());
    cfg.evaluators[0].threads = 2;
    let server = TestServer::start(cfg).await;
    let mut c = server.client().await;
    c.send(json!({"op": "submit", "input": {"text": "the quick brown fox"}}))
        .await;
    let r = c.recv_type("result").await;
    assert_eq!(
        r["output"],
        json!({"characters": 19, "words": 4, "longest": "quick"})
    );
    c.send(json!({"op": "submit", "input": 5})).await;
    let r = c.recv_type("result").await;
    assert_eq!(r["output"]["characters"], 1);
    server.stop().await;
}

/// Whether a process is still there (a zombie waiting to be reaped is not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

/// Waits (bounded) until process `pid` is gone.
async fn wait_gone(pid: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    while alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "grandchild {pid} {what}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_never_reads_is_killed_with_its_group() {
    let fx = Fixture::new();
    // The child leaves a grandchild holding its pipes, then never reads stdin.
    let script = r#"sleep 600 & echo $! >> "$GRANDPIDS"; echo $$ >> "$PIDFILE"; exec sleep 600"#;
    let server = TestServer::start(config(&format!(
        r#"
[[evaluator]]
fn = "py"
kind = "process"
command = ["sh", "-c", {script:?}]
env = {{ PIDFILE = {pids:?}, GRANDPIDS = {grand:?} }}
threads = 1
timeout_ms = 500
grace_ms = 100
"#,
        pids = fx.path("pids").display().to_string(),
        grand = fx.path("grandpids").display().to_string(),
    )))
    .await;
    let mut c = server.client().await;
    // More than a pipe holds: writing it blocks until someone reads.
    let big = json!({"pad": "x".repeat(256 * 1024)});
    assert_eq!(submit(&mut c, big).await["error"]["code"], "eval_timeout");
    // The one thread is free again: the next task reaches a new child.
    let next = submit(&mut c, json!({"small": 1})).await;
    assert_eq!(next["error"]["code"], "eval_timeout", "{next}");
    assert!(fx.lines("pids").len() >= 2, "a second child was started");
    let grandchildren = fx.lines("grandpids");
    assert!(!grandchildren.is_empty());
    wait_gone(&grandchildren[0], "outlived its group").await;
    server.stop().await;
    // A SIGKILL is sent before stop returns; the process leaves a moment later.
    for pid in fx.lines("grandpids") {
        wait_gone(&pid, "is still there after the broker stopped").await;
    }
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_a_timeout_never_answers_the_next_task() {
    let fx = Fixture::new();
    // The timeout leaves room for a new child's start-up on a busy machine.
    let server = TestServer::start(fx.config("threads = 1\ntimeout_ms = 1500")).await;
    let mut c = server.client().await;
    let late = submit(&mut c, json!({"mode": "ok", "sleep": 2.5, "n": 1})).await;
    assert_eq!(late["error"]["code"], "eval_timeout");
    let next = submit(&mut c, json!({"mode": "ok", "n": 2})).await;
    assert_eq!(next["output"]["echo"]["n"], 2, "{next}");
    server.stop().await;
    fx.assert_no_children_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_start_with_the_broker() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config("threads = 3")).await;
    // No task yet: each thread has started its child all the same.
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    while fx.lines("pids").len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "children started: {:?}",
            fx.lines("pids")
        );
        tokio::task::yield_now().await;
    }
    let r = submit(&mut server.client().await, json!({"mode": "ok"})).await;
    assert!(r["output"].is_object());
    assert_eq!(fx.lines("pids").len(), 3, "the task used a running child");
    server.stop().await;
    fx.assert_no_children_left();
}
