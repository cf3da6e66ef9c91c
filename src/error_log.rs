//! The file-based error log of ABI §6.
//!
//! Each recorded error appends `[<unix ms>] Error <code>: <message>\n` to
//! `<dir>/backup_error_<unix ms at creation>.log`. A line goes to the kernel in one
//! `write(2)` before the record call returns, so it survives the process being killed
//! (fsync happens at flush, for power loss). Files roll by size; the oldest files beyond
//! the count, over the whole directory, are deleted. Names are unique and increasing
//! across processes: a file is created exclusively, later than every name present, and a
//! taken name moves to the next millisecond.

use crate::clock::Clock;
use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};

const FILE_PREFIX: &str = "backup_error_";
const FILE_SUFFIX: &str = ".log";
/// One message never takes more than this in a line; the rest is cut with "...".
const MAX_MESSAGE_BYTES: usize = 4096;

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

struct ActiveFile {
    file: File,
    path: PathBuf,
    size: u64,
}

pub struct ErrorLog {
    settings: LogSettings,
    active: Mutex<Option<ActiveFile>>,
    /// The last name this log chose, so that its own names increase even within one ms.
    last_name_ms: AtomicU64,
    write_failures: AtomicU64,
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
            active: Mutex::new(None),
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
        self.active.lock().as_ref().map(|a| a.path.clone())
    }

    /// Appends one line for an error recorded at `unix_ms`. A failure is counted and traced;
    /// it never fails the caller.
    pub fn append(&self, clock: &dyn Clock, unix_ms: u64, code: i32, message: &str) {
        // The line is built in a per-thread buffer: no allocation on this hot path.
        let result = LINE_BUFFER.with(|buffer| {
            let mut line = buffer.borrow_mut();
            line.clear();
            write_line(&mut line, unix_ms, code, message);
            self.append_line(clock, line.as_bytes())
        });
        if let Err(err) = result {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(dir = %self.settings.dir.display(), error = %err, "could not write the error log");
        }
    }

    fn append_line(&self, clock: &dyn Clock, line: &[u8]) -> io::Result<()> {
        let mut active = self.active.lock();
        let needs_new_file = match active.as_ref() {
            None => true,
            Some(a) => a.size > 0 && a.size + line.len() as u64 > self.settings.rotation_size,
        };
        if needs_new_file {
            *active = Some(self.create_file(clock)?);
        }
        let current = active.as_mut().expect("a file was just opened");
        // One write_all: a single write(2) for any line of sane size, looping on EINTR.
        current.file.write_all(line)?;
        current.size += line.len() as u64;
        Ok(())
    }

    /// fsync of the current file (cleanup, and before a planned exit).
    pub fn flush(&self) {
        if let Some(active) = self.active.lock().as_ref() {
            if let Err(err) = active.file.sync_data() {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %active.path.display(), error = %err, "could not fsync the error log");
            }
        }
    }

    fn create_file(&self, clock: &dyn Clock) -> io::Result<ActiveFile> {
        let dir = &self.settings.dir;
        if !dir.is_dir() {
            DirBuilder::new().recursive(true).mode(0o750).create(dir)?;
        }
        let newest_existing = log_files(dir)?.last().map(|(ms, _)| *ms).unwrap_or(0);
        let mut name_ms = clock
            .unix_ms()
            .max(newest_existing + 1)
            .max(self.last_name_ms.load(Ordering::Relaxed) + 1);
        let (file, path) = loop {
            let path = dir.join(format!("{FILE_PREFIX}{name_ms}{FILE_SUFFIX}"));
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => name_ms += 1,
                Err(e) => return Err(e),
            }
        };
        // The umask may have taken bits away; the contract says 0640.
        file.set_permissions(fs::Permissions::from_mode(0o640))?;
        self.last_name_ms.store(name_ms, Ordering::Relaxed);
        self.prune(&path);
        Ok(ActiveFile {
            file,
            path,
            size: 0,
        })
    }

    /// Deletes the oldest files beyond the count, never the one just created.
    fn prune(&self, keep: &Path) {
        let Ok(files) = log_files(&self.settings.dir) else {
            return;
        };
        let excess = files
            .len()
            .saturating_sub(self.settings.rotation_count as usize);
        for (_, path) in files.into_iter().take(excess) {
            if path != keep {
                if let Err(err) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %err, "could not delete an old error log");
                }
            }
        }
    }
}

/// The log files of a directory, oldest first.
pub fn log_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(ms) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FILE_PREFIX))
            .and_then(|n| n.strip_suffix(FILE_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        files.push((ms, entry.path()));
    }
    files.sort();
    Ok(files)
}

thread_local! {
    static LINE_BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `[<unix ms>] Error <code>: <message>\n`; control characters become spaces so that one
/// record is always one line, and an oversized message is cut.
pub fn format_line(unix_ms: u64, code: i32, message: &str) -> String {
    let mut line = String::with_capacity(32 + message.len().min(MAX_MESSAGE_BYTES));
    write_line(&mut line, unix_ms, code, message);
    line
}

fn write_line(line: &mut String, unix_ms: u64, code: i32, message: &str) {
    use std::fmt::Write as _;
    let _ = write!(line, "[{unix_ms}] Error {code}: ");
    line.push_str(&sanitize_message(message));
    line.push('\n');
}

/// One line of text of bounded size: control characters become spaces, the end is cut.
/// Borrows when the message is already clean (the common case).
pub fn sanitize_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES
        && !message.bytes().any(|b| b.is_ascii_control() || b >= 0x80)
    {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_BYTES));
    for ch in message.chars() {
        if out.len() + ch.len_utf8() > MAX_MESSAGE_BYTES {
            out.push_str("...");
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::os::unix::fs::MetadataExt;

    fn settings(dir: &Path, size: u64, count: u32) -> LogSettings {
        LogSettings {
            dir: dir.to_path_buf(),
            rotation_size: size,
            rotation_count: count,
        }
    }

    #[test]
    fn lines_have_the_contract_format() {
        assert_eq!(
            format_line(17, -6, "Network error"),
            "[17] Error -6: Network error\n"
        );
        assert_eq!(format_line(1, -1, "a\nb\rc"), "[1] Error -1: a b c\n");
        let long = "x".repeat(10_000);
        let line = format_line(1, -1, &long);
        assert!(line.len() < 4200 && line.ends_with("...\n"));
    }

    #[test]
    fn creates_directory_and_file_with_the_contract_modes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errors");
        let clock = ManualClock::new(1_700_000_000_000);
        let log = ErrorLog::shared(settings(&dir, 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -6, "Network error");
        log.append(&clock, clock.unix_ms(), -5, "File I/O error");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
        let files = log_files(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, 1_700_000_000_000);
        assert_eq!(fs::metadata(&files[0].1).unwrap().mode() & 0o777, 0o640);
        assert_eq!(
            fs::read_to_string(&files[0].1).unwrap(),
            "[1700000000000] Error -6: Network error\n[1700000000000] Error -5: File I/O error\n"
        );
        assert_eq!(log.write_failures(), 0);
    }

    #[test]
    fn rolls_by_size_and_keeps_the_newest_files() {
        let root = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 100, 3));
        for i in 0..40 {
            log.append(
                &clock,
                clock.unix_ms(),
                -6,
                &format!("failure number {i:04}"),
            );
        }
        let files = log_files(root.path()).unwrap();
        assert_eq!(files.len(), 3);
        // Names increase even though the clock stood still.
        assert!(files.windows(2).all(|w| w[0].0 < w[1].0));
        for (_, path) in &files {
            let len = fs::metadata(path).unwrap().len();
            assert!(len <= 100, "{} is {len} bytes", path.display());
        }
        let last = fs::read_to_string(&files[2].1).unwrap();
        assert!(last.ends_with("failure number 0039\n"));
    }

    #[test]
    fn names_move_past_files_of_other_processes() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("backup_error_5000.log"), "").unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        let names: Vec<u64> = log_files(root.path())
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(names, vec![5000, 5001]);
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("backup_error_1000.log")).unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(log
            .current_path()
            .unwrap()
            .ends_with("backup_error_1001.log"));
    }

    #[test]
    fn an_unwritable_directory_is_counted_not_raised() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("plain-file");
        fs::write(&file, "").unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(&file.join("sub"), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        assert_eq!(log.write_failures(), 1);
    }
}
