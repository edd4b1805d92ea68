//! docs/protocol.md and the code say the same: every frame type, error code
//! and close code the document names exists in the code, and the code sends
//! none the document does not name.

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The first cell of each row of the tables under the heading `## {title}`
/// (up to the next `## ` heading), without backticks; header rows skipped.
fn first_cells(doc: &str, title: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("docs/protocol.md has no section {title:?}"));
    let section = &doc[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .filter_map(|l| l.split('|').nth(1))
        .map(|cell| cell.trim().trim_matches('`').to_string())
        .filter(|cell| !matches!(cell.as_str(), "type" | "code"))
        .collect()
}

/// Every string literal that follows `marker` in the sources under src/
/// (the client side, src/client/, which only reads frames, excluded).
fn literals_after(marker: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if name != "client" {
                    dirs.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for piece in text.split(marker).skip(1) {
                if let Some(end) = piece.find('"') {
                    found.insert(piece[..end].trim_end_matches('\\').to_string());
                }
            }
        }
    }
    found
}

#[test]
fn frame_types_match() {
    let doc = read("docs/protocol.md");
    let documented = first_cells(&doc, "Frames the broker sends");
    let mut sent = literals_after("FrameWriter::new(\"");
    sent.extend(literals_after("FrameWriter::with_capacity(\""));
    sent.extend(literals_after("{\\\"type\\\":\\\""));
    sent.remove("");
    assert_eq!(
        documented, sent,
        "documented frame types vs frames the code writes"
    );
}

#[test]
fn error_codes_match() {
    let doc = read("docs/protocol.md");
    let documented = first_cells(&doc, "Errors");
    let code: BTreeSet<String> = read("core/src/error.rs")
        .lines()
        .filter_map(|l| l.split("=> \"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    assert!(code.contains("busy") && code.contains("eval_timeout"));
    assert_eq!(
        documented, code,
        "documented error codes vs core/src/error.rs"
    );
}

#[test]
fn close_codes_match() {
    let doc = read("docs/protocol.md");
    let documented = first_cells(&doc, "Close codes");
    let code: BTreeSet<String> = read("src/outbox.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": u16 = "))
        .filter_map(|l| l.split(": u16 = ").nth(1))
        .map(|n| n.trim_end_matches(';').trim().to_string())
        .collect();
    assert!(code.contains("4001"));
    assert_eq!(documented, code, "documented close codes vs src/outbox.rs");
}

#[test]
fn the_readme_and_help_point_at_the_project_docs() {
    for path in ["README.md", "BENCHMARKS.md", "src/main.rs", "src/lib.rs"] {
        let text = read(path);
        for outside in ["PROTOCOL.md", "WORKLOAD.md"] {
            assert!(
                !text.contains(outside),
                "{path} cites {outside}, which is not in the repository"
            );
        }
    }
    assert!(read("README.md").contains("docs/protocol.md"));
}
