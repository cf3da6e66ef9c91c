//! The demo tells the truth: two runs with different DEMO_DIRs each write and verify their
//! own files, each through the fenced write (a fence sidecar per block); files missing after
//! a pass fail it; --shared-dir puts the set there and verification reads it there; bad
//! arguments are refused with the usage.
#[path = "common/tools.rs"]
mod tools;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/incremental_bitmap");
const FILES: usize = 24;
const SIZE: usize = 4096;

/// `make demo` builds the host in one place: runs take turns.
static MAKE: Mutex<()> = Mutex::new(());

/// make and gcc build the host; `script` (bsdutils) gives it a terminal.
fn ensure_tools() {
    tools::ensure_tool("make", &["make"]);
    tools::ensure_tool("cc", &["gcc", "libc6-dev"]);
    tools::ensure_tool("script", &["bsdutils"]);
}

fn make_demo(dir: &Path) -> Output {
    ensure_tools();
    Command::new("make")
        .args(["-C", PLUGIN_DIR, "demo", "PROFILE=debug"])
        .arg(format!("DEMO_DIR={}", dir.display()))
        .arg(format!(
            "DEMO_ARGS=--files {FILES} --size {SIZE} --failure-rate 0.3 --threads 3"
        ))
        .output()
        .expect("make runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn host() -> PathBuf {
    Path::new(PLUGIN_DIR).join("build/taosx_host")
}

/// The blocks of a backup set (`vg*.dat`), without the fence sidecars (`.<name>.fence`).
fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("backup_set"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

/// Every entry of a backup set: each block and its fence sidecar, nothing else.
fn assert_blocks_and_fences(dir: &Path, count: usize) {
    let mut names: Vec<String> = fs::read_dir(dir.join("backup_set"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..count)
        .flat_map(|i| {
            let name = format!("vg{:02}_block_{:05}.dat", i % 4, i);
            [format!(".{name}.fence"), name]
        })
        .collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn two_runs_in_different_dirs_each_write_and_verify_their_own_files() {
    let _turn = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    for name in ["first", "second"] {
        let dir = tmp.path().join(name);
        let out = make_demo(&dir);
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains(&format!(
                "verified          {FILES} of {FILES} files read back intact, 0 missing, 0 wrong"
            )),
            "{said}"
        );
        assert!(
            said.contains(&format!(
                "PASS: {FILES} of {FILES} files on disk and intact"
            )),
            "{said}"
        );
        // The first pass of each run really shipped every block: none was a replay from
        // another run's state, each write was accepted by the fence, none refused, no
        // claim lapsed; the second pass wrote nothing.
        let (first_pass, second_pass) = said.split_once("second pass").unwrap();
        assert!(first_pass.contains("replayed          0 "), "{first_pass}");
        assert!(
            first_pass.contains(&format!(
                "written by op     {FILES} (writes the fence accepted)"
            )),
            "{first_pass}"
        );
        for pass in [first_pass, second_pass] {
            assert!(pass.contains("refused by fence  0 "), "{pass}");
            assert!(pass.contains("lease lost        0 "), "{pass}");
        }
        assert!(
            second_pass.contains("written by op     0 "),
            "{second_pass}"
        );
        assert!(
            said.contains("backup_plugin_write_file_fenced into"),
            "{said}"
        );
        // Alone, with no shared dir, the host logs no fence lines.
        assert!(!said.contains("fence-log"), "{said}");
        // Its files are where it says, whole, and so is everything the plugin wrote.
        let files = block_files(&dir);
        assert_eq!(files.len(), FILES, "{said}");
        assert_blocks_and_fences(&dir, FILES);
        for file in &files {
            assert_eq!(fs::metadata(file).unwrap().len(), SIZE as u64);
        }
        for sub in ["state", "errors", "logs", "plugins"] {
            assert!(dir.join(sub).is_dir(), "{sub} not under {}", dir.display());
        }
        // The plugin dir holds a link to the library cargo built, not a copy of its own.
        let plugin = dir.join("plugins/libbackup_coordinator.so");
        let target = fs::read_link(&plugin).unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
        assert!(
            target.ends_with("debug/libbackup_coordinator.so") && target.is_file(),
            "{}",
            target.display()
        );
        // The dlopen'ed library wrote its own diagnostics there: one file, 0640, whose lines
        // tell of both inits and the retries of the injected failures.
        let logs: Vec<PathBuf> = fs::read_dir(dir.join("logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(logs.len(), 1, "{logs:?}");
        let name = logs[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("backup_plugin.log."), "{name}");
        assert_eq!(
            fs::metadata(&logs[0]).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let diagnostics = fs::read_to_string(&logs[0]).unwrap();
        assert_eq!(
            diagnostics
                .matches("plugin initialized enable=true")
                .count(),
            2,
            "{diagnostics}"
        );
        assert!(
            diagnostics.contains("operation failed, retrying"),
            "{diagnostics}"
        );
        // No progress bar: stderr is not a terminal here.
        assert!(!said.contains("\r  ["), "progress bar drawn into a pipe");
    }
    // The two runs' contents are the same blocks, written twice.
    let a = block_files(&tmp.path().join("first"));
    let b = block_files(&tmp.path().join("second"));
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(fs::read(a).unwrap(), fs::read(b).unwrap());
    }
}

#[test]
fn missing_files_fail_verification_and_the_exit_code() {
    let _turn = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = make_demo(&dir);
    assert!(out.status.success(), "{}", text(&out));
    // The blocks' keys are completed in the state dir; two files are gone. A run in the
    // same work dir replays every key, so nothing rewrites them: it must say so and fail.
    let files = block_files(&dir);
    fs::remove_file(&files[0]).unwrap();
    fs::write(&files[1], b"not the block").unwrap();
    let out = Command::new(host())
        .args(["--config", "demo/taosx.toml", "--plugin-dir"])
        .arg(dir.join("plugins"))
        .arg("--work-dir")
        .arg(&dir)
        .args(["--files", &FILES.to_string(), "--size", &SIZE.to_string()])
        .current_dir(PLUGIN_DIR)
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("1 missing, 1 wrong"), "{said}");
    assert!(said.contains("FAIL"), "{said}");
}

#[test]
fn arguments_are_checked_and_help_exits_0() {
    let _turn = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    ensure_tools();
    let out = Command::new("make")
        .args(["-C", PLUGIN_DIR, "build/taosx_host", "PROFILE=debug"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = |args: &[&str]| Command::new(host()).args(args).output().unwrap();
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: "));
    for args in [
        &["--files", "-1"][..],
        &["--files", "12abc"],
        &["--failure-rate", "2.0"],
        &["--failure-rate", "1"],
        &["--failure-rate", "nan"],
        &["--threads", "0"],
        &["--size", "0"],
        &["--op-delay-ms", "-1"],
        &["--op-delay-ms", "60001"],
        &["--op-delay-ms", "5ms"],
        &["--shared-dir", "/tmp/it's"],
        &["--bogus", "1"],
        &["--files"],
        &[],
    ] {
        let mut all = vec![
            "--config",
            "demo/taosx.toml",
            "--work-dir",
            "/nonexistent/demo",
        ];
        if args.is_empty() {
            all.truncate(2); // no --work-dir
        }
        all.extend_from_slice(args);
        let out = run(&all);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains("usage: "), "{args:?}: {said}");
        assert!(!Path::new("/nonexistent/demo").exists());
    }
}

#[test]
fn the_progress_bar_is_drawn_on_a_terminal_only() {
    let _turn = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tty");
    let out = make_demo(&dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("\r  ["), "bar drawn into a pipe");
    // The same host under a pseudo-terminal (`script` from bsdutils) draws it.
    let again = tmp.path().join("tty2");
    let command = format!(
        "'{}' --config demo/taosx.toml --plugin-dir '{}' --work-dir '{}' --files 8 --size 512",
        host().display(),
        dir.join("plugins").display(),
        again.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(PLUGIN_DIR)
        .output()
        .expect("script (bsdutils) runs");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("\r  [") && said.contains("8/8 files"),
        "{said}"
    );
}

#[test]
fn a_shared_dir_receives_the_set_and_is_what_is_verified() {
    let _turn = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = make_demo(&dir);
    assert!(out.status.success(), "{}", text(&out));
    let host_run = |work: &Path, shared: &Path| {
        Command::new(host())
            .args(["--config", "demo/taosx.toml", "--plugin-dir"])
            .arg(dir.join("plugins"))
            .arg("--work-dir")
            .arg(work)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--files", "8", "--size", "512", "--op-delay-ms", "5"])
            .current_dir(PLUGIN_DIR)
            .output()
            .unwrap()
    };
    let (work, shared) = (tmp.path().join("work"), tmp.path().join("shared"));
    let out = host_run(&work, &shared);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("PASS: 8 of 8 files on disk and intact"),
        "{said}"
    );
    assert!(said.contains("each block's transfer takes 5 ms"), "{said}");
    // The set is in the shared dir, not in the work dir (which has the plugin's state).
    assert_blocks_and_fences(&shared, 8);
    assert!(!work.join("backup_set").exists());
    assert!(work.join("state").is_dir());
    // One transfer, write and accepted line per block, each with its claim's token, in order
    // on CLOCK_MONOTONIC.
    for kind in ["transfer", "write", "accepted"] {
        let n = said
            .lines()
            .filter(|l| l.starts_with(&format!("fence-log {kind} /backup_set/vg")))
            .count();
        assert_eq!(n, 8, "{kind}: {said}");
    }
    for line in said
        .lines()
        .filter(|l| l.starts_with("fence-log accepted "))
    {
        let num = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(num("token=") > 0, "{line}");
        assert!(num("t1=") >= num("t0="), "{line}");
        assert!(line.ends_with(" rc=0"), "{line}");
    }
    // A block gone from the shared dir is missed there, whatever the work dir holds.
    fs::remove_file(shared.join("backup_set/vg01_block_00005.dat")).unwrap();
    let out = host_run(&work, &shared);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("7 of 8 files read back intact, 1 missing, 0 wrong"),
        "{said}"
    );
}
