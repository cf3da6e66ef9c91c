//! `backup_plugin_write_file_fenced` proven across processes and by breaking things: several
//! processes racing over one file with shuffled tokens, kill -9 in the middle of fenced
//! writes, a full tmpfs, and the plugin's retry accounting. Child processes are this test
//! binary run again with `FENCE_ROLE` set; they run only the `child_role` entry.

mod common;

use backup_coordinator::fenced_write::{fence_path, stored_token, write_fenced};
use backup_coordinator::ffi::plugin::{
    backup_plugin_get_error_stats, backup_plugin_get_last_error, backup_plugin_init,
    backup_plugin_write_file_fenced,
};
use backup_coordinator::ffi::types::{
    BACKUP_ERROR_DISK_FULL, BACKUP_ERROR_FENCED, BACKUP_ERROR_RETRY_EXHAUSTED, BACKUP_SUCCESS,
};
use backup_coordinator::ErrorCode;
use common::child::Child;
use common::Mount;
use std::ffi::{CStr, CString};
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIG: usize = 1 << 20;
const SMALL: usize = 300_000;
const HEADER: usize = "token 00000000000000000000\n".len();

/// The content written with `token`: a header naming it, then a fill of its own, in one
/// of two sizes; [`token_of`] recognises it only whole.
fn content(token: u64, big: usize, small: usize) -> Vec<u8> {
    let len = if token % 2 == 0 { big } else { small };
    let mut bytes = format!("token {token:020}\n").into_bytes();
    bytes.resize(len.max(HEADER), b'a' + (token % 26) as u8);
    bytes
}

/// The token whose whole content `bytes` is, or `None` (torn, foreign).
fn token_of(bytes: &[u8], big: usize, small: usize) -> Option<u64> {
    let header = std::str::from_utf8(bytes.get(..HEADER)?).ok()?;
    let token: u64 = header.strip_prefix("token ")?.trim_end().parse().ok()?;
    (bytes == content(token, big, small).as_slice()).then_some(token)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn fenced(path: &Path, data: &[u8], token: u64) -> i32 {
    backup_plugin_write_file_fenced(
        c_path(path).as_ptr(),
        data.as_ptr().cast(),
        data.len(),
        token,
    )
}

fn init_plugin(retry_max: u32) {
    let config = format!("error_retry_max = {retry_max}\nerror_retry_interval = 0\n");
    assert_eq!(
        backup_plugin_init(config.as_ptr().cast(), config.len() as u32),
        BACKUP_SUCCESS
    );
}

/// Monotonic nanoseconds, comparable across the processes of the host.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn spawn_role(role: &str, dir: &Path, envs: &[(&str, String)]) -> Child {
    Child::command("child_role")
        .env("FENCE_ROLE", role)
        .env("FENCE_DIR", dir)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .no_stdout()
        .no_stderr()
        .spawn()
}

const RACE_SIZE: usize = 8 << 10;
/// Threads of each racing process.
const RACE_THREADS: usize = 4;

/// The body of a child process; a no-op in the normal test run. `race`: from the instant
/// FENCE_GO_NS, [`RACE_THREADS`] threads write the tokens of FENCE_TOKENS, logging each
/// call as `<start ns> <end ns> <token> <rc>` (one append per line: lines never
/// interleave). `loop`: fenced writes with increasing tokens from FENCE_BASE until killed.
#[test]
fn child_role() {
    let Ok(role) = std::env::var("FENCE_ROLE") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("FENCE_DIR").unwrap());
    let target = dir.join("backup.dat");
    match role.as_str() {
        "race" => {
            init_plugin(3);
            let tokens: Vec<u64> = std::env::var("FENCE_TOKENS")
                .unwrap()
                .split(',')
                .map(|t| t.parse().unwrap())
                .collect();
            // Every process starts at the same instant, so that their calls overlap.
            let go: u64 = std::env::var("FENCE_GO_NS").unwrap().parse().unwrap();
            while now_ns() < go {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::scope(|s| {
                for chunk in tokens.chunks(tokens.len().div_ceil(RACE_THREADS)) {
                    let target = &target;
                    let dir = &dir;
                    s.spawn(move || {
                        let mut log = fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(dir.join("race.log"))
                            .unwrap();
                        for &token in chunk {
                            let data = content(token, RACE_SIZE, RACE_SIZE / 2);
                            let start = now_ns();
                            let rc = fenced(target, &data, token);
                            let end = now_ns();
                            log.write_all(format!("{start} {end} {token} {rc}\n").as_bytes())
                                .unwrap();
                        }
                    });
                }
            });
        }
        "loop" => {
            init_plugin(0);
            let base: u64 = std::env::var("FENCE_BASE").unwrap().parse().unwrap();
            for token in base.. {
                let rc = fenced(&target, &content(token, BIG, SMALL), token);
                if rc != BACKUP_SUCCESS {
                    fs::write(dir.join("child_failed"), format!("token {token}: {rc}")).unwrap();
                    std::process::exit(1);
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// One call as a child logged it.
#[derive(Debug, Clone, Copy)]
struct Call {
    start: u64,
    end: u64,
    token: u64,
    rc: i32,
}

#[test]
fn processes_racing_over_one_file_end_with_the_highest_token() {
    const PROCESSES: usize = 6;
    const TOKENS: u64 = 480;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backup.dat");
    let mut tokens: Vec<u64> = (1..=TOKENS).collect();
    fastrand::Rng::with_seed(11).shuffle(&mut tokens);
    let go = (now_ns() + 500_000_000).to_string();
    let children: Vec<_> = tokens
        .chunks(tokens.len() / PROCESSES)
        .map(|chunk| {
            let list = chunk
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            spawn_role(
                "race",
                dir.path(),
                &[("FENCE_TOKENS", list), ("FENCE_GO_NS", go.clone())],
            )
        })
        .collect();
    for mut child in children {
        assert!(child.wait().success(), "a racing child failed");
    }
    let calls: Vec<Call> = fs::read_to_string(dir.path().join("race.log"))
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            Call {
                start: f[0].parse().unwrap(),
                end: f[1].parse().unwrap(),
                token: f[2].parse().unwrap(),
                rc: f[3].parse().unwrap(),
            }
        })
        .collect();
    assert_eq!(calls.len(), TOKENS as usize);

    // The file is the highest token's content, and the fence holds that token.
    let bytes = fs::read(&target).unwrap();
    assert_eq!(token_of(&bytes, RACE_SIZE, RACE_SIZE / 2), Some(TOKENS));
    assert_eq!(stored_token(&target).unwrap(), Some(TOKENS));
    let mut refused = 0;
    for call in &calls {
        match call.rc {
            BACKUP_SUCCESS => {
                // No success was made over one of a higher token that had already returned.
                for before in calls.iter().filter(|c| c.rc == BACKUP_SUCCESS) {
                    assert!(
                        before.end >= call.start || before.token <= call.token,
                        "token {} accepted after {} was",
                        call.token,
                        before.token
                    );
                }
            }
            BACKUP_ERROR_FENCED => {
                refused += 1;
                // A higher token was accepted by a call that began before this one ended.
                assert!(
                    calls.iter().any(|c| c.rc == BACKUP_SUCCESS
                        && c.token > call.token
                        && c.start < call.end),
                    "token {} refused with no higher token accepted",
                    call.token
                );
            }
            rc => panic!("token {}: {rc}", call.token),
        }
        // A lower token than one that was accepted and returned before this call began
        // must have been refused.
        if calls
            .iter()
            .any(|c| c.rc == BACKUP_SUCCESS && c.token > call.token && c.end < call.start)
        {
            assert_eq!(call.rc, BACKUP_ERROR_FENCED, "token {}", call.token);
        }
    }
    assert!(
        refused > 0,
        "shuffled tokens in {PROCESSES} processes: some must be refused"
    );
    assert_eq!(
        entries(dir.path()),
        vec![".backup.dat.fence", "backup.dat", "race.log"]
    );
}

#[test]
fn kill_9_during_fenced_writes_never_lowers_the_fence_nor_tears_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backup.dat");
    let mut rng = fastrand::Rng::with_seed(42);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut base = 1;
    let (mut rounds, mut caught_mid_write) = (0, 0);
    while rounds < 30 && Instant::now() < deadline {
        rounds += 1;
        let mut child = spawn_role("loop", dir.path(), &[("FENCE_BASE", base.to_string())]);
        std::thread::sleep(Duration::from_millis(rng.u64(20..120)));
        child.kill(); // SIGKILL
        assert!(
            !dir.path().join("child_failed").exists(),
            "the child's write failed: {}",
            fs::read_to_string(dir.path().join("child_failed")).unwrap()
        );
        let Some(fence) = stored_token(&target).unwrap() else {
            // Killed before its first fence was raised: nothing written at all.
            assert!(!target.exists());
            continue;
        };
        match fs::read(&target) {
            Ok(bytes) => {
                let Some(written) = token_of(&bytes, BIG, SMALL) else {
                    panic!("torn file: {} bytes", bytes.len());
                };
                assert!(
                    written <= fence,
                    "content of {written} over the fence {fence}"
                );
                caught_mid_write += usize::from(written < fence);
            }
            // The first write's fence raised, its content not yet renamed in.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => caught_mid_write += 1,
            Err(e) => panic!("{e}"),
        }
        caught_mid_write += usize::from(entries(dir.path()).len() > 2);
        // A stale claim is refused, whatever the kill interrupted, and touches nothing.
        let before = fs::read(&target).ok();
        if fence > 1 {
            let err = write_fenced(&target, b"stale", fence - 1).unwrap_err();
            assert_eq!(err.kind(), ErrorCode::Fenced, "{err}");
            assert_eq!(fs::read(&target).ok(), before);
        }
        // The next claim (another process) writes, and sweeps the dead writer's temp file.
        write_fenced(&target, &content(fence + 1, BIG, SMALL), fence + 1).unwrap();
        assert_eq!(entries(dir.path()), vec![".backup.dat.fence", "backup.dat"]);
        base = fence + 2;
    }
    eprintln!("{rounds} rounds, {caught_mid_write} kills caught in a fenced write");
    assert!(rounds >= 10, "only {rounds} rounds in the time allowed");
    // The child spends nearly all its time in fenced writes: some kills must have landed
    // in one (a temp file left, or a fence raised over older content).
    assert!(caught_mid_write > 0, "no kill landed in a fenced write");
}

/// The plugin is process-wide: the tests that read its counters run one at a time.
static PLUGIN: Mutex<bool> = Mutex::new(false);

fn with_plugin(test: impl FnOnce()) {
    let mut ready = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    if !*ready {
        init_plugin(3);
        *ready = true;
    }
    test();
}

fn stats() -> (u64, u64) {
    let (mut errors, mut retries) = (0, 0);
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    (errors, retries)
}

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_full_disk_is_reported_not_retried_and_leaves_the_old_content() {
    with_plugin(|| {
        let mount = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"]);
        let target = mount.path.join("set.dat");
        assert_eq!(fenced(&target, b"old content", 1), BACKUP_SUCCESS);
        let (errors, retries) = stats();
        assert_eq!(fenced(&target, &vec![7u8; BIG], 2), BACKUP_ERROR_DISK_FULL);
        assert_eq!(stats(), (errors + 1, retries), "one error, no retry");
        assert!(last_error().contains("Disk full"), "{}", last_error());
        assert_eq!(fs::read(&target).unwrap(), b"old content");
        assert_eq!(
            entries(&mount.path),
            vec![".set.dat.fence", "set.dat"],
            "no partial temp file"
        );
        // The fence was raised before the content failed: the old claim is refused, the
        // same claim's retry (once there is room) goes through.
        assert_eq!(stored_token(&target).unwrap(), Some(2));
        assert_eq!(fenced(&target, b"stale", 1), BACKUP_ERROR_FENCED);
        assert_eq!(fenced(&target, b"claim 2, smaller", 2), BACKUP_SUCCESS);
        assert_eq!(fs::read(&target).unwrap(), b"claim 2, smaller");
    });
}

#[test]
fn fenced_is_permanent_and_file_io_is_retried_through_the_policy() {
    with_plugin(|| {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("claimed.dat");
        assert_eq!(fenced(&target, b"claim 10", 10), BACKUP_SUCCESS);
        let (errors, retries) = stats();
        assert_eq!(fenced(&target, b"claim 9", 9), BACKUP_ERROR_FENCED);
        assert_eq!(
            stats(),
            (errors + 1, retries),
            "refused once, never retried"
        );
        let message = last_error();
        for needle in [target.to_str().unwrap(), "token 9", "token 10"] {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        assert_eq!(fs::read(&target).unwrap(), b"claim 10");

        // A missing directory may yet appear: FILE_IO, retried error_retry_max (3) times.
        let (errors, retries) = stats();
        let missing = dir.path().join("not-yet/claimed.dat");
        assert_eq!(fenced(&missing, b"x", 1), BACKUP_ERROR_RETRY_EXHAUSTED);
        assert_eq!(stats(), (errors + 1, retries + 3));
        assert!(last_error().contains("not-yet"), "{}", last_error());

        // A garbage fence is DATA_CORRUPTION, not retried, the file untouched.
        fs::write(fence_path(&target).unwrap(), b"garbage").unwrap();
        let (errors, retries) = stats();
        assert_eq!(
            fenced(&target, b"claim 11", 11),
            ErrorCode::DataCorruption.raw()
        );
        assert_eq!(stats(), (errors + 1, retries));
        assert_eq!(fs::read(&target).unwrap(), b"claim 10");
    });
}
