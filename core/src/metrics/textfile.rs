//! `metrics_textfile` (C_API §5): metrics without code in the host. One thread ("backup-metrics")
//! rewrites the file with the exposition `backup_plugin_get_metrics` returns, every
//! `metrics_interval`, for node_exporter's textfile collector; cleanup wakes it at once for a
//! final write, then joins it (C_API §4). Without the key there is no file and no thread.
//!
//! Each rewrite is atomic and durable ([`durable::write_atomic`]: a temp file in the same
//! directory, fsync, rename), so the collector never reads half a file, and the file is 0640
//! whatever the umask. A rewrite that fails is logged (a warning, which the diagnostics log
//! carries: once per streak of the same reason) and counted
//! (`backup_metrics_textfile_write_failures_total`); the file keeps its previous exposition
//! and the next tick tries again. Nothing here fails a call of the host, and cleanup waits
//! at most [`FINAL_WRITE_PATIENCE`] for the final write.

use super::Counter;
use crate::durable::{self, FileError};
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The thread's name, as `/proc/<pid>/task/<tid>/comm` shows it (at most 15 bytes).
pub const THREAD_NAME: &str = "backup-metrics";

/// The longest cleanup waits for the final write (a hung disk or mount must not hang the
/// host's shutdown); past it, the thread is left to finish on its own.
pub const FINAL_WRITE_PATIENCE: Duration = Duration::from_secs(5);

/// The file's mode: the owner writes, its group (node_exporter's) reads, nobody else.
const MODE: u32 = 0o640;

/// Replaces `target` with `text`, atomically and durably, leaving it 0640.
///
/// [`durable::write_atomic`] gives its temp file the mode of the file it replaces (by
/// fchmod, which the umask does not touch), so the target is made 0640 first: created
/// empty and chmodded when missing (an empty file is a valid, empty exposition), chmodded
/// when it has another mode. A symlink in its place is replaced by the file, as the rename
/// would replace it, but not with the mode of what it points to. Every version the
/// collector can read is thus 0640.
pub fn write(target: &Path, text: &str) -> Result<(), FileError> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_file() => {
            if meta.permissions().mode() & 0o7777 != MODE {
                fs::set_permissions(target, fs::Permissions::from_mode(MODE))
                    .map_err(|e| FileError::new("chmod", target, e))?
            }
        }
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::remove_file(target).map_err(|e| FileError::new("remove symlink", target, e))?;
            create_0640(target)?
        }
        // A directory or another kind of file: left as it is, for the rename to refuse.
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_0640(target)?,
        Err(e) => return Err(FileError::new("stat", target, e)),
    }
    durable::write_atomic(target, text.as_bytes())
}

/// Creates `target` empty and 0640, unless something was created there meanwhile.
fn create_0640(target: &Path) -> Result<(), FileError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(MODE)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(target)
    {
        // The umask may have taken bits off the mode.
        Ok(file) => file
            .set_permissions(fs::Permissions::from_mode(MODE))
            .map_err(|e| FileError::new("chmod", target, e)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(FileError::new("create", target, e)),
    }
}

/// The running thread; [`Textfile::stop`] makes its final write and ends it.
pub struct Textfile {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the thread (stop) and cleanup (finished).
    wake: Condvar,
}

#[derive(Default)]
struct State {
    stop: bool,
    finished: bool,
}

impl Textfile {
    /// Starts the thread: it writes `exposition()` to `path` at once, then every `interval`,
    /// and a last time when stopped; it ends early when `exposition` returns `None` (the
    /// instance is gone). Failed writes are added to `failures`.
    pub fn start(
        path: PathBuf,
        interval: Duration,
        failures: Arc<Counter>,
        exposition: impl Fn() -> Option<String> + Send + 'static,
    ) -> Result<Self> {
        if path.extension() != Some(std::ffi::OsStr::new("prom")) {
            tracing::warn!(path = %path.display(), "metrics_textfile does not end in .prom: node_exporter's textfile collector reads only *.prom files");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                thread_shared.run(&path, interval, &failures, exposition);
                thread_shared.state.lock().finished = true;
                thread_shared.wake.notify_all();
            })
            .map_err(|e| {
                Error::OutOfResources(format!("cannot start the metrics textfile thread: {e}"))
            })?;
        Ok(Textfile {
            shared,
            thread: Some(thread),
        })
    }

    /// Wakes the thread for its final write and joins it; waits at most `patience`, then
    /// leaves it to finish on its own.
    pub fn stop(mut self, patience: Duration) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
        let deadline = Instant::now() + patience;
        let finished = {
            let mut state = self.shared.state.lock();
            while !state.finished {
                if self
                    .shared
                    .wake
                    .wait_until(&mut state, deadline)
                    .timed_out()
                {
                    break;
                }
            }
            state.finished
        };
        let Some(thread) = self.thread.take() else {
            return;
        };
        if finished {
            let _ = thread.join();
        } else {
            tracing::warn!(
                waited_ms = patience.as_millis() as u64,
                "the final write of metrics_textfile did not finish in time; cleanup goes on without it"
            );
        }
    }
}

impl Drop for Textfile {
    /// Without [`Textfile::stop`] (an instance dropped some other way): the thread is told to
    /// stop, not joined, since the drop may run on the thread itself.
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn run(
        &self,
        path: &Path,
        interval: Duration,
        failures: &Counter,
        exposition: impl Fn() -> Option<String>,
    ) {
        // What the failing streak fails on, if the last write failed: the operation and the
        // OS error (not the temp file's name, which changes every time); logged once each.
        let mut failing: Option<String> = None;
        loop {
            // Read before rendering: a stop that comes during this write gets one more.
            let stopping = self.state.lock().stop;
            let Some(text) = exposition() else { return };
            match write(path, &text) {
                Ok(()) => {
                    if failing.take().is_some() {
                        tracing::info!(path = %path.display(), "metrics_textfile written again");
                    }
                }
                Err(err) => {
                    failures.inc();
                    let cause = format!("{}: {}", err.op, err.source);
                    if failing.as_deref() != Some(cause.as_str()) {
                        tracing::warn!(
                            path = %path.display(),
                            code = err.code().raw(),
                            reason = %err,
                            failures = failures.get(),
                            "metrics_textfile not rewritten; it keeps its previous exposition, the next tick tries again"
                        );
                    }
                    failing = Some(cause);
                }
            }
            if stopping {
                return;
            }
            let deadline = Instant::now() + interval;
            let mut state = self.state.lock();
            while !state.stop {
                if self.wake.wait_until(&mut state, deadline).timed_out() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_leaves_0640_content_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.prom");
        write(&target, "a 1\n").unwrap();
        assert_eq!(
            (fs::read_to_string(&target).unwrap(), mode(&target)),
            ("a 1\n".into(), MODE)
        );
        fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).unwrap();
        write(&target, "a 2\n").unwrap();
        assert_eq!(
            (fs::read_to_string(&target).unwrap(), mode(&target)),
            ("a 2\n".into(), MODE)
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["b.prom"]);
    }

    #[test]
    fn a_symlink_in_the_way_is_replaced_by_a_0640_file() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "other\n").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o644)).unwrap();
        let target = dir.path().join("b.prom");
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        write(&target, "a 1\n").unwrap();
        let meta = fs::symlink_metadata(&target).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, MODE);
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "other\n");
    }

    #[test]
    fn a_directory_in_the_way_fails_the_write_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.prom");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(write(&target, "a 1\n").is_err());
        assert_eq!(mode(&target), 0o755);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn writes_at_once_on_each_tick_and_at_stop_and_counts_failures() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.prom");
        let renders = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Counter::new());
        let r = renders.clone();
        let textfile = Textfile::start(
            target.clone(),
            Duration::from_secs(3600),
            failures.clone(),
            move || {
                Some(format!(
                    "renders {}\n",
                    r.fetch_add(1, Ordering::SeqCst) + 1
                ))
            },
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::read_to_string(&target).unwrap_or_default() != "renders 1\n" {
            assert!(Instant::now() < deadline, "no first write");
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        textfile.stop(FINAL_WRITE_PATIENCE);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stop waits for no tick"
        );
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "renders 2\n",
            "the final write"
        );
        assert_eq!(failures.get(), 0);

        // Every write fails (a directory in the way): each is counted, none ends the thread.
        let blocked = dir.path().join("blocked.prom");
        fs::create_dir(&blocked).unwrap();
        let textfile =
            Textfile::start(blocked, Duration::from_secs(3600), failures.clone(), || {
                Some("x 1\n".into())
            })
            .unwrap();
        while failures.get() == 0 {
            assert!(Instant::now() < deadline, "no first write");
            std::thread::sleep(Duration::from_millis(10));
        }
        textfile.stop(FINAL_WRITE_PATIENCE);
        assert_eq!(failures.get(), 2, "the first write and the final one");
    }
}
