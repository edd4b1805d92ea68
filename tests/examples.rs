//! The shipped examples run against a real broker.

mod common;

use common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_example_runs() {
    let server = TestServer::basic().await;
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent.py"))
            .env("HERD_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agent.py failed (it needs `pip install websockets`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "connected as agent to herd/0.1.0");
    assert_eq!(lines.len(), 5, "{stdout}");
    let stats = server.settled_stats().await;
    assert_eq!(stats["evaluations"], 2, "Lyon three times, Oslo once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_remote_worker_example_serves() {
    let server = TestServer::start(common::config(
        "[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\n",
    ))
    .await;
    let mut worker = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/remote_worker.py"
        ))
        .args([&server.url(), "embed", "2"])
        .spawn()
        .unwrap();
    server
        .wait_metric("herd_remote_workers{fn=\"embed\"}", |v| v == 1.0)
        .await;
    let mut agent = server.client().await;
    for n in 0..3 {
        agent
            .send(serde_json::json!({"op": "submit", "id": n, "fn": "embed", "input": {"text": "hello", "n": n}}))
            .await;
    }
    for _ in 0..3 {
        let r = agent.recv_type("result").await;
        assert!(r["output"]["characters"].as_u64().unwrap() > 10, "{r}");
    }
    worker.kill().unwrap();
    worker.wait().unwrap();
    server.stop().await;
}
