//! The JavaScript package (clients/js) against real brokers: its own
//! `node --test` suite, run with the `herd` binary cargo built, and its
//! browser test in headless Chromium. Needs node and
//! `npm ci --prefix clients/js` (the browser test also
//! `npm ci --prefix tests/browser` and /usr/bin/chromium).

mod common;

#[test]
fn the_javascript_package_passes_its_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("node")
        .args(["--test", "clients/js/test/"])
        .current_dir(root)
        .env("HERD_BIN", env!("CARGO_BIN_EXE_herd"))
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test failed (it needs `npm ci --prefix clients/js`):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
}

/// The install command README.md and clients/js/README.md give, run from a
/// project of the user's own elsewhere.
const INSTALL: [&str; 2] = ["install", "--install-links"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_into_a_project_elsewhere_and_talks_to_a_broker() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for readme in ["README.md", "clients/js/README.md"] {
        let text = std::fs::read_to_string(root.join(readme)).unwrap();
        assert!(
            text.contains("npm install --install-links "),
            "{readme} gives the command this test runs"
        );
    }
    let project = tempfile::tempdir().unwrap();
    let npm = |args: &[&str]| {
        let out = std::process::Command::new("npm")
            .args(args)
            .args(["--prefer-offline", "--no-audit", "--no-fund"])
            .current_dir(project.path())
            .output()
            .expect("npm runs");
        assert!(
            out.status.success(),
            "npm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        project.path().join("package.json"),
        r#"{"name": "my-agent", "version": "1.0.0", "private": true}"#,
    )
    .unwrap();
    let package = root.join("clients/js").display().to_string();
    npm(&[INSTALL[0], INSTALL[1], &package]);
    // A copy with its dependencies beside it, not a link into the checkout
    // (whose own node_modules a fresh clone does not have).
    let installed = project.path().join("node_modules/herd-client");
    assert!(!installed.symlink_metadata().unwrap().is_symlink());
    assert!(project.path().join("node_modules/@noble/hashes").is_dir());

    let server = common::TestServer::basic().await;
    std::fs::write(
        project.path().join("main.mjs"),
        r#"import { connect, key } from "herd-client";
const herd = await connect(process.argv[2]);
const output = await herd.submit({ from: "elsewhere" }, { fn: "echo" });
console.log(JSON.stringify({ output, key: key({ from: "elsewhere" }, "echo") }));
herd.close();
"#,
    )
    .unwrap();
    let out = tokio::process::Command::new("node")
        .args(["main.mjs", &server.url()])
        .current_dir(project.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let input = serde_json::json!({"from": "elsewhere"});
    assert_eq!(printed["output"], input);
    assert_eq!(printed["key"], common::key_of("echo", &input));
    server.stop().await;
}
