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

/// The page driver (tests/browser/dashboard.mjs) as a child process, its
/// output read a line at a time as it comes.
struct Page {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    reader: std::thread::JoinHandle<Vec<String>>,
}

impl Page {
    fn open(options: &serde_json::Value) -> Page {
        let mut child = Command::new("node")
            .arg(root().join("tests/browser/dashboard.mjs"))
            .arg(options.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let reader = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                seen.push(line);
            }
            seen
        });
        Page {
            child,
            lines,
            reader,
        }
    }

    /// The page's next line, within 30 s.
    async fn next_line(&mut self) -> Option<String> {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the driver to end; it must have succeeded and said `last`
    /// (its output and errors are shown otherwise).
    async fn ends_with(self, last: &str) {
        let Page { child, reader, .. } = self;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let seen = reader.join().unwrap();
        let errors = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{seen:?}\n{errors}");
        assert_eq!(
            seen.last().map(String::as_str),
            Some(last),
            "{seen:?}\n{errors}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn in_flight_rows_come_and_go_and_counters_move() {
    require_browser();
    let server = TestServer::basic().await;
    // Five progress reports while it runs: the row shows the latest.
    let input = json!({"sleep_ms": 2500, "progress": 5, "dashboard": "row"});
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
    Page::open(&options).ends_with("OK").await;
    server.settled_stats().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    herd_no_browser,
    ignore = "needs /usr/bin/chromium and `npm ci --prefix tests/browser`"
)]
async fn a_page_without_a_token_asks_for_one_and_keeps_it_out_of_its_address() {
    require_browser();
    let server = TestServer::start(config(&format!(
        "[[token]]\nname = \"ops\"\nrole = \"viewer\"\nsecret = \"look-only\"\n{BASIC}"
    )))
    .await;
    let options = json!({
        "mode": "token",
        "base": format!("http://{}", server.addr),
        "pageToken": "look-only",
        "screenshot": artifact("dashboard-needs-token.png"),
    });
    let mut page = Page::open(&options);
    assert_eq!(page.next_line().await.as_deref(), Some("ASKED"));
    page.ends_with("OK").await;
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
    let mut page = Page::open(&options);
    assert_eq!(page.next_line().await.as_deref(), Some("CONNECTED"));
    server.stop().await;
    page.ends_with("DISCONNECTED").await;
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
    let mut page = Page::open(&options);
    assert_eq!(page.next_line().await.as_deref(), Some("CONNECTED"));
    redis.signal("-STOP");
    assert_eq!(page.next_line().await.as_deref(), Some("DOWN"));
    redis.signal("-CONT");
    page.ends_with("OK").await;
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
    Page::open(&options).ends_with("OK").await;
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
    let mut page = Page::open(&options);
    assert_eq!(page.next_line().await.as_deref(), Some("READY"));
    let mut worker = server.client().await;
    let r = worker
        .request(json!({"op": "serve", "id": "s", "fn": "embed", "concurrency": 3}))
        .await;
    assert_eq!(r["type"], "serving", "{r}");
    assert_eq!(page.next_line().await.as_deref(), Some("SEEN"));
    drop(worker);
    page.ends_with("OK").await;
    server.stop().await;
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
