//! The dashboard in a real browser: headless Chromium (Debian's `chromium`)
//! driven by playwright-core (tests/browser). Screenshots go to
//! `artifacts/` (kept by CI).
//!
//! Needs `/usr/bin/chromium` and `npm ci --prefix tests/browser`. Without
//! them build.rs marks these tests ignored (cargo's summary counts them
//! as ignored); `.ci/run` installs both and sets HERD_REQUIRE_BROWSER=1, so
//! there the tests always run and a missing browser fails them. The
//! cluster page test also needs `redis-server`.

mod common;

use common::{config, key_of, TestServer, BASIC};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test when the browser or its driver is missing.
fn require_browser() {
    let ready = Path::new("/usr/bin/chromium").exists()
        && root()
            .join("tests/browser/node_modules/playwright-core")
            .exists();
    assert!(
        ready,
        "the browser test needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
    );
}

fn artifact(name: &str) -> PathBuf {
    let dir = root().join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn node(options: &serde_json::Value) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(root().join("tests/browser/dashboard.mjs"))
        .arg(options.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn run_to_end(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn in_flight_rows_come_and_go_and_counters_move() {
    require_browser();
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 2500, "dashboard": "row"});
    let options = json!({
        "mode": "inflight",
        "base": format!("http://{}", server.addr),
        "wsUrl": server.url(),
        "herd": env!("CARGO_BIN_EXE_herd"),
        "input": input.to_string(),
        "key": key_of("default", &input),
        "expectRole": "agent",
        "screenshot": artifact("dashboard-inflight.png"),
    });
    let out = run_to_end(node(&options)).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn a_viewer_sees_the_broker_go_away() {
    require_browser();
    let server = TestServer::start(config(&format!(
        "[[token]]\nname = \"ops\"\nrole = \"viewer\"\nsecret = \"look-only\"\n{BASIC}"
    )))
    .await;
    let options = json!({
        "mode": "disconnect",
        "base": format!("http://{}", server.addr),
        "pageToken": "look-only",
        "expectRole": "viewer",
        "screenshot": artifact("dashboard-disconnected.png"),
    });
    let mut child = node(&options).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut tx = Some(tx);
        let mut seen = Vec::new();
        for line in lines.by_ref().map_while(Result::ok) {
            if line == "CONNECTED" {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
            seen.push(line);
        }
        seen
    });
    tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("the page connected")
        .unwrap();
    server.stop().await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let seen = reader.join().unwrap();
    assert!(status.success(), "{seen:?}");
    assert!(seen.contains(&"DISCONNECTED".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn a_clustered_broker_s_page_shows_its_pub_sub_health() {
    require_browser();
    let redis = RedisServer::start();
    let server = TestServer::start(config(&format!(
        "[cluster]\nredis = \"redis://127.0.0.1:{}/\"\nlease_ms = 1000\nredis_timeout_ms = 500\n{BASIC}",
        redis.port
    )))
    .await;
    server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    // A second broker on the same Redis evaluates one key.
    let other = TestServer::start(config(&format!(
        "[cluster]\nredis = \"redis://127.0.0.1:{}/\"\nlease_ms = 1000\nredis_timeout_ms = 500\n{BASIC}",
        redis.port
    )))
    .await;
    other.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    let mut agent = other.client().await;
    let r = agent
        .request(json!({"op": "submit", "id": 1, "input": {"sleep_ms": 1, "page": "cluster"}}))
        .await;
    assert_eq!(r["type"], "accepted", "{r}");
    agent.recv_type("result").await;
    let options = json!({
        "mode": "cluster",
        "base": format!("http://{}", server.addr),
        "screenshot": artifact("dashboard-cluster-pubsub-down.png"),
        "clusterScreenshot": artifact("dashboard-cluster.png"),
    });
    let mut child = node(&options).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            seen.push(line);
        }
        seen
    });
    assert_eq!(next_line(&mut rx).await.as_deref(), Some("CONNECTED"));
    redis.signal("-STOP");
    assert_eq!(next_line(&mut rx).await.as_deref(), Some("DOWN"));
    redis.signal("-CONT");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let seen = reader.join().unwrap();
    assert!(status.success(), "{seen:?}");
    assert!(seen.contains(&"OK".to_string()), "{seen:?}");
    server.stop().await;
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn a_page_opened_after_a_burst_shows_it() {
    require_browser();
    let server = TestServer::basic().await;
    let burst = 300;
    let mut agent = server.client().await;
    for n in 0..burst {
        agent
            .send(json!({"op": "submit", "id": n, "fn": "echo", "input": {"burst": n}}))
            .await;
    }
    for _ in 0..burst {
        agent.recv_type("result").await;
    }
    // The broker samples its counters once a second: a watch's first
    // snapshot carries them, once a sample after the burst is taken; the
    // snapshots after it do not.
    loop {
        let mut watch = server.client().await;
        watch.send(json!({"op": "watch", "interval_ms": 100})).await;
        let first = watch.recv_type("snapshot").await;
        let samples = first["history"].as_array().expect("history").clone();
        let second = watch.recv_type("snapshot").await;
        assert!(second.get("history").is_none(), "{second}");
        if samples.last().is_some_and(|s| s[1] == burst) && samples[0][1] == 0 {
            break;
        }
    }
    let options = json!({
        "mode": "history",
        "base": format!("http://{}", server.addr),
        "minRate": 50,
        "screenshot": artifact("dashboard-history.png"),
    });
    let out = run_to_end(node(&options)).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn a_worker_s_row_comes_when_it_serves_and_goes_when_it_leaves() {
    require_browser();
    let server = TestServer::start(config(&format!(
        "{BASIC}[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\n"
    )))
    .await;
    let options = json!({
        "mode": "workers",
        "base": format!("http://{}", server.addr),
        "fn": "embed",
        "concurrency": 3,
        "screenshot": artifact("dashboard-workers.png"),
    });
    let mut child = node(&options).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            seen.push(line);
        }
        seen
    });
    assert_eq!(next_line(&mut rx).await.as_deref(), Some("READY"));
    let mut worker = server.client().await;
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 3}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    assert_eq!(next_line(&mut rx).await.as_deref(), Some("SEEN"));
    drop(worker);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let seen = reader.join().unwrap();
    assert!(status.success(), "{seen:?}");
    assert!(seen.contains(&"OK".to_string()), "{seen:?}");
    server.stop().await;
}

/// The page's next line, within 30 s.
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
        .await
        .ok()
        .flatten()
}

/// A redis-server of the test's own on a free port, killed when dropped.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) is installed");
        let deadline = std::time::Instant::now() + common::FRAME_WAIT;
        loop {
            let pong = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "ping"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&pong.stdout).contains("PONG") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
        }
        RedisServer { child, port }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
