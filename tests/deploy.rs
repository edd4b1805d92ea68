//! The deploy kit under deploy/, each part checked by its own tool: the
//! alert rules by `promtool` and by a real Prometheus scraping real
//! brokers on a real redis-server, the Grafana dashboard against what a
//! broker exports, the systemd unit by `systemd-analyze verify`, and the
//! image by podman (built by deploy/image.sh, run as an operator would).
//! Needs the Debian packages prometheus, podman, buildah and runc, which
//! .ci/run installs.

mod common;

use common::cluster::{serve_child, signal, Redis};
use common::http_get;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Runs `program args` and fails with its output unless it succeeds.
fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (is its package installed?): {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_their_tests() {
    let dir = deploy("prometheus");
    run("promtool", &["check", "rules", "herd-rules.yml"], &dir);
    let tested = run("promtool", &["test", "rules", "herd-rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a test that raises it, and a runbook section.
    let rules = std::fs::read_to_string(dir.join("herd-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("herd-rules.test.yml")).unwrap();
    let operations =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap()
            .to_lowercase();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} is not tested"
        );
        assert!(
            operations.contains(&format!("### {}", alert.to_lowercase())),
            "docs/operations.md has no runbook section for {alert}"
        );
    }
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus on loopback, scraping `targets` every second and
/// evaluating deploy/prometheus/herd-rules.yml as often; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            deploy("prometheus/herd-rules.yml"),
            dir.path().join("herd-rules.yml"),
        )
        .unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['herd-rules.yml']\nscrape_configs:\n  - job_name: herd\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus) is installed");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The alerts Prometheus holds now: (name, instance, state).
    async fn alerts(&self) -> BTreeSet<(String, String, String)> {
        // Prometheus takes a moment to listen.
        if tokio::net::TcpStream::connect(self.addr).await.is_err() {
            return BTreeSet::new();
        }
        let (status, body) = http_get(self.addr, "/api/v1/alerts").await;
        if status != 200 {
            return BTreeSet::new();
        }
        let parsed: Value = serde_json::from_str(&body).unwrap_or_default();
        parsed["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let field = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
                let state = a["state"].as_str().unwrap_or("").to_string();
                (field("alertname"), field("instance"), state)
            })
            .collect()
    }

    /// Waits until alert `name` for `instance` is pending (or firing).
    async fn wait_alert(&self, name: &str, instance: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let alerts = self.alerts().await;
            if alerts
                .iter()
                .any(|(n, i, s)| n == name && i == instance && (s == "pending" || s == "firing"))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} for {instance} never went pending; alerts: {alerts:?}"
            );
            // Each look is an HTTP round trip to Prometheus: the pace of polling.
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_raises_the_redis_and_broker_alerts() {
    let mut redis = Redis::start().await;
    let toml = |node: &str| {
        redis.config(
            node,
            "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\n",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, a_addr) = serve_child(&dir, &toml("a"));
    let dir_b = tempfile::tempdir().unwrap();
    let (mut b, b_addr) = serve_child(&dir_b, &toml("b"));
    let prometheus = Prometheus::start(&[&a_addr, &b_addr]);

    // Redis stops answering: both brokers serve alone, the Redis alert
    // goes pending for each.
    let redis_pid = redis.child.as_ref().unwrap().id();
    signal(redis_pid, "-STOP");
    prometheus.wait_alert("HerdRedisUnreachable", &a_addr).await;
    prometheus.wait_alert("HerdRedisUnreachable", &b_addr).await;
    signal(redis_pid, "-CONT");

    // A broker dies: its scrapes fail, the broker-down alert goes pending.
    b.kill().unwrap();
    b.wait().unwrap();
    prometheus.wait_alert("HerdBrokerDown", &b_addr).await;
    drop(a);
    redis.stop();
}

/// Every metric name `text` mentions (`herd_…`, and `up`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("herd_") {
        let start = i + at;
        let before = start.checked_sub(1).map(|b| bytes[b]);
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_query_is_exported() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/herd.json")).unwrap())
            .expect("deploy/grafana/herd.json is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = String::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queried.push_str(target["expr"].as_str().unwrap_or(""));
            queried.push('\n');
        }
    }
    let rules = std::fs::read_to_string(deploy("prometheus/herd-rules.yml")).unwrap();
    queried.push_str(&rules);

    // A family is exported once it has a sample: a clustered broker with a
    // remote fn, past one submit, one cache hit, one busy answer, one
    // session closed and one refused, has one in each.
    let redis = Redis::start().await;
    let server = common::TestServer::start(common::config(&redis.config(
        "a",
        "[limits]\nmax_pending = 1\n[[namespace]]\nname = \"\"\nmax_sessions = 1\n[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\n[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\n",
    )))
    .await;
    server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    let mut c = server.client().await;
    let submit = serde_json::json!({"op": "submit", "id": 1, "input": {"sleep_ms": 1}});
    c.send(submit.clone()).await;
    c.recv_type("result").await;
    c.send(submit).await;
    c.recv_type("result").await;
    let r = c
        .request(serde_json::json!({"op": "subscribe", "id": 2, "key": "0".repeat(32)}))
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let r = c
        .request(serde_json::json!({"op": "subscribe", "id": 3, "key": "1".repeat(32)}))
        .await;
    assert_eq!(r["code"], "busy", "{r}");
    assert_eq!(server.upgrade_status("").await, 429);
    drop(c);
    server
        .wait_metric("herd_closes_total{code=\"1006\"}", |v| v >= 1.0)
        .await;
    let (_, exported) = server.http_get("/metrics").await;
    let samples: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    let mut missing = Vec::new();
    for name in metric_names(&queried) {
        if !samples.contains(&name) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    server.stop().await;
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // verify wants the ExecStart program to exist: the unit is checked with
    // the built binary in place of /usr/local/bin/herd. Any complaint
    // (verify warns of an unknown setting and still exits 0) fails it.
    let unit = std::fs::read_to_string(deploy("herd.service")).unwrap();
    let start = "ExecStart=/usr/local/bin/herd serve --config /etc/herd/herd.toml";
    assert!(unit.contains(start), "{unit}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/herd", env!("CARGO_BIN_EXE_herd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

/// A container's name: the container is removed when this is dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.0]);
    }
}

/// `podman …`, its output whether it succeeded or not.
fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman (Debian package podman) is installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_serves_with_its_tokens_and_drains_on_sigterm() {
    // deploy/image.sh from this checkout, with a release build of its own
    // (a target directory apart from the one cargo test is using).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("deploy/image.sh"))
        .env("CARGO_TARGET_DIR", root.join("target/image"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |name: &str, env: &[&str]| {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "runc",
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        for e in env {
            args.extend(["-e", e]);
        }
        args.push("herd:latest");
        let out = podman(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let name = format!("herd-test-{}", std::process::id());
    let _ = podman(&["rm", "-f", &name]);
    // Removed at the end, or when the test fails half-way.
    let _removed = Container(name.clone());

    // Without its tokens it does not start, and says what is missing.
    run(&name, &[]);
    let waited = podman(&["wait", &name]);
    assert_ne!(String::from_utf8_lossy(&waited.stdout).trim(), "0");
    let logs = podman(&["logs", &name]);
    let said =
        String::from_utf8_lossy(&logs.stderr).to_string() + &String::from_utf8_lossy(&logs.stdout);
    assert!(
        said.contains(
            "environment variable HERD_AGENT_TOKEN is not set: set it to this token's secret"
        ),
        "{said}"
    );
    let _ = podman(&["rm", "-f", &name]);

    // With them it serves on the address given, as a non-root user.
    let port = free_port();
    let listen = format!("HERD_LISTEN=127.0.0.1:{port}");
    run(
        &name,
        &[
            "HERD_AGENT_TOKEN=agent-secret",
            "HERD_VIEWER_TOKEN=viewer-secret",
            &listen,
        ],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the container never listened"
        );
        // Each look is a connection attempt: the pace of polling.
        tokio::task::yield_now().await;
    }
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let mut c = common::Client::connect(&format!("ws://{addr}/ws?token=agent-secret")).await;
    c.send(
        serde_json::json!({"op": "submit", "id": 1, "fn": "echo", "input": {"in": "a container"}}),
    )
    .await;
    let r = c.recv_type("result").await;
    assert_eq!(r["output"]["in"], "a container", "{r}");
    drop(c);
    let config = podman(&[
        "inspect",
        "herd:latest",
        "--format",
        "{{.Config.User}} {{index .Config.Labels \"org.opencontainers.image.version\"}}",
    ]);
    let config = String::from_utf8_lossy(&config.stdout).trim().to_string();
    assert_eq!(config, format!("65532:65532 {}", env!("CARGO_PKG_VERSION")));

    // SIGTERM drains and exits 0.
    let stopped = podman(&["stop", "-t", "30", &name]);
    assert!(stopped.status.success());
    let code = podman(&["inspect", &name, "--format", "{{.State.ExitCode}}"]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    let logs = podman(&["logs", &name]);
    assert!(String::from_utf8_lossy(&logs.stderr).contains("stopped"));
}
