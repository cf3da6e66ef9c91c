//! The file-based error log of C_API §6.
//!
//! Each recorded error appends `[<unix ms>] Error <code>: <message>\n` to
//! `<dir>/backup_error_<unix ms at creation>.log`. A line goes to the kernel in one
//! `write(2)` before the record call returns, so it survives the process being killed
//! (fsync happens at flush, for power loss). Files roll by size; the oldest files beyond
//! the count, over the whole directory, are deleted. Names are unique and increasing
//! across processes: a file is created exclusively, later than every name present, and a
//! taken name moves to the next millisecond.
//!
//! Several writers (processes, the plugin and coordinators) may share one directory. Each
//! holds a shared `flock` on the file it appends to; a pruner deletes a file only while it
//! holds an exclusive lock on it, so a live writer's file is never deleted under it.
//! Each record call makes one `statx` (the link count alone) of the open file, after it
//! started and before its line is handed over: a file (or its directory) removed by someone
//! else is noticed by the first line recorded after the removal, which goes to a new file
//! instead of an unlinked one. The check is the caller's, so that callers make it in
//! parallel, outside the writes that one process's lines take in turn. A write that fails
//! half-way is cut back to where its lines began, so every line is one whole record.
//!
//! Threads of one process recording at once share their writes: the first caller that
//! finds no write in progress leads, and writes every line handed over meanwhile in one
//! `write(2)` (one per file when the batch crosses a rotation); the others wait for it.
//! Formatting and the removal check are per thread, the hand-over one short critical
//! section, and every call still returns only once its own line is in the kernel. A
//! waiting caller first spins on atomics (a batch's write takes about a microsecond; falling
//! asleep and being woken costs several, and on few cores most of a caller's time): only a
//! caller whose batch is not done after that sleeps on the condvar, and a leader wakes
//! sleepers only when there are.
//!
//! The pieces: the log, its settings and its one entry point ([`ErrorLog::append`]) here;
//! `line` formats a record as one line, `batch` hands lines over between threads and writes
//! a batch, `files` names, creates, locks, checks and prunes the files.

mod batch;
mod files;
mod line;

pub use files::log_files;
#[cfg(test)]
pub(crate) use line::MAX_MESSAGE_BYTES;
pub use line::{format_line, sanitize_message};

use crate::clock::Clock;
use batch::{Progress, Queue};
use files::{Active, Checked};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogSettings {
    pub dir: PathBuf,
    pub rotation_size: u64,
    pub rotation_count: u32,
}

impl LogSettings {
    /// What coordinators use: the default rotation of the plugin config.
    pub fn with_default_rotation(dir: PathBuf) -> Self {
        LogSettings {
            dir,
            rotation_size: 64 * 1024 * 1024,
            rotation_count: 30,
        }
    }
}

/// Why a line was not written, with the file or directory it concerns.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} {}: {source}", path.display())]
pub struct LogError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl LogError {
    fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        LogError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The same error for another caller of the batch it concerns.
    fn duplicate(&self) -> Self {
        let source = match self.source.raw_os_error() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(self.source.kind(), self.source.to_string()),
        };
        LogError::new(self.action, &self.path, source)
    }
}

pub struct ErrorLog {
    settings: LogSettings,
    active: Mutex<Active>,
    /// The file of `active`, for the callers' removal check (read-locked for one `statx`;
    /// write-locked only by a leader that changes the file, with `active` held).
    checked: CacheLine<RwLock<Checked>>,
    queue: CacheLine<Mutex<Queue>>,
    /// Signalled when a batch is done, if someone sleeps on it.
    batch_done: Condvar,
    progress: CacheLine<Progress>,
    /// The last name this log chose, so that its own names increase even within one ms.
    last_name_ms: AtomicU64,
    write_failures: AtomicU64,
}

/// A value alone on its cache line(s): the words every caller touches (the queue's lock,
/// the current file's lock, what waiting callers spin on) do not slow each other down.
#[derive(Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Logs are shared per (directory, rotation): two writers in one process must not
/// rotate each other's files away.
static SHARED: LazyLock<Mutex<HashMap<LogSettings, Weak<ErrorLog>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl ErrorLog {
    /// The process's log for these settings; files are created at the first line.
    pub fn shared(settings: LogSettings) -> Arc<ErrorLog> {
        let mut shared = SHARED.lock();
        shared.retain(|_, weak| weak.strong_count() > 0);
        if let Some(log) = shared.get(&settings).and_then(Weak::upgrade) {
            return log;
        }
        let log = Arc::new(ErrorLog {
            settings: settings.clone(),
            active: Mutex::new(Active::default()),
            checked: CacheLine::default(),
            queue: CacheLine::default(),
            batch_done: Condvar::new(),
            progress: CacheLine::default(),
            last_name_ms: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        });
        shared.insert(settings, Arc::downgrade(&log));
        log
    }

    pub fn settings(&self) -> &LogSettings {
        &self.settings
    }

    /// Lines that could not be written (reported through `tracing`, never to the caller).
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// The file lines currently go to, once one exists.
    pub fn current_path(&self) -> Option<PathBuf> {
        self.active.lock().current.as_ref().map(|a| a.path.clone())
    }

    /// Appends one line for an error recorded at `unix_ms`. A failure is counted and traced
    /// with the path it concerns; it never fails the caller.
    pub fn append(&self, clock: &dyn Clock, unix_ms: u64, code: i32, message: &str) {
        let result = line::with_line(unix_ms, code, message, |line| self.append_line(clock, line));
        if let Err(err) = result {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                path = %err.path.display(),
                action = err.action,
                error = %err.source,
                "could not write the error log; the line is lost"
            );
        }
    }

    /// fsync of the current file (cleanup, and before a planned exit).
    pub fn flush(&self) {
        if let Some(active) = self.active.lock().current.as_ref() {
            if let Err(err) = active.file.sync_data() {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %active.path.display(), error = %err, "could not fsync the error log");
            }
        }
    }
}
