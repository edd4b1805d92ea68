//! Tells the dashboard tests whether a browser is at hand. Without Debian's
//! chromium and playwright-core (`npm ci --prefix tests/browser`) they are
//! compiled as ignored, so `cargo test` counts them as ignored, not passed;
//! with `HERD_REQUIRE_BROWSER` set (CI) they always run, and fail if the
//! browser is missing.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(herd_no_browser)");
    println!("cargo::rerun-if-env-changed=HERD_REQUIRE_BROWSER");
    println!("cargo::rerun-if-changed=build.rs");
    // Directories that exist either way: installing the browser or the
    // driver changes them, and the check runs again.
    for watched in ["/usr/bin", "tests/browser"] {
        if Path::new(watched).exists() {
            println!("cargo::rerun-if-changed={watched}");
        }
    }
    let ready = Path::new("/usr/bin/chromium").exists()
        && Path::new("tests/browser/node_modules/playwright-core").exists();
    if !ready && std::env::var_os("HERD_REQUIRE_BROWSER").is_none() {
        println!("cargo::rustc-cfg=herd_no_browser");
    }
}
