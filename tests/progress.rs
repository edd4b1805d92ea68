//! Progress reports, deadlines and priorities over real sessions, with real
//! child processes (tests/workers/test_worker.py) and a real worker
//! session.

mod common;

use common::{config, key_of, Client, TestServer, AGENTS, BASIC};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A directory for the gate files and the children's log of calls.
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

    /// One process evaluator `fn = "py"` running the test worker, with
    /// `threads` children, and `extra` config.
    fn config(&self, threads: usize, extra: &str) -> herd::Config {
        let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/test_worker.py");
        config(&format!(
            r#"
{extra}
[[evaluator]]
fn = "py"
kind = "process"
threads = {threads}
command = ["python3", {worker:?}]
env = {{ CALLS = {calls:?} }}
grace_ms = 500
"#,
            worker = worker.display().to_string(),
            calls = self.path("calls").display().to_string(),
        ))
    }

    /// A named pipe a `gate` or `progress` task waits on.
    fn gate(&self, name: &str) -> String {
        let path = self.path(name);
        if !path.exists() {
            let made = std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap();
            assert!(made.success(), "mkfifo {path:?}");
        }
        path.display().to_string()
    }

    /// Lets the task waiting on gate `name` go on: writing blocks until it
    /// reads, so it is done on a thread of its own.
    fn open(&self, name: &str) {
        let path = self.path(name);
        std::thread::spawn(move || std::fs::write(path, b"go").unwrap());
    }

    /// The keys the children were given, in order.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Every frame up to and including the `result` of request `id`.
async fn until_result(c: &mut Client, id: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let f = c.recv().await;
        let done = f["type"] == "result" && f["id"] == id;
        frames.push(f);
        if done {
            return frames;
        }
    }
}

fn progress_of(frames: &[Value]) -> Vec<(u64, Value)> {
    frames
        .iter()
        .filter(|f| f["type"] == "progress")
        .map(|f| (f["seq"].as_u64().unwrap(), f["data"].clone()))
        .collect()
}

fn steps(seqs: &[u64]) -> Vec<(u64, Value)> {
    seqs.iter().map(|&s| (s, json!({"step": s}))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_s_reports_reach_the_waiters_that_asked_and_a_late_joiner_gets_those_made() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config(2, "")).await;
    let input = json!({"mode": "progress", "reports": 3, "hold_before": 3, "gate": fx.gate("go")});
    let key = key_of("py", &input);
    let submit = |id: &str, progress: bool| json!({"op": "submit", "fn": "py", "id": id, "input": input, "progress": progress});
    // The first waiter asks for progress and sees two reports; the child
    // then waits for the gate.
    let mut first = server.client().await;
    first.send(submit("a", true)).await;
    let accepted = first.recv().await;
    assert_eq!(
        (accepted["type"].as_str(), accepted["priority"].as_u64()),
        (Some("accepted"), Some(5)),
        "{accepted}"
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let f = first.recv().await;
        assert_eq!(f["type"], "progress", "{f}");
        assert_eq!(
            (f["id"].as_str(), f["key"].as_str()),
            (Some("a"), Some(&*key))
        );
        seen.push((f["seq"].as_u64().unwrap(), f["data"].clone()));
    }
    assert_eq!(seen, steps(&[1, 2]));
    // A waiter without progress, and a late joiner that asks for it.
    let mut quiet = server.client().await;
    quiet.send(submit("q", false)).await;
    assert_eq!(quiet.recv().await["type"], "accepted");
    let mut late = server.client().await;
    late.send(submit("l", true)).await;
    let accepted = late.recv().await;
    assert_eq!(
        (accepted["type"].as_str(), accepted["first"].as_bool()),
        (Some("accepted"), Some(false))
    );
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let f = late.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["id"].as_str()),
            (Some("progress"), Some("l")),
            "{f}"
        );
        replayed.push((f["seq"].as_u64().unwrap(), f["data"].clone()));
    }
    assert_eq!(
        replayed,
        steps(&[1, 2]),
        "what was reported so far, in order"
    );
    // `get` shows the latest report.
    let status = first.request(json!({"op": "get", "key": key})).await;
    assert_eq!(
        (status["state"].as_str(), &status["progress"]),
        (Some("running"), &json!({"seq": 2, "data": {"step": 2}})),
        "{status}"
    );
    fx.open("go");
    let rest = until_result(&mut first, "a").await;
    assert_eq!(progress_of(&rest), steps(&[3]));
    let rest = until_result(&mut late, "l").await;
    assert_eq!(progress_of(&rest), steps(&[3]));
    let result = rest.last().unwrap();
    assert_eq!(
        (result["source"].as_str(), result["shared"].as_u64()),
        (Some("eval"), Some(3))
    );
    let quiet_frames = until_result(&mut quiet, "q").await;
    assert_eq!(
        quiet_frames.len(),
        1,
        "no progress for a waiter that did not ask: {quiet_frames:?}"
    );
    // Progress is never cached: a later submit gets the result alone.
    let mut after = server.client().await;
    after.send(submit("c", true)).await;
    let hit = after.recv().await;
    assert_eq!(
        (hit["type"].as_str(), hit["source"].as_str()),
        (Some("result"), Some("cache"))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_waiter_s_deadline_answers_it_alone_and_the_evaluation_goes_on() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 1500, "n": "deadline"});
    let mut hurried = server.client().await;
    let mut patient = server.client().await;
    patient
        .send(json!({"op": "submit", "id": "p", "input": input}))
        .await;
    assert_eq!(patient.recv().await["type"], "accepted");
    hurried
        .send(json!({"op": "submit", "id": "h", "input": input, "deadline_ms": 100}))
        .await;
    assert_eq!(hurried.recv().await["type"], "accepted");
    let answer = hurried.recv().await;
    assert_eq!(
        (
            answer["type"].as_str(),
            answer["id"].as_str(),
            answer["error"]["code"].as_str()
        ),
        (Some("result"), Some("h"), Some("deadline_exceeded")),
        "{answer}"
    );
    assert_eq!(answer["key"], key_of("default", &input));
    // The evaluation went on for the other waiter, which got it alone.
    let result = patient.recv().await;
    assert_eq!(
        (
            result["type"].as_str(),
            result["source"].as_str(),
            result["shared"].as_u64()
        ),
        (Some("result"), Some("eval"), Some(1)),
        "{result}"
    );
    assert!(result["output"].is_object());
    // Nothing more reaches the hurried waiter.
    let again = hurried.request(json!({"op": "ping", "id": "ping"})).await;
    assert_eq!(again["type"], "pong");
    // A deadline past the fn's timeout, or a priority out of range, is refused.
    for bad in [
        json!({"op": "submit", "input": 1, "deadline_ms": 60_000}),
        json!({"op": "submit", "input": 1, "deadline_ms": 0}),
        json!({"op": "submit", "input": 1, "priority": 10}),
        json!({"op": "submit", "input": 1, "priority": "high"}),
        json!({"op": "submit", "input": 1, "progress": "yes"}),
    ] {
        let answer = hurried.request(bad.clone()).await;
        assert_eq!(answer["code"], "bad_request", "{bad} → {answer}");
    }
    server.stop().await;
}

/// Holds the one thread of `py` with a gated task, until `open`.
async fn hold_the_thread(fx: &Fixture, c: &mut Client) -> String {
    let input = json!({"mode": "gate", "gate": fx.gate("go"), "n": "blocker"});
    let key = key_of("py", &input);
    c.send(json!({"op": "submit", "fn": "py", "id": "blocker", "input": input}))
        .await;
    assert_eq!(c.recv().await["type"], "accepted");
    // Running: it holds the thread.
    while c.request(json!({"op": "get", "key": key})).await["state"] != "running" {
        tokio::task::yield_now().await;
    }
    key
}

/// Submits `name` to `py` at `priority` and waits for its `accepted`.
async fn queue(c: &mut Client, name: &str, priority: u64) -> (String, Value) {
    let input = json!({"n": name});
    c.send(json!({"op": "submit", "fn": "py", "id": name, "input": input, "priority": priority}))
        .await;
    let accepted = c.recv().await;
    assert_eq!(
        (accepted["type"].as_str(), accepted["id"].as_str()),
        (Some("accepted"), Some(name))
    );
    (key_of("py", &input), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_start_by_priority_and_a_higher_joiner_moves_one_up() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config(1, "")).await;
    let mut c = server.client().await;
    let blocker = hold_the_thread(&fx, &mut c).await;
    let (low, _) = queue(&mut c, "low", 1).await;
    let (mid, _) = queue(&mut c, "mid", 5).await;
    let (high, _) = queue(&mut c, "high", 9).await;
    let (late_low, _) = queue(&mut c, "late-low", 1).await;
    let (lower, _) = queue(&mut c, "lower", 0).await;
    // Another agent joins "low" at 9: it starts before "mid".
    let mut urgent = server.client().await;
    let (joined, accepted) = queue(&mut urgent, "low", 9).await;
    assert_eq!(joined, low);
    assert_eq!(
        (accepted["first"].as_bool(), accepted["priority"].as_u64()),
        (Some(false), Some(9)),
        "{accepted}"
    );
    fx.open("go");
    let mut left: Vec<&str> = vec!["blocker", "low", "mid", "high", "late-low", "lower"];
    while !left.is_empty() {
        let f = c.recv_type("result").await;
        assert!(f["output"].is_object(), "{f}");
        left.retain(|id| f["id"] != *id);
    }
    assert_eq!(
        fx.calls(),
        vec![blocker, low, high, mid, late_low, lower],
        "the blocker, then by priority (low inherited 9 and came before high), then arrival"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_s_flood_delays_another_s_job_by_one_job_at_most() {
    let fx = Fixture::new();
    let server = TestServer::start(fx.config(1, AGENTS)).await;
    let mut a = server.client_as("team-a-secret").await;
    let mut b = server.client_as("team-b-secret").await;
    hold_the_thread(&fx, &mut a).await;
    let mut flood = Vec::new();
    for n in 0..8 {
        flood.push(queue(&mut a, &format!("flood-{n}"), 5).await.0);
    }
    let (single, _) = queue(&mut b, "single", 5).await;
    fx.open("go");
    let frames = until_result(&mut b, "single").await;
    assert!(frames.last().unwrap()["output"].is_object(), "{frames:?}");
    for n in 0..8 {
        until_result(&mut a, &format!("flood-{n}")).await;
    }
    let calls = fx.calls();
    let at = |k: &str| calls.iter().position(|c| c == k);
    let single_at = at(&single).expect("the single job ran");
    let first_flood = at(&flood[0]).expect("the flood ran");
    // The blocker first, then team-a's first queued job and team-b's: one
    // job of the flood at most before it, though eight came first.
    assert!(single_at <= first_flood + 1 && single_at <= 2, "{calls:?}");
    assert_eq!(calls.len(), 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_s_progress_reaches_the_waiters_that_asked() {
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
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 10000
{BASIC}"#
    )))
    .await;
    let mut worker = server.client_as("w").await;
    let serving = worker
        .request(json!({"op": "serve", "fn": "embed", "id": "s"}))
        .await;
    assert_eq!(serving["type"], "serving");
    let mut agent = server.client_as("a").await;
    agent
        .send(json!({"op": "submit", "fn": "embed", "id": "x", "input": "text", "progress": true}))
        .await;
    assert_eq!(agent.recv().await["type"], "accepted");
    let task = worker.recv_type("task").await;
    let id = task["task"].as_str().unwrap();
    for n in 1..=3 {
        worker
            .send(json!({"op": "progress", "task": id, "data": {"done": n * 10}}))
            .await;
    }
    // A report on a task this session does not hold is ignored.
    worker
        .send(json!({"op": "progress", "task": "999999", "data": "nobody's"}))
        .await;
    for n in 1..=3u64 {
        let f = agent.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["seq"].as_u64(), &f["data"]),
            (Some("progress"), Some(n), &json!({"done": n * 10})),
            "{f}"
        );
    }
    worker
        .send(json!({"op": "complete", "task": id, "output": [1, 2]}))
        .await;
    let result = agent.recv().await;
    assert_eq!(
        (result["type"].as_str(), &result["output"]),
        (Some("result"), &json!([1, 2])),
        "{result}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_submit_that_accepts_event_streams_gets_progress_then_its_result() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 400, "progress": 3, "n": "sse"});
    let body = json!({"input": input}).to_string();
    let url = format!("http://{}/v1/submit", server.addr);
    let curl = tokio::process::Command::new("curl")
        .args([
            "-N",
            "-s",
            "-H",
            "Accept: text/event-stream",
            "-d",
            &body,
            &url,
        ])
        .output();
    let out = tokio::time::timeout(common::FRAME_WAIT, curl)
        .await
        .expect("the stream ends after its result")
        .expect("curl runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let field = |name: &str| {
                e.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let data = serde_json::from_str(&field("data:")).unwrap();
            (field("event:"), data)
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["progress", "progress", "progress", "result"],
        "{text}"
    );
    for (n, (_, data)) in events.iter().take(3).enumerate() {
        let n = n as u64 + 1;
        assert_eq!(
            (data["seq"].as_u64(), &data["data"]),
            (Some(n), &json!({"step": n, "of": 3})),
            "{data}"
        );
        assert_eq!(data["key"], key_of("default", &input));
    }
    let result = &events[3].1;
    assert_eq!(result["source"], "eval", "{result}");
    assert!(result["output"].is_object(), "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_worker_is_given_tasks_by_priority_then_namespaces_in_turn() {
    let server = TestServer::start(config(&format!(
        r#"
[[token]]
name = "w"
role = "worker"
secret = "w"
namespace = "*"
{AGENTS}
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 10000
{BASIC}"#
    )))
    .await;
    let (mut a, mut b) = (
        server.client_as("team-a-secret").await,
        server.client_as("team-b-secret").await,
    );
    let submit = |name: &str, priority: u64| json!({"op": "submit", "fn": "embed", "id": name, "input": {"n": name}, "priority": priority});
    // Queued before any worker serves: a flood of team-a at 5, one team-b
    // job at 5, one team-a job at 1, and one at 9 last of all.
    for n in 0..3 {
        a.send(submit(&format!("a{n}"), 5)).await;
        assert_eq!(a.recv().await["type"], "accepted");
    }
    b.send(submit("b0", 5)).await;
    assert_eq!(b.recv().await["type"], "accepted");
    a.send(submit("low", 1)).await;
    assert_eq!(a.recv().await["type"], "accepted");
    b.send(submit("urgent", 9)).await;
    assert_eq!(b.recv().await["type"], "accepted");
    let mut worker = server.client_as("w").await;
    let serving = worker
        .request(json!({"op": "serve", "fn": "embed", "id": "s", "concurrency": 1}))
        .await;
    assert_eq!(serving["type"], "serving");
    let mut order = Vec::new();
    for _ in 0..6 {
        let task = worker.recv_type("task").await;
        order.push(task["input"]["n"].as_str().unwrap().to_string());
        worker
            .send(json!({"op": "complete", "task": task["task"], "output": 1}))
            .await;
    }
    assert_eq!(order, ["urgent", "a0", "b0", "a1", "a2", "low"]);
    server.stop().await;
}
