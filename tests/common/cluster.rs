//! Brokers over a real redis-server of the test's own, in this process or
//! as `herd serve` children.

use super::{config, TestServer};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A redis-server of the test's own.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart().await;
        redis
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) is installed");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + super::FRAME_WAIT;
        loop {
            if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut reply = [0u8; 7];
                if tcp.write_all(b"PING\r\n").await.is_ok()
                    && tcp.read_exact(&mut reply).await.is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::task::yield_now().await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A broker config in this cluster, with `extra` evaluators.
    pub fn config(&self, node: &str, extra: &str) -> String {
        format!(
            "[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nlease_ms = 1000\nredis_timeout_ms = 500\n{extra}",
            self.url()
        )
    }
}

/// What `redis-cli -p PORT ARGS` prints.
/// What Redis holds under `name` once it satisfies `done` (polled until
/// then).
pub async fn wait_redis(port: u16, name: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + super::FRAME_WAIT;
    loop {
        let text = redis_cli(port, &["GET", name]);
        if done(text.trim()) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never held what was expected: {text:?}"
        );
        // Each look is a redis-cli run: the pace of polling.
        tokio::task::yield_now().await;
    }
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub const SIMULATE: &str = r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 16
max_sleep_ms = 5000
"#;

pub async fn broker(redis: &Redis, node: &str) -> TestServer {
    broker_with(&redis.config(node, SIMULATE)).await
}

pub async fn broker_with(toml: &str) -> TestServer {
    let server = TestServer::start(config(toml)).await;
    server.wait_metric("herd_cluster_up", |v| v == 1.0).await;
    server
}

pub async fn evaluations(servers: &[&TestServer]) -> u64 {
    let mut total = 0;
    for s in servers {
        total += s.settled_stats().await["evaluations"].as_u64().unwrap();
    }
    total
}

/// `herd serve` as a child process in the cluster; returns it and its address.
/// A broker process, killed when dropped (a failed test leaves none
/// behind holding the test runner's output open).
pub struct Broker(pub Child);

impl std::ops::Deref for Broker {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Broker {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `herd serve`'s arguments for a test broker on a free port of 127.0.0.1
/// logging JSON lines, up to its config file's path.
pub const SERVE_ARGS: [&str; 6] = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--log-format",
    "json",
    "--config",
];

/// `herd serve` of the config file at `path` (see [`SERVE_ARGS`]), its
/// stderr piped for the test to read.
pub fn serve_logging(path: &std::path::Path) -> Broker {
    Broker(
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(SERVE_ARGS)
            .arg(path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

pub fn serve_child(dir: &tempfile::TempDir, toml: &str) -> (Broker, String) {
    serve_child_under(dir, toml, &[])
}

/// [`serve_child`] run by a wrapper command (`wrapper` then herd's own
/// command line), such as `prlimit --nofile=256:256 --`.
pub fn serve_child_under(
    dir: &tempfile::TempDir,
    toml: &str,
    wrapper: &[&str],
) -> (Broker, String) {
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, toml).unwrap();
    let herd = env!("CARGO_BIN_EXE_herd");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(herd);
            command
        }
        None => Command::new(herd),
    };
    let mut child = command
        .args(SERVE_ARGS)
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("herd serve logs").unwrap();
        let parsed: Value = serde_json::from_str(&line).unwrap();
        if let Some(addr) = parsed["fields"]["addr"].as_str() {
            break addr.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Broker(child), addr)
}

/// Sends SIGSTOP or SIGCONT to a process.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
