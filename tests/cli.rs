//! The `herd` binary's client subcommands and benchmark, against a real broker.

mod common;

use common::{key_of, TestServer};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `herd ARGS` against `server` (off the async runtime), feeding `stdin`.
async fn run(server: &TestServer, args: &[&str], stdin: Option<&str>) -> Output {
    let url = server.url();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(&args)
            .env("HERD_URL", url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_get_subscribe_and_exit_codes() {
    let server = TestServer::basic().await;
    let out = run(&server, &["submit", r#"{"sleep_ms":1,"c":1}"#], None).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let result = &lines(&out)[0];
    let key = key_of("default", &json!({"sleep_ms": 1, "c": 1}));
    assert_eq!(result["key"], key);
    assert_eq!(result["source"], "eval");
    assert!(result["output"].is_object());

    let out = run(&server, &["get", &key], None).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(lines(&out)[0]["state"], "done");
    assert_eq!(lines(&out)[0]["output"], result["output"]);

    let out = run(
        &server,
        &["submit", r#"{"fail":"nope","sleep_ms":1}"#],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lines(&out)[0]["error"]["code"], "eval_failed");

    let out = run(&server, &["submit", "{not json"], None).await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(&server, &["submit", "--fn", "missing", "1"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lines(&out)[0]["error"]["code"], "unknown_fn");
    let out = run(
        &server,
        &["submit", "--url", "ws://127.0.0.1:1/ws", "1"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    let out = run(
        &server,
        &["submit", "--nowait", r#"{"sleep_ms":200,"c":2}"#],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let accepted = &lines(&out)[0];
    assert_eq!(accepted["first"], true);
    let pending_key = accepted["key"].as_str().unwrap().to_string();
    let out = run(&server, &["subscribe", &pending_key], None).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(lines(&out)[0]["key"], pending_key.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_reads_json_lines_in_order() {
    let server = TestServer::basic().await;
    let input: String = (0..30)
        .map(|n| format!("{{\"sleep_ms\": {}, \"n\": {n}}}\n", (30 - n) * 3))
        .collect();
    let out = run(&server, &["submit", "--fn", "echo", "-"], Some(&input)).await;
    assert_eq!(out.status.code(), Some(0));
    let results = lines(&out);
    assert_eq!(results.len(), 30);
    for (n, r) in results.iter().enumerate() {
        assert_eq!(r["output"]["n"], n, "results come out in input order");
    }
    let out = run(&server, &["submit", "-"], Some("{\"ok\":1}\nnope\n")).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(lines(&out).len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_live_lines() {
    let server = TestServer::basic().await;
    let lines = watch_lines(&server, 3).await;
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("conns 1 | submits 0"), "{}", lines[0]);
    server.stop().await;

    // A remote fn no worker serves is the first thing said.
    let server = TestServer::start(common::config(&format!(
        "{}[[evaluator]]\nfn = \"embed\"\nkind = \"remote\"\n",
        common::BASIC
    )))
    .await;
    let line = &watch_lines(&server, 1).await[0];
    assert!(line.starts_with("fn embed: no_workers | conns 1"), "{line}");
    server.stop().await;
}

/// The first `n` lines `herd watch` prints about `server`.
async fn watch_lines(server: &TestServer, n: usize) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["watch", "--interval-ms", "100"])
        .env("HERD_URL", server.url())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(n)
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bench_scenario_reports_its_fields() {
    let server = TestServer::basic().await;
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id().to_string();
    let scenarios: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "agents",
                "--fn",
                "default",
                "--submits",
                "300",
                "--distinct",
                "40",
                "--agents",
                "4",
                "--inflight",
                "8",
            ],
            vec![
                "submits",
                "distinct_keys",
                "evaluations",
                "coalesced",
                "cache_hits",
                "wall_s",
                "throughput",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "overhead_p50_ms",
                "overhead_p99_ms",
            ],
        ),
        (
            vec![
                "burst",
                "--fn",
                "default",
                "--sessions",
                "5",
                "--rounds",
                "3",
            ],
            vec!["rounds", "evaluations", "spread_p50_ms", "spread_p99_ms"],
        ),
        (
            vec![
                "hits",
                "--fn",
                "default",
                "--warm",
                "50",
                "--sessions",
                "4",
                "--depth",
                "4",
                "--duration-s",
                "0.5",
            ],
            vec!["hits_per_s", "p50_ms", "p99_ms", "cpu_s_per_m", "depth"],
        ),
        (
            vec![
                "hits",
                "--fn",
                "default",
                "--warm",
                "50",
                "--sessions",
                "4",
                "--pipeline",
                "8",
                "--duration-s",
                "0.5",
            ],
            vec!["hits_per_s", "p50_ms", "p99_ms", "cpu_s_per_m", "pipeline"],
        ),
        (
            vec!["fanout", "--fn", "default", "--subscribers", "40"],
            vec![
                "subscribers",
                "delivered",
                "first_ms",
                "p50_ms",
                "p99_ms",
                "last_ms",
            ],
        ),
        (
            vec!["idle", "--sessions", "30", "--hold-s", "1"],
            vec![
                "sessions",
                "rss_before_mb",
                "rss_after_mb",
                "kib_per_session",
            ],
        ),
    ];
    for (args, fields) in scenarios {
        let file = dir.path().join(format!("{}.json", args[0]));
        let mut all = vec![
            "bench",
            "--pid",
            &pid,
            "--seed",
            "7",
            "--json",
            file.to_str().unwrap(),
        ];
        all.extend(args.iter());
        let out = run(&server, &all, None).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("herd bench {}", args[0])));
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        // With --pid every scenario reports the broker's CPU and memory.
        for field in fields
            .iter()
            .chain(&["broker_cpu_s", "broker_rss_mb", "seed"])
        {
            assert!(
                report[field].is_number(),
                "{}: {field} in {report}",
                args[0]
            );
        }
        assert_eq!(report["seed"], 7);
        match args[0] {
            "agents" => assert_eq!(report["evaluations"], report["distinct_keys"]),
            "burst" => assert_eq!(report["evaluations"], 3),
            "fanout" => assert_eq!(report["delivered"], 40),
            "hits" => {
                assert_eq!(report["misses"], 0);
                // Batches of `--pipeline` are answered whole.
                if let Some(batch) = report["pipeline"].as_u64() {
                    assert_eq!(report["hits"].as_u64().unwrap() % batch, 0, "{report}");
                }
            }
            _ => {}
        }
    }
    // Inputs follow the seed: the same fanout again would find its key cached,
    // and the same agents run says it measures cache hits.
    let again = run(
        &server,
        &[
            "bench",
            "--seed",
            "7",
            "fanout",
            "--fn",
            "default",
            "--subscribers",
            "5",
        ],
        None,
    )
    .await;
    assert_ne!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cached"));
    let small_agents = [
        "agents",
        "--fn",
        "default",
        "--submits",
        "20",
        "--distinct",
        "5",
        "--agents",
        "2",
        "--inflight",
        "2",
    ];
    let mut same = vec!["bench", "--seed", "7"];
    same.extend(small_agents);
    let again = run(&server, &same, None).await;
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cached"));
    // Without --seed each run draws new inputs: nothing is cached yet.
    let mut fresh = vec!["bench"];
    fresh.extend(small_agents);
    let fresh = run(&server, &fresh, None).await;
    assert_eq!(fresh.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&fresh.stderr).contains("already cached"));
    server.stop().await;
}

/// Runs `herd ARGS` with no HERD_URL in its environment.
async fn run_plain(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(&args)
            .env_remove("HERD_URL")
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_options_work_before_or_after_the_scenario() {
    let server = TestServer::basic().await;
    let url = server.url();
    let scenario = [
        "--fn",
        "default",
        "--submits",
        "10",
        "--distinct",
        "3",
        "--agents",
        "1",
        "--inflight",
        "1",
    ];
    let mut after = vec!["bench", "agents", "--url", &url];
    after.extend(scenario);
    let out = run_plain(&after, &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut before = vec!["bench", "--url", &url, "agents"];
    before.extend(scenario);
    let out = run_plain(&before, &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_opens_no_more_sessions_than_the_descriptors_allow() {
    let server = TestServer::basic().await;
    let pid = std::process::id().to_string();
    let herd = env!("CARGO_BIN_EXE_herd");
    let script = format!(
        "ulimit -n 200 && exec {herd} bench --url {} --pid {pid} --json /dev/stdout idle --sessions 1000 --hold-s 0",
        server.url()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh").args(["-c", &script]).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("instead of 1000"));
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text.find('{').expect("the JSON report");
    let report: Value = serde_json::from_str(text[json_start..].trim()).unwrap();
    assert_eq!(report["sessions_asked"], 1000);
    assert_eq!(report["sessions"], 136, "200 descriptors less 64 to spare");
    assert!(report["kib_per_session"].is_number(), "{report}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_clear_line_with_the_right_exit_code() {
    // A bad config: one line, no stack trace, whatever RUST_BACKTRACE says.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "nope = 1\n").unwrap();
    let out = run_plain(
        &["serve", "--config", bad.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("herd:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("unknown field"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");

    // A config error says where: line, column, table, and the line itself.
    let located = [
        (
            "[limits]\nmax_pending = 10\n[[evaluator]]\nfn = \"a\"\nkind = \"echo\"\n[[evaluator]]\nfn = \"b\"\ntimeout_ms = \"30s\"\n",
            ["line 8", "[[evaluator]] #2", "timeout_ms = \"30s\""],
        ),
        (
            "[limits]\nmax_pending = 10\nmax_frame_bytes = big\n",
            ["line 3", "[limits]", "max_frame_bytes = big"],
        ),
    ];
    for (text, says) in located {
        std::fs::write(&bad, text).unwrap();
        let out = run_plain(&["serve", "--config", bad.to_str().unwrap()], &[]).await;
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("herd:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        for part in says {
            assert!(lines[0].contains(part), "{part} missing from {stderr}");
        }
    }

    // A config error never prints a secret: not a token's, not one under a
    // mistyped key, not a Redis password (in the URL or as `?pass=`).
    let secret_lines = [
        "[[token]]\nname = \"a\"\nrole = \"agent\"\nsecret = \"tokA-unterminated\n",
        "[[token]]\nname = \"a\"\nrole = \"agent\"\nsecrte = \"tokA-mistyped\"\n",
        "[cluster]\nredis = redis://:tokA-password@127.0.0.1:6379/0\n",
        "[cluster]\nredis = \"redis+unix:///tmp/herd-no.sock?db=x&pass=tokA-query\"\n",
    ];
    for text in secret_lines {
        std::fs::write(&bad, text).unwrap();
        let out = run_plain(&["serve", "--config", bad.to_str().unwrap()], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("herd:"), "{stderr}");
        assert!(!stderr.contains("tokA-"), "a secret printed: {stderr}");
    }

    // `herd invalidate` without what to drop names both ways of saying it.
    let out = run_plain(&["invalidate"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--key") && stderr.contains("--fn"),
        "{stderr}"
    );

    // Only viewers and workers may span every namespace.
    for role in ["agent", "admin"] {
        let text = format!(
            "[[token]]\nname = \"wide\"\nrole = \"{role}\"\nsecret = \"s\"\nnamespace = \"*\"\n"
        );
        std::fs::write(&bad, text).unwrap();
        let out = run_plain(&["serve", "--config", bad.to_str().unwrap()], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{role}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("token \"wide\"") && stderr.contains("namespace \"*\""),
            "{stderr}"
        );
    }

    // The page's URL instead of /ws: said so, with the way out.
    let server = TestServer::start(common::config(&format!(
        "[limits]\nmax_frame_bytes = 4096\n[[token]]\nname = \"a\"\nrole = \"agent\"\nsecret = \"s3cret\"\n{}",
        common::BASIC
    )))
    .await;
    let page = format!("ws://{}/", server.addr);
    let out = run_plain(&["submit", "--url", &page, "--token", "s3cret", "1"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a WebSocket endpoint"), "{stderr}");
    assert!(stderr.contains("/ws"), "{stderr}");

    // A wrong token is a refusal (exit 1), not an unreachable broker (exit 2).
    let out = run_plain(
        &["submit", "--url", &server.url(), "--token", "wrong", "1"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));

    // An input larger than the broker takes, on stdin: refused before it is
    // sent, naming the limit, as a refusal (exit 1) with a protocol code.
    let big = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(10_000));
    let out = tokio::task::spawn_blocking({
        let url = server.url();
        move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
                .args(["submit", "--url", &url, "--token", "s3cret", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(big.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["error"]["code"], "bad_request", "{said}");
    let message = said["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_frame_bytes") && message.contains("4096"),
        "{said}"
    );

    // An http:// URL: told to use ws://, with the path.
    let http = format!("http://{}/", server.addr);
    let out = run_plain(&["get", "--url", &http, "--token", "s3cret", "k"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("use ws://{}/ws", server.addr)),
        "{stderr}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!said.contains("Some("), "{said}");
    server.stop().await;
}

#[tokio::test]
async fn hits_against_redis_says_when_no_redis_server_answers() {
    let server = TestServer::start(common::config(common::BASIC)).await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        run_plain(
            &[
                "bench",
                "--url",
                &server.url(),
                "hits",
                "--redis",
                "--redis-port",
                &port,
                "--warm",
                "1",
                "--duration-s",
                "0.1",
            ],
            &[],
        ),
    )
    .await
    .expect("herd bench ended instead of waiting for redis");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no redis-server answers on 127.0.0.1:{port}")),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_ends_its_session_with_a_close_frame() {
    // submit, get and subscribe each close with 1000; none leaves the broker
    // to log an abnormal closure (1006).
    let server = TestServer::basic().await;
    let input = r#"{"sleep_ms": 1, "closes": "cleanly"}"#;
    let out = run(&server, &["submit", input], None).await;
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = printed["key"].as_str().unwrap().to_string();
    let out = run(&server, &["get", &key], None).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(&server, &["subscribe", &key], None).await;
    assert!(out.status.success(), "{out:?}");
    server
        .wait_metric("herd_closes_total{code=\"1000\"}", |v| v == 3.0)
        .await;
    assert_eq!(
        server.metric("herd_closes_total{code=\"1006\"}").await,
        None
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_drops_a_key_or_a_fn_from_the_command_line() {
    let server = TestServer::basic().await;
    let input = r#"{"sleep_ms":1,"cli":"invalidate"}"#;
    let key = key_of("default", &json!({"sleep_ms": 1, "cli": "invalidate"}));
    let out = run(&server, &["submit", input], None).await;
    assert_eq!(lines(&out)[0]["source"], "eval");
    let out = run(&server, &["invalidate", "--key", &key], None).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(lines(&out)[0], json!({"key": key, "invalidated": true}));
    let out = run(&server, &["get", &key], None).await;
    assert_eq!(lines(&out)[0]["state"], "unknown");
    let out = run(&server, &["submit", input], None).await;
    assert_eq!(lines(&out)[0]["source"], "eval", "evaluated again");
    let out = run(&server, &["invalidate", "--fn", "default"], None).await;
    assert_eq!(
        lines(&out)[0],
        json!({"fn": "default", "invalidated": true})
    );
    let out = run(&server, &["submit", input], None).await;
    assert_eq!(lines(&out)[0]["source"], "eval", "evaluated again");
    let out = run(&server, &["invalidate", "--fn", "nope"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lines(&out)[0]["error"]["code"], "unknown_fn");
    let out = run(&server, &["invalidate"], None).await;
    assert_eq!(out.status.code(), Some(2), "--key or --fn is required");
    server.stop().await;
}

/// A minimal WebSocket echo server (one task per connection); its URL.
async fn echo_server() -> String {
    use futures::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_echo_measures_the_transport_with_the_hits_client() {
    let url = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echo.json");
    let out = run_plain(
        &[
            "bench",
            "--url",
            &url,
            "--json",
            file.to_str().unwrap(),
            "echo",
            "--frames",
            "20",
            "--sessions",
            "2",
            "--pipeline",
            "4",
            "--duration-s",
            "0.3",
        ],
        &[],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let messages = report["messages"].as_u64().unwrap();
    assert!(messages > 0 && messages % 4 == 0, "{report}");
    assert_eq!(report["others"], 0, "{report}");
    assert!(report["messages_per_s"].is_number(), "{report}");
    assert_eq!(report["pipeline"], 4, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_submit_prints_the_protocol_s_code_and_when_to_retry() {
    let server = TestServer::start(common::config(&format!(
        "[[token]]\nname = \"limited\"\nrole = \"agent\"\nsecret = \"limited-secret\"\nnamespace = \"limited\"\n[[namespace]]\nname = \"limited\"\nsubmits_per_s = 1\n{}",
        common::BASIC
    )))
    .await;
    // A bucket of one submit a second: of three submits in a row, a later
    // one is refused.
    let mut stdout = String::new();
    for input in ["1", "2", "3"] {
        let out = run_plain(
            &[
                "submit",
                "--url",
                &server.url(),
                "--token",
                "limited-secret",
                "--fn",
                "echo",
                input,
            ],
            &[],
        )
        .await;
        stdout.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let limited: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["error"]["code"] == "rate_limited")
        .collect();
    assert!(!limited.is_empty(), "{stdout}");
    for line in limited {
        assert!(line["error"]["retry_after_ms"].as_u64().is_some(), "{line}");
    }
    server.stop().await;
}

#[test]
fn serve_says_which_config_file_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, common::BASIC).unwrap();
    let mut child = common::cluster::serve_logging(&path);
    let stderr = child.stderr.take().unwrap();
    let mut said = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let parsed: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if parsed["fields"]["message"] == "config read" {
            said = parsed["fields"]["path"].as_str().map(String::from);
        }
        if parsed["fields"]["addr"].is_string() {
            break;
        }
    }
    assert_eq!(
        said.as_deref(),
        path.to_str(),
        "the config's path is logged before listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_progress_on_stderr_and_honours_a_deadline() {
    let server = TestServer::basic().await;
    let input = json!({"sleep_ms": 300, "progress": 2, "cli": "progress"});
    let out = run(
        &server,
        &[
            "submit",
            "--progress",
            "--priority",
            "9",
            &input.to_string(),
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let reports: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let key = key_of("default", &input);
    assert_eq!(
        reports,
        [1, 2]
            .map(|n| json!({"key": key, "seq": n, "data": {"step": n, "of": 2}}))
            .to_vec()
    );
    assert_eq!(lines(&out)[0]["source"], "eval");
    let out = run(
        &server,
        &[
            "submit",
            "--deadline-ms",
            "50",
            r#"{"sleep_ms":2000,"cli":"late"}"#,
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(lines(&out)[0]["error"]["code"], "deadline_exceeded");
    server.stop().await;
}
