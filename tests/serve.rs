//! `herd serve` as a user runs it: the shipped config, JSON logs, SIGTERM.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_shipped_config_logs_sessions_as_json_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
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
    let next = |what: &str| -> Value {
        loop {
            let line = rx
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
    };
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

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    next("stopped");
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
