//! The shape of the workspace (docs/ARCHITECTURE.md): the root package is the cdylib, the
//! core (`core/`, `backup-coordinator-core`) knows nothing of C, and etcd is a feature the
//! core builds without (no protoc, tokio or tonic).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// What would tie the core to C: exports, C strings, `repr(C)` layouts, raw pointers.
const C_MARKERS: [&str; 10] = [
    "extern \"C\"",
    "no_mangle",
    "export_name",
    "repr(C)",
    "c_char",
    "c_void",
    "CStr",
    "CString",
    "*const ",
    "*mut ",
];

/// The two raw pointers the core keeps, neither of them C's: hints to the kernel and the
/// CPU about the core's own memory (its table in huge pages, a prefetch of a slot).
const ALLOWED: [(&str, &str); 2] = [
    ("idempotency/file_store/index.rs", "libc::madvise("),
    ("idempotency/file_store/read_ahead.rs", "_mm_prefetch::<"),
];

#[test]
fn the_core_knows_nothing_of_c() {
    let mut files = Vec::new();
    rust_files(&root().join("core/src"), &mut files);
    assert!(files.len() > 20, "the core's sources: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let relative = file.strip_prefix(root().join("core/src")).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            let allowed = ALLOWED
                .iter()
                .any(|(path, call)| relative.ends_with(path) && code.contains(call));
            for marker in C_MARKERS {
                if code.contains(marker) && !allowed {
                    found.push(format!(
                        "{}:{}: {marker}: {line}",
                        relative.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "C in the core (it belongs in src/ffi):\n{}",
        found.join("\n")
    );
}

#[test]
fn cbindgen_reads_the_cdylib_only() {
    let config = std::fs::read_to_string(root().join("cbindgen.toml")).unwrap();
    assert!(config.contains("parse_deps = false"), "{config}");
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("crate-type = [\"cdylib\", \"rlib\"]"));
    assert!(manifest.contains("members = [\"core\"]"));
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Crates of the core's build without its default features.
fn core_dependencies_without_etcd() -> String {
    let out = cargo()
        .current_dir(root())
        .args([
            "tree",
            "-p",
            "backup-coordinator-core",
            "--no-default-features",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn without_the_etcd_feature_the_core_needs_no_protoc_tokio_or_tonic() {
    let tree = core_dependencies_without_etcd();
    for heavy in ["etcd-client", "tokio", "tonic", "prost"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{heavy} "))),
            "{heavy} in the core's build without etcd:\n{tree}"
        );
    }
    // And it builds with no protoc at all (a check: no code generation, no linking).
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("core-without-etcd");
    let out = cargo()
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target)
        .env("PROTOC", "/nonexistent/protoc")
        .args([
            "check",
            "-q",
            "-p",
            "backup-coordinator-core",
            "--no-default-features",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the core without etcd does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
