//! The dashboard in a real browser: headless Chromium (Debian's `chromium`)
//! driven by playwright-core (tests/browser). Screenshots go to
//! `artifacts/` (kept by CI).
//!
//! Needs `/usr/bin/chromium` and `npm ci --prefix tests/browser`. Without
//! them build.rs marks both tests ignored (cargo's summary says "2
//! ignored"); `.ci/run` installs both and sets HERD_REQUIRE_BROWSER=1, so
//! there the tests always run and a missing browser fails them.

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
