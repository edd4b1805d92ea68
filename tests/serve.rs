//! `herd serve` as a user runs it: the shipped config, JSON logs, SIGTERM.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// `herd serve` as a child process, with its JSON log lines.
struct Served {
    child: std::process::Child,
    logs: mpsc::Receiver<Value>,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        Served::listening("127.0.0.1:0", args)
    }

    fn listening(listen: &str, args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
            .arg("serve")
            .args(args)
            .args(["--listen", listen, "--log-format", "json"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, logs) = mpsc::channel::<Value>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("log line is not JSON: {line}"));
                if tx.send(parsed).is_err() {
                    return;
                }
            }
        });
        Served { child, logs }
    }

    /// The next log line whose message contains `what`.
    fn next(&self, what: &str) -> Value {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {what}"));
            if line["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(what)
            {
                return line;
            }
        }
    }

    /// The address it listens on, from its log.
    fn addr(&self) -> String {
        let listening = self.next("herd listening");
        listening["fields"]["addr"].as_str().unwrap().to_string()
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[tokio::test]
async fn listen_takes_a_host_name() {
    let served = Served::listening("localhost:0", &[]);
    let addr = served.addr();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let r = result_of(&addr, json!({"op": "submit", "fn": "echo", "input": [1]})).await;
    assert_eq!(r["output"], json!([1]), "{r}");
    served.terminate();
}

/// Sends one request on a fresh session and returns its `result` frame.
async fn result_of(addr: &str, request: Value) -> Value {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws.send(Message::text(request.to_string())).await.unwrap();
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "result" {
                return frame;
            }
        }
    }
    panic!("no result for {request}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_shipped_config_logs_sessions_as_json_and_stops_on_sigterm() {
    let served = Served::start(&[]);
    let next = |what: &str| served.next(what);
    let listening = next("herd listening");
    let addr = listening["fields"]["addr"].as_str().unwrap().to_string();

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let _hello = ws.next().await.unwrap().unwrap();
    let request = json!({"op": "submit", "fn": "sleep", "input": {"from": "serve test"}});
    ws.send(Message::text(request.to_string())).await.unwrap();
    let mut got_result = false;
    while let Some(Ok(Message::Text(text))) = ws.next().await {
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "result" {
            assert!(frame["output"].is_object());
            got_result = true;
            break;
        }
    }
    assert!(got_result);
    let open = next("session open");
    assert_eq!(open["span"]["token"], "anonymous");
    assert!(open["span"]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    ws.close(None).await.unwrap();
    let closed = next("session closed");
    assert_eq!(closed["fields"]["code"], 1000);

    served.terminate();
    next("stopped");
    let mut child = served.child;
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn serve_refuses_a_public_address_without_tokens() {
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("allow_anonymous"))
        .collect();
    assert_eq!(reason.len(), 1, "one line says why: {stderr}");
    assert!(reason[0].contains("non-loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_within_its_drain_bounds_whatever_evaluators_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herd.toml");
    std::fs::write(
        &path,
        r#"
[limits]
drain_timeout_s = 1
close_timeout_ms = 500
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 1
timeout_ms = 200
max_sleep_ms = 120000
"#,
    )
    .unwrap();
    let served = Served::start(&["--config", path.to_str().unwrap()]);
    let addr = served.addr();
    // This evaluation keeps its thread for two minutes, long past its timeout.
    let stuck = result_of(
        &addr,
        json!({"op": "submit", "input": {"sleep_ms": 120000}}),
    )
    .await;
    assert_eq!(stuck["error"]["code"], "eval_timeout");
    served.terminate();
    let mut child = served.child;
    // Bounds: drain (1 s), sessions (1 s + 0.5 s), threads (1 s), plus start-up slack.
    let exit = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("herd serve exits within its drain bounds after SIGTERM")
    .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stderr_line_from_a_child_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herd.toml");
    let worker = dir.path().join("noisy.py");
    std::fs::write(
        &worker,
        "import sys\nfor line in sys.stdin:\n    sys.stderr.write('x' * 100000 + '\\n')\n    sys.stderr.flush()\n    print('{\"output\": 1}', flush=True)\n",
    )
    .unwrap();
    std::fs::write(
        &path,
        format!(
            "[[evaluator]]\nfn = \"default\"\nkind = \"process\"\ncommand = [\"python3\", {:?}]\nthreads = 1\nstderr_line_bytes = 1000\n",
            worker.display().to_string()
        ),
    )
    .unwrap();
    let served = Served::start(&["--config", path.to_str().unwrap()]);
    let addr = served.addr();
    let answered = result_of(&addr, json!({"op": "submit", "input": {"n": 1}})).await;
    assert_eq!(answered["output"], 1);
    let logged = served.next("worker stderr");
    // A program's own stderr is ordinary output, not a warning.
    assert_eq!(logged["level"], "INFO", "{logged}");
    let message = logged["fields"]["message"].as_str().unwrap();
    assert!(message.len() < 1200, "{} bytes logged", message.len());
    assert!(message.contains("99000 more bytes dropped"), "{message}");
    served.terminate();
    let mut child = served.child;
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
}
