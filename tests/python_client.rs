//! The Python package (clients/python) against real brokers: its own pytest
//! suite, run with the `herd` binary cargo built. Needs python3 with
//! `websockets`, `blake3` and `pytest` (`pip install ./clients/python pytest`).

#[test]
fn the_python_package_passes_its_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .current_dir(root)
        .env("HERD_BIN", env!("CARGO_BIN_EXE_herd"))
        .env("PYTHONPATH", format!("{root}/clients/python"))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pytest failed (it needs `pip install ./clients/python pytest`):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed"), "{stdout}");
}
