//! The JavaScript package (clients/js) against real brokers: its own
//! `node --test` suite, run with the `herd` binary cargo built, and its
//! browser test in headless Chromium. Needs node and
//! `npm ci --prefix clients/js` (the browser test also
//! `npm ci --prefix tests/browser` and /usr/bin/chromium).

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
