//! The error log (C_API §6) and redaction under abuse, through the C ABI where users meet it:
//! the log directory removed between two records, a disk that fills in the middle of a
//! line, a secret at the 4 KiB cut or holding control bytes, a junk file name from the far
//! future, several writers (processes, the plugin and a coordinator) on one directory, and
//! a umask of 077. Child processes are this test binary run again with `LOG_ROLE` set; they
//! run only the `log_child_role` entry.

mod common;

use backup_coordinator::error_log::{log_files, ErrorLog, LogSettings};
use backup_coordinator::ffi::coordinator::{
    backup_coordinator_destroy, backup_coordinator_init, backup_get_error_history,
    backup_get_last_error, backup_record_error, backup_write_file_with_retry,
};
use backup_coordinator::ffi::plugin::{backup_plugin_init, backup_plugin_record_error};
use backup_coordinator::ffi::types::{
    SBackupCoordinator, SBackupCoordinatorConfig, SBackupErrorRecord,
};
use common::child::Child;
use common::Mount;
use std::collections::HashSet;
use std::ffi::{c_char, CStr, CString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------
// Helpers

/// A coordinator made by `backup_coordinator_init`, destroyed on drop.
struct Coord {
    ptr: *mut SBackupCoordinator,
}

impl Coord {
    fn new(dir: &Path, key: Option<&str>) -> Coord {
        let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let key = key.map(|k| CString::new(k).unwrap());
        let config = SBackupCoordinatorConfig {
            max_blocks_per_batch: 0,
            batch_timeout_ms: 0,
            enable_compression: false.into(),
            enable_encryption: key.is_some().into(),
            encryption_key: key
                .as_ref()
                .map_or(std::ptr::null_mut(), |k| k.as_ptr() as *mut c_char),
            error_retry_max: 0,
            error_retry_interval: 0,
            error_store_path: path.as_ptr() as *mut c_char,
            enable_error_logging: true.into(),
            error_buffer_size: 10_000,
            backup_path: std::ptr::null_mut(),
            backup_max_size: 0,
            compression_level: 0,
        };
        let ptr = backup_coordinator_init(&config, std::ptr::null_mut(), std::ptr::null_mut());
        assert!(!ptr.is_null());
        Coord { ptr }
    }

    fn record(&self, code: i32, message: &str) {
        let message = CString::new(message).unwrap();
        backup_record_error(self.ptr, code, message.as_ptr());
    }

    fn last_error(&self) -> String {
        let text = backup_get_last_error(self.ptr);
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// `last_error_message` as a C harness reads it from the struct.
    fn last_error_field(&self) -> String {
        let field = unsafe { (*self.ptr).last_error_message };
        assert!(!field.is_null());
        unsafe { CStr::from_ptr(field) }
            .to_string_lossy()
            .into_owned()
    }

    fn history(&self) -> Vec<String> {
        let mut count = 0u32;
        assert_eq!(
            backup_get_error_history(self.ptr, std::ptr::null_mut(), 0, &mut count),
            0
        );
        let mut records: Vec<SBackupErrorRecord> =
            (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
        assert_eq!(
            backup_get_error_history(self.ptr, records.as_mut_ptr(), count, &mut count),
            0
        );
        records
            .iter()
            .map(|r| {
                unsafe { CStr::from_ptr(r.message.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        backup_coordinator_destroy(self.ptr);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every line of every log file of `dir`, oldest file first.
fn all_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for (_, path) in log_files(dir).unwrap() {
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in a partial line",
            path.display()
        );
        lines.extend(text.lines().map(str::to_string));
    }
    lines
}

/// `[<unix ms>] Error <code>: <message>` (§6), split into its parts; panics naming the line
/// when it is not one whole record.
fn parse_record(line: &str) -> (u64, i32, &str) {
    let parts = line.strip_prefix('[').and_then(|rest| {
        let (ms, rest) = rest.split_once("] Error ")?;
        let (code, message) = rest.split_once(": ")?;
        Some((ms.parse::<u64>().ok()?, code.parse::<i32>().ok()?, message))
    });
    let Some((ms, code, message)) = parts else {
        panic!("not a §6 record: {line:?}");
    };
    assert!(
        !message.chars().any(char::is_control),
        "control character in {line:?}"
    );
    assert!(
        !message.contains("] Error "),
        "two records glued into one line: {line:?}"
    );
    (ms, code, message)
}

/// A child process of this binary in role `role`. Once it says DONE it stays alive, its log
/// file open, until its stdin closes ([`Child::finish`]).
fn spawn_child(role: &str, dir: &Path, env: &[(&str, &str)]) -> Child {
    Child::command("log_child_role")
        .env("LOG_ROLE", role)
        .env("LOG_DIR", dir)
        .envs(env.iter().copied())
        .stdin_piped()
        .spawn()
}

fn init_plugin(dir: &Path, rotation_size: &str, rotation_count: u32) {
    let config = format!(
        "error_store_path = \"{}\"\nerror_log_rotation_size = \"{rotation_size}\"\nerror_log_rotation_count = {rotation_count}\n",
        dir.display()
    );
    assert_eq!(
        backup_plugin_init(config.as_ptr() as *const c_char, config.len() as u32),
        0
    );
}

fn plugin_record(code: i32, message: &str) {
    let message = CString::new(message).unwrap();
    backup_plugin_record_error(code, message.as_ptr());
}

fn block_until_stdin_closes() {
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// The body of a child process; a no-op in the normal test run.
#[test]
fn log_child_role() {
    let Ok(role) = std::env::var("LOG_ROLE") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("LOG_DIR").unwrap());
    let var = |name: &str| std::env::var(name).unwrap();
    match role.as_str() {
        // A plugin that writes its lines, then stays alive with its file open.
        "plugin-writer" => {
            init_plugin(
                &dir,
                &var("ROTATION_SIZE"),
                var("ROTATION_COUNT").parse().unwrap(),
            );
            let name = var("WRITER");
            let lines: usize = var("LINES").parse().unwrap();
            for i in 0..lines {
                plugin_record(-6, &format!("{name} line {i:05}"));
            }
        }
        // A coordinator (default rotation) and the plugin (tiny rotation) of one process.
        "plugin-and-coordinator" => {
            init_plugin(&dir, "1KB", 2);
            let coordinator = Coord::new(&dir, None);
            coordinator.record(-5, "coordinator newest line");
            for i in 0..300 {
                plugin_record(-6, &format!("plugin line {i:05}"));
            }
            // Kept alive (and its file open) until the parent has looked.
            println!("DONE");
            std::io::stdout().flush().unwrap();
            block_until_stdin_closes();
            drop(coordinator);
            return;
        }
        "umask-077" => {
            unsafe { libc::umask(0o077) };
            let coordinator = Coord::new(&dir.join("coordinator/nested/errors"), None);
            coordinator.record(-5, "made under umask 077");
            init_plugin(&dir.join("plugin/errors"), "64MB", 30);
            plugin_record(-6, "made under umask 077");
            return;
        }
        other => panic!("unknown role {other}"),
    }
    println!("DONE");
    std::io::stdout().flush().unwrap();
    block_until_stdin_closes();
}

// ---------------------------------------------------------------------------------------
// Issue 15 item 2: a removed directory is noticed at the next line.

#[test]
fn removing_the_log_directory_between_two_records_loses_no_later_line() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("errors");
    let c = Coord::new(&dir, None);
    c.record(-6, "before the directory was removed");
    fs::remove_dir_all(&dir).unwrap();
    c.record(-6, "after the directory was removed");
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
    let files = log_files(&dir).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(fs::metadata(&files[0].1).unwrap().mode() & 0o777, 0o640);
    let lines = all_lines(&dir);
    assert_eq!(lines.len(), 1);
    assert_eq!(parse_record(&lines[0]).2, "after the directory was removed");

    // Removed again, this time only the file (what a log cleaner does).
    fs::remove_file(&files[0].1).unwrap();
    c.record(-7, "after the file was removed");
    let lines = all_lines(&dir);
    assert_eq!(lines.len(), 1);
    assert_eq!(parse_record(&lines[0]).2, "after the file was removed");
    let log = ErrorLog::shared(LogSettings::with_default_rotation(dir.clone()));
    assert_eq!(log.write_failures(), 0);
}

// ---------------------------------------------------------------------------------------
// Issue 15 item 3: a line torn by a full disk is cut back; every line is one whole record.

/// A message that makes the line at `ms` exactly `len` bytes long.
fn message_for_line(tag: &str, i: usize, ms: u64, code: i32, len: usize) -> String {
    let prefix = format!("[{ms}] Error {code}: {tag} {i:04} ");
    let pad = len - prefix.len() - 1;
    format!("{tag} {i:04} {}", "y".repeat(pad))
}

#[test]
fn a_line_torn_by_a_full_disk_is_cut_back_and_later_lines_stay_whole() {
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"]);
    let dir = mount.path.join("errors");
    let c = Coord::new(&dir, None);
    let log = ErrorLog::shared(LogSettings::with_default_rotation(dir.clone()));
    // Lines of 1000 bytes: the 5th crosses the file's first 4 KiB page.
    const LINE: usize = 1000;
    let record = |tag: &str, i: usize| {
        // The ms the tracker stamps has as many digits as this one (until the year 2286).
        let ms = now_ms();
        c.record(-5, &message_for_line(tag, i, ms, -5, LINE));
    };
    record("BEFORE", 0);
    let file = log.current_path().unwrap();

    // Fill the rest of the tmpfs: the log file keeps only the room left in its page.
    let mut filler = fs::File::create(mount.path.join("filler")).unwrap();
    let chunk = vec![b'f'; 4096];
    loop {
        match filler.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    drop(filler);

    let mut i = 1;
    while log.write_failures() == 0 {
        assert!(i < 20, "the disk never filled");
        record("FULL", i);
        i += 1;
    }
    // The line that tore wrote its first bytes into the page before ENOSPC; they are gone.
    let len = fs::metadata(&file).unwrap().len();
    assert_eq!(len % LINE as u64, 0, "a partial line is left: {len} bytes");
    assert_ne!(len % 4096, 0, "the torn line's first bytes were kept");
    let failures = log.write_failures();
    record("FULL", i);
    assert_eq!(
        log.write_failures(),
        failures + 1,
        "each failed line is counted"
    );
    assert_eq!(fs::metadata(&file).unwrap().len(), len);

    // Room again: the next lines are whole records after whole records.
    fs::remove_file(mount.path.join("filler")).unwrap();
    for j in 0..8 {
        record("AFTER", j);
    }
    assert_eq!(log.write_failures(), failures + 1);
    let lines = all_lines(&dir);
    let mut after = 0;
    for line in &lines {
        assert_eq!(line.len() + 1, LINE, "line of the wrong length: {line:?}");
        let (_, code, message) = parse_record(line);
        assert_eq!(code, -5);
        let tag = message.split(' ').next().unwrap();
        assert!(matches!(tag, "BEFORE" | "FULL" | "AFTER"), "{line:?}");
        after += usize::from(tag == "AFTER");
    }
    assert_eq!(after, 8, "every line written once there was room is there");
    // Every error was still counted and kept by the tracker.
    assert_eq!(unsafe { (*c.ptr).error_count }, i as u64 + 1 + 8);
}

/// Threads recording at once onto a disk that fills: each line is on disk whole or counted
/// as lost, never both, never torn, whichever caller of a batch wrote it (issue 11).
#[test]
fn threads_filling_a_disk_leave_whole_lines_and_count_every_lost_one() {
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"]);
    let dir = mount.path.join("errors");
    let log = ErrorLog::shared(LogSettings::with_default_rotation(dir.clone()));
    const THREADS: usize = 6;
    const LINES: usize = 300;
    let now = now_ms();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let log = &log;
            s.spawn(move || {
                let clock = backup_coordinator::clock::SystemClock;
                for i in 0..LINES {
                    log.append(
                        &clock,
                        now,
                        -5,
                        &message_for_line("T", t * LINES + i, now, -5, 200),
                    );
                }
            });
        }
    });
    let lines = all_lines(&dir);
    for line in &lines {
        assert_eq!(line.len() + 1, 200, "a torn or glued line: {line:?}");
    }
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a line written twice");
    assert!(log.write_failures() > 0, "the disk never filled");
    assert_eq!(
        lines.len() as u64 + log.write_failures(),
        (THREADS * LINES) as u64,
        "every line is on disk or counted as lost"
    );
}

// ---------------------------------------------------------------------------------------
// Issue 15 item 4: the encryption key never appears, whole or in part.

/// Every 8-byte window of the key, as raw bytes and as they would read once control
/// characters became spaces.
fn key_windows(key: &str) -> HashSet<[u8; 8]> {
    assert!(key.len() >= 8);
    let spaced: Vec<u8> = key
        .bytes()
        .map(|b| if b.is_ascii_control() { b' ' } else { b })
        .collect();
    [key.as_bytes(), &spaced[..]]
        .iter()
        .flat_map(|bytes| bytes.windows(8))
        .map(|w| w.try_into().unwrap())
        .collect()
}

fn assert_no_window(haystack: &[u8], windows: &HashSet<[u8; 8]>, what: &str) {
    for window in haystack.windows(8) {
        assert!(
            !windows.contains(window),
            "{:?} of the key found in {what}",
            String::from_utf8_lossy(window)
        );
    }
}

#[test]
fn the_encryption_key_never_appears_in_a_message_or_the_log() {
    let keys = [
        "Zq8-secret-0123456789-abcdefghij",
        "tab\tin\tthe-key-0123456789",
        "nl\nbell\x07esc\x1b[31m-key-98765",
        "ünïcödé-kéy-with-multibyte-bytes",
    ];
    for key in keys {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errors");
        let c = Coord::new(&dir, Some(key));
        let windows = key_windows(key);
        for offset in (4000..4130).chain([0, 17, 100_000]) {
            let message = format!("{}{key}{}", "m".repeat(offset), " tail".repeat(3));
            c.record(-8, &message);
            assert_no_window(c.last_error().as_bytes(), &windows, "the last error");
            assert_no_window(c.last_error_field().as_bytes(), &windows, "the struct");
            assert!(c.last_error().len() <= 4096);
        }
        // The key inside a path whose write fails: the failure's detail is recorded too.
        let bad = root.path().join(format!("missing-{key}")).join("file");
        let path = CString::new(bad.as_os_str().as_bytes()).unwrap();
        let rc = backup_write_file_with_retry(c.ptr, path.as_ptr(), b"x".as_ptr().cast(), 1);
        assert_ne!(rc, 0);
        assert_no_window(c.last_error().as_bytes(), &windows, "a write failure");
        for (i, message) in c.history().iter().enumerate() {
            assert_no_window(message.as_bytes(), &windows, &format!("history {i}"));
        }
        let mut files = 0;
        for (_, file) in log_files(&dir).unwrap() {
            assert_no_window(&fs::read(&file).unwrap(), &windows, "the log file");
            files += 1;
        }
        assert_eq!(files, 1);
        let lines = all_lines(&dir);
        assert_eq!(lines.len(), 134);
        assert!(lines.iter().all(
            |l| parse_record(l).2.contains("[REDACTED]") || parse_record(l).2.ends_with("...")
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Issue 15 item 8: a junk name from the far future.

#[test]
fn a_file_named_with_the_largest_u64_neither_wraps_nor_panics() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("errors");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join(format!("backup_error_{}.log", u64::MAX)), "").unwrap();
    let before = now_ms();
    let c = Coord::new(&dir, None);
    c.record(-6, "after a junk name");
    c.record(-6, "and another line");
    let log = ErrorLog::shared(LogSettings::with_default_rotation(dir.clone()));
    assert_eq!(log.write_failures(), 0);
    let names: Vec<u64> = log_files(&dir).unwrap().iter().map(|f| f.0).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The new name comes from the clock, not from the junk (which would wrap to 0).
    assert!(
        names[0] >= before && names[0] <= now_ms(),
        "unexpected name {}",
        names[0]
    );
    let lines = all_lines(&dir);
    assert_eq!(lines.len(), 2);
    assert_eq!(parse_record(&lines[1]).2, "and another line");
}

// ---------------------------------------------------------------------------------------
// Issue 8 item 3: writers sharing one directory keep their newest lines.

/// Whether the line of `message` is in one of `dir`'s files.
fn has_line(dir: &Path, message: &str) -> bool {
    all_lines(dir).iter().any(|l| parse_record(l).2 == message)
}

fn writer(dir: &Path, name: &str, lines: usize, size: &str, count: u32) -> Child {
    spawn_child(
        "plugin-writer",
        dir,
        &[
            ("WRITER", name),
            ("LINES", &lines.to_string()),
            ("ROTATION_SIZE", size),
            ("ROTATION_COUNT", &count.to_string()),
        ],
    )
}

#[test]
fn processes_sharing_a_directory_never_prune_a_live_writers_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("errors");

    // A writes a few lines and stays alive; B, with other settings, rolls and prunes a lot.
    let mut a = writer(&dir, "A", 5, "1KB", 2);
    a.wait_for("DONE");
    let mut b = writer(&dir, "B", 400, "2KB", 3);
    b.wait_for("DONE");
    assert!(has_line(&dir, "A line 00004"), "A's newest line was pruned");
    assert!(has_line(&dir, "B line 00399"));

    // Two more writing at the same time, each pruning the other's files.
    let mut c = writer(&dir, "C", 300, "1KB", 2);
    let mut d = writer(&dir, "D", 300, "1KB", 2);
    c.wait_for("DONE");
    d.wait_for("DONE");
    for newest in [
        "A line 00004",
        "B line 00399",
        "C line 00299",
        "D line 00299",
    ] {
        assert!(has_line(&dir, newest), "{newest} was pruned");
    }
    for child in [a, b, c, d] {
        child.finish();
    }

    // The files of writers that have exited age out by the count.
    let mut e = writer(&dir, "E", 200, "1KB", 2);
    e.wait_for("DONE");
    assert!(has_line(&dir, "E line 00199"));
    assert_eq!(log_files(&dir).unwrap().len(), 2);
    e.finish();
}

#[test]
fn the_plugin_never_prunes_a_coordinators_file_in_the_same_process() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("errors");
    let mut child = spawn_child("plugin-and-coordinator", &dir, &[]);
    child.wait_for("DONE");
    assert!(
        has_line(&dir, "coordinator newest line"),
        "the coordinator's newest line was pruned"
    );
    assert!(has_line(&dir, "plugin line 00299"));
    // The plugin kept its count of 2; the coordinator's live file is the one beyond it.
    assert_eq!(log_files(&dir).unwrap().len(), 3);
    child.finish();
}

// ---------------------------------------------------------------------------------------
// Issue 8 item 6: directories the error log creates are 0750 whatever the umask.

#[test]
fn log_directories_are_0750_under_umask_077() {
    let root = tempfile::tempdir().unwrap();
    spawn_child("umask-077", root.path(), &[]).finish();
    for made in [
        "coordinator",
        "coordinator/nested",
        "coordinator/nested/errors",
        "plugin",
        "plugin/errors",
    ] {
        let mode = fs::metadata(root.path().join(made)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o750, "{made} is {mode:o}");
    }
    for dir in ["coordinator/nested/errors", "plugin/errors"] {
        let files = log_files(&root.path().join(dir)).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(fs::metadata(&files[0].1).unwrap().mode() & 0o777, 0o640);
        assert!(fs::read_to_string(&files[0].1)
            .unwrap()
            .ends_with("made under umask 077\n"));
    }
}
