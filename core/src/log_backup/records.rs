//! Durable retry records of log-backup commands, behind [`LogRecordStore`]: the store of
//! the records of each (task, command), and the claim that lets one runner at a time run
//! it, across threads, processes and (with a shared store) hosts.
//!
//! [`FileLogRecords`] is the embedded implementation: one file per (task, command) under
//! `<state_dir>/log_backup/`, replaced atomically (temp, fsync, rename, fsync of the dir).
//! A run is claimed by a lock the kernel releases when the runner's process dies (see
//! [`super::run_lock`]): a dead runner never blocks the next.
//!
//! Task names are never used raw as file names: the file is named by the SHA-256 of the
//! task (hex) and the command, `<sha256(task)>-<command>.rec`, and holds the full task name
//! (hex) and the command, which every load, save and removal checks. Names that collide all
//! the same (which SHA-256 makes a matter of principle, and the tests force) take the next
//! free of 8 names (`NAMES_PER_TASK`), `<sha256(task)>-<command>.<n>.rec`, and a file is only
//! ever read as, written over or removed for the (task, command) written inside it.
//!
//! Files written before this layout are named by a 64-bit FNV-1a hash of the task
//! (`<fnv64(task)>-<command>.rec`, which two task names may share): they are still read
//! when their content names the task asked for, and the first save under the new name
//! removes them; a file of that layout naming another task is left alone.
//!
//! The file ends with a checksum; a file that does not parse or check is reported as
//! BACKUP_ERROR_DATA_CORRUPTION with its path, never silently reset.

use super::run_lock::{slot_of, RunLocks, RunSlot};
use super::SubCommand;
use crate::durable::{self, FileError};
use crate::error::{Error, Result};
use crate::hex::{hex, unhex};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Longest reason kept, NUL excluded (the C record has 256 bytes).
pub const MAX_REASON_BYTES: usize = 255;
const MAGIC: &str = "backup-log-retry v1";
/// How many file names the records of one (task, command) may take: the first unless other
/// (task, command)s whose names collide hold it.
const NAMES_PER_TASK: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRecord {
    pub retry_num: u32,
    pub detect_failed_at_ms: u64,
    pub expected_retry_at_ms: u64,
    /// 0 until the retry ran; persisted before the attempt starts.
    pub real_retry_at_ms: u64,
    pub reason_code: i32,
    pub original_reason: String,
}

/// The records of one (task, command): a sequence that ends in a terminal outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sequence {
    pub records: Vec<RetryRecord>,
    /// `None` while unfinished; the terminal code once finished.
    pub outcome: Option<i32>,
    /// Unix ms of the first detected failure: the start of the budget.
    pub first_failure_ms: Option<u64>,
}

/// Where the retry records of log-backup commands live, and who runs each (task, command).
pub trait LogRecordStore: Send + Sync {
    /// Claims the run of (task, command) for the caller: BACKUP_ERROR_IN_PROGRESS at once
    /// while another live runner (thread, process, host) holds it. The claim ends when the
    /// returned guard is dropped, or when its runner dies.
    fn begin_run(&self, task: &str, command: SubCommand) -> Result<Box<dyn RunClaim + '_>>;

    /// [`Self::begin_run`] as the attempt of one call whose identity `run` is the same on
    /// every retry of that call: a claim an earlier attempt made whose answer was lost is
    /// found again as this call's own, not as another runner's (BACKUP_ERROR_IN_PROGRESS).
    /// A store whose claims cannot be left behind by a lost answer ignores `run`.
    fn begin_run_as(
        &self,
        task: &str,
        command: SubCommand,
        run: crate::idempotency::ClaimId,
    ) -> Result<Box<dyn RunClaim + '_>> {
        let _ = run;
        self.begin_run(task, command)
    }

    /// The records of (task, command), if any.
    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>>;

    /// Removes the records of (task, command), abandoning an unfinished sequence; none is
    /// fine. While a run holds (task, command): BACKUP_ERROR_IN_PROGRESS, nothing removed.
    fn reset(&self, task: &str, command: SubCommand) -> Result<()>;
}

/// The running claim of one (task, command): its writes are fenced on the claim.
pub trait RunClaim {
    /// Persists the sequence (durable before this returns).
    fn save(&self, sequence: &Sequence) -> Result<()>;
    /// Removes the records (a success clears them); none is fine.
    fn remove(&self) -> Result<()>;
}

pub fn in_progress(task: &str, command: SubCommand) -> Error {
    Error::InProgress(format!(
        "{} of task {task:?} is being run by another caller",
        command.name()
    ))
}

pub struct FileLogRecords {
    dir: PathBuf,
    runs: RunLocks,
    /// The file-name stem of a task's records: [`sha256_name`] (a test injects one that
    /// collides).
    name: fn(&str) -> String,
}

/// The SHA-256 of the task name, hex: the stem of its record files.
pub fn sha256_name(task: &str) -> String {
    hex(&Sha256::digest(task.as_bytes()))
}

/// What one record file name holds.
enum Slot {
    /// No file.
    Free,
    /// An empty file: a save is taking this name (or died taking it).
    Taken,
    /// A file that does not parse or check: whose it is cannot be known.
    Corrupt(Error),
    /// The records of the (task, command) written inside.
    Holds {
        task: Vec<u8>,
        command: String,
        sequence: Sequence,
    },
}

impl Slot {
    fn is(&self, task: &str, command: SubCommand) -> bool {
        matches!(self, Slot::Holds { task: t, command: c, .. }
            if t.as_slice() == task.as_bytes() && c == command.name())
    }
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Cuts a reason to what the C record holds, at a character boundary.
pub fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

impl FileLogRecords {
    pub fn new(state_dir: &Path) -> Self {
        Self::with_naming(state_dir, sha256_name)
    }

    /// A store whose file names come from `name` (the tests make names collide).
    fn with_naming(state_dir: &Path, name: fn(&str) -> String) -> Self {
        let dir = state_dir.join("log_backup");
        FileLogRecords {
            runs: RunLocks::new(&dir),
            dir,
            name,
        }
    }

    /// The file names the records of (task, command) may have, in the order they are
    /// taken: `<stem>-<command>.rec`, then `<stem>-<command>.<n>.rec`.
    fn names(&self, task: &str, command: SubCommand) -> impl Iterator<Item = PathBuf> + '_ {
        let stem = format!("{}-{}", (self.name)(task), command.name());
        (0..NAMES_PER_TASK).map(move |n| match n {
            0 => self.dir.join(format!("{stem}.rec")),
            n => self.dir.join(format!("{stem}.{n}.rec")),
        })
    }

    /// The name of the layout before SHA-256 names, which two tasks may share.
    fn legacy_path(&self, task: &str, command: SubCommand) -> PathBuf {
        self.dir.join(format!(
            "{:016x}-{}.rec",
            fnv1a64(task.as_bytes()),
            command.name()
        ))
    }

    /// Every file that may hold the records of (task, command): its names, then the legacy one.
    fn candidates(&self, task: &str, command: SubCommand) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.names(task, command).collect();
        paths.push(self.legacy_path(task, command));
        paths
    }

    /// The first name of (task, command)'s records: where they are unless other tasks'
    /// records hold that name.
    pub fn path(&self, task: &str, command: SubCommand) -> PathBuf {
        self.names(task, command)
            .next()
            .expect("NAMES_PER_TASK > 0")
    }

    fn read_slot(path: &Path) -> Result<Slot> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Slot::Free),
            Err(e) => return Err(FileError::new("read retry records", path, e).into()),
        };
        if bytes.is_empty() {
            return Ok(Slot::Taken);
        }
        Ok(match parse(&bytes) {
            Ok((task, command, sequence)) => Slot::Holds {
                task,
                command,
                sequence,
            },
            Err(why) => Slot::Corrupt(Error::Corruption(format!(
                "retry record file {}: {why}",
                path.display()
            ))),
        })
    }

    /// The records of (task, command): the file that names them inside, under one of their
    /// names or the legacy one. A corrupt file among those names is reported (it may be
    /// theirs) unless theirs is found intact elsewhere.
    pub fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>> {
        let mut corrupt = None;
        for path in self.candidates(task, command) {
            match Self::read_slot(&path)? {
                Slot::Holds {
                    task: t,
                    command: c,
                    sequence,
                } if t.as_slice() == task.as_bytes() && c == command.name() => {
                    return Ok(Some(sequence))
                }
                Slot::Corrupt(failure) => {
                    corrupt.get_or_insert(failure);
                }
                _ => {}
            }
        }
        corrupt.map_or(Ok(None), Err)
    }

    /// Where a save of (task, command) goes: the name that holds its records, else the
    /// first free name, taken at once (an empty file, created exclusively) so that another
    /// task whose names collide cannot take it too.
    fn name_for_save(&self, task: &str, command: SubCommand) -> Result<PathBuf> {
        loop {
            let mut free = None;
            for path in self.names(task, command) {
                match Self::read_slot(&path)? {
                    slot if slot.is(task, command) => return Ok(path),
                    Slot::Free => {
                        free.get_or_insert(path);
                    }
                    _ => {}
                }
            }
            let Some(path) = free else {
                return Err(Error::Corruption(format!(
                    "all {NAMES_PER_TASK} names of the retry records of {} of task {task:?} in {} are taken by other tasks' files",
                    command.name(),
                    self.dir.display()
                )));
            };
            // The mode and flags of a file durable::write_atomic creates.
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(_) => return Ok(path),
                // Taken meanwhile by another task's save: look again.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(FileError::new("create retry records", &path, e).into()),
            }
        }
    }

    fn save(&self, task: &str, command: SubCommand, sequence: &Sequence) -> Result<()> {
        self.ensure_dir()?;
        let mut body = String::new();
        let _ = writeln!(body, "{MAGIC}");
        let _ = writeln!(body, "task {}", hex(task.as_bytes()));
        let _ = writeln!(body, "command {}", command.name());
        match sequence.outcome {
            None => body.push_str("outcome none\n"),
            Some(code) => {
                let _ = writeln!(body, "outcome {code}");
            }
        }
        let _ = writeln!(
            body,
            "first_failure {}",
            sequence.first_failure_ms.unwrap_or(0)
        );
        for r in &sequence.records {
            let _ = writeln!(body, "record {}", r.fields());
        }
        let checksum = fnv1a64(body.as_bytes());
        let _ = writeln!(body, "checksum {checksum:016x}");
        let path = self.name_for_save(task, command)?;
        durable::write_atomic(&path, body.as_bytes()).map_err(Error::from)?;
        // The records now live under their new name: a file of the legacy layout that
        // holds them goes (one of another task is left alone).
        let legacy = self.legacy_path(task, command);
        if legacy != path && Self::read_slot(&legacy)?.is(task, command) {
            self.remove_file(&legacy)?;
            durable::sync_dir(&self.dir).map_err(Error::from)?;
        }
        Ok(())
    }

    /// Removes the records of (task, command); none is fine. Only files that name them
    /// inside are removed; with `reset`, also the corrupt (and empty) files under their
    /// names, whose owner cannot be known and which would fail every load of theirs. A
    /// readable file of another task is never removed.
    fn remove(&self, task: &str, command: SubCommand, reset: bool) -> Result<()> {
        let mut removed = false;
        for path in self.candidates(task, command) {
            let slot = Self::read_slot(&path)?;
            let theirs = slot.is(task, command);
            if theirs || (reset && matches!(slot, Slot::Corrupt(_) | Slot::Taken)) {
                removed |= self.remove_file(&path)?;
            }
        }
        if removed {
            durable::sync_dir(&self.dir).map_err(Error::from)?;
        }
        Ok(())
    }

    /// `Ok(true)` when it removed the file, `Ok(false)` when there was none.
    fn remove_file(&self, path: &Path) -> Result<bool> {
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(FileError::new("remove retry records", path, e).into()),
        }
    }

    fn ensure_dir(&self) -> Result<()> {
        // 0750 whatever the umask; the new directory entry must survive a crash too.
        durable::create_private_dir(&self.dir).map_err(Error::from)
    }
}

/// The run of one (task, command) in the file store.
struct FileRun<'a> {
    store: &'a FileLogRecords,
    task: String,
    command: SubCommand,
    _slot: RunSlot<'a>,
}

impl RunClaim for FileRun<'_> {
    fn save(&self, sequence: &Sequence) -> Result<()> {
        self.store.save(&self.task, self.command, sequence)
    }

    fn remove(&self) -> Result<()> {
        self.store.remove(&self.task, self.command, false)
    }
}

/// One record file, as `records list` shows it (docs/C_API.md §11): the task and command
/// written inside and their records, or why the file does not parse.
pub type ListedRecords = (PathBuf, Result<(Vec<u8>, String, Sequence)>);

impl FileLogRecords {
    /// Every record file of the store, sorted by name (for the operator's command line;
    /// never on a runner's path). A file being taken (empty) is left out.
    pub fn list(&self) -> Result<Vec<ListedRecords>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FileError::new("list", &self.dir, e).into()),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rec"))
            .collect();
        paths.sort();
        let mut listed = Vec::new();
        for path in paths {
            match Self::read_slot(&path)? {
                Slot::Holds {
                    task,
                    command,
                    sequence,
                } => listed.push((path, Ok((task, command, sequence)))),
                Slot::Corrupt(failure) => listed.push((path, Err(failure))),
                Slot::Free | Slot::Taken => {}
            }
        }
        Ok(listed)
    }
}

impl LogRecordStore for FileLogRecords {
    fn begin_run(&self, task: &str, command: SubCommand) -> Result<Box<dyn RunClaim + '_>> {
        if !self.runs.is_open() {
            self.ensure_dir()?;
        }
        // The slot hashes the task and the command: one lock per (task, command).
        let key = fnv1a64(format!("{}\0{task}", command.name()).as_bytes());
        match self.runs.try_acquire(slot_of(key))? {
            Some(slot) => Ok(Box::new(FileRun {
                store: self,
                task: task.to_string(),
                command,
                _slot: slot,
            })),
            None => Err(in_progress(task, command)),
        }
    }

    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>> {
        FileLogRecords::load(self, task, command)
    }

    fn reset(&self, task: &str, command: SubCommand) -> Result<()> {
        let _run = self.begin_run(task, command)?;
        self.remove(task, command, true)
    }
}

/// A record file's content: the task (bytes) and the command named inside, and the
/// sequence; `Err` says why it is not one.
fn parse(bytes: &[u8]) -> Result<(Vec<u8>, String, Sequence), &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let body_end = text.rfind("checksum ").ok_or("no checksum")?;
    let (body, checksum_line) = text.split_at(body_end);
    let stored = checksum_line
        .trim_end()
        .strip_prefix("checksum ")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or("unreadable checksum")?;
    if stored != fnv1a64(body.as_bytes()) {
        return Err("checksum mismatch");
    }
    let mut lines = body.lines();
    if lines.next() != Some(MAGIC) {
        return Err("unknown format");
    }
    let (mut task, mut command) = (None, None);
    let mut sequence = Sequence::default();
    for line in lines {
        let (key, value) = line.split_once(' ').ok_or("malformed line")?;
        match key {
            "task" if task.is_none() => task = Some(unhex(value).ok_or("bad task")?),
            "command" if command.is_none() => command = Some(value.to_string()),
            "outcome" => {
                sequence.outcome = match value {
                    "none" => None,
                    code => Some(code.parse().map_err(|_| "bad outcome")?),
                }
            }
            "first_failure" => {
                let ms: u64 = value.parse().map_err(|_| "bad first_failure")?;
                sequence.first_failure_ms = (ms > 0).then_some(ms);
            }
            "record" => sequence
                .records
                .push(RetryRecord::parse_fields(value).ok_or("bad record")?),
            _ => return Err("unknown or repeated field"),
        }
    }
    match (task, command) {
        (Some(task), Some(command)) => Ok((task, command, sequence)),
        _ => Err("it does not name its task and command"),
    }
}

impl RetryRecord {
    /// The record as one line of text (both stores' formats): its six fields, space
    /// separated, the reason in hex.
    pub fn fields(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.retry_num,
            self.detect_failed_at_ms,
            self.expected_retry_at_ms,
            self.real_retry_at_ms,
            self.reason_code,
            hex(self.original_reason.as_bytes())
        )
    }

    /// The record of [`RetryRecord::fields`]; `None` when the text is not one.
    pub fn parse_fields(value: &str) -> Option<RetryRecord> {
        let mut parts = value.split(' ');
        let record = RetryRecord {
            retry_num: parts.next()?.parse().ok()?,
            detect_failed_at_ms: parts.next()?.parse().ok()?,
            expected_retry_at_ms: parts.next()?.parse().ok()?,
            real_retry_at_ms: parts.next()?.parse().ok()?,
            reason_code: parts.next()?.parse().ok()?,
            original_reason: String::from_utf8(unhex(parts.next().unwrap_or(""))?).ok()?,
        };
        parts.next().is_none().then_some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn sample() -> Sequence {
        Sequence {
            records: vec![RetryRecord {
                retry_num: 1,
                detect_failed_at_ms: 1000,
                expected_retry_at_ms: 31_000,
                real_retry_at_ms: 0,
                reason_code: -6,
                original_reason: "execute start failed: Network error".into(),
            }],
            outcome: None,
            first_failure_ms: Some(1000),
        }
    }

    #[test]
    fn round_trips_and_is_per_task_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLogRecords::new(dir.path());
        let task = "tâche/../with spaces\nand newline";
        assert_eq!(store.load(task, SubCommand::Start).unwrap(), None);
        let run = store.begin_run(task, SubCommand::Start).unwrap();
        run.save(&sample()).unwrap();
        assert_eq!(store.load(task, SubCommand::Start).unwrap(), Some(sample()));
        assert_eq!(store.load(task, SubCommand::Stop).unwrap(), None);
        assert_eq!(store.load("other", SubCommand::Start).unwrap(), None);
        let name = store.path(task, SubCommand::Start);
        assert!(name.parent().unwrap().ends_with("log_backup"));
        run.remove().unwrap();
        assert_eq!(store.load(task, SubCommand::Start).unwrap(), None);
    }

    #[test]
    fn one_runner_at_a_time_and_no_reset_under_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLogRecords::new(dir.path());
        // A second handle on the same directory stands for another process.
        let other = FileLogRecords::new(dir.path());
        let run = store.begin_run("t", SubCommand::Stop).unwrap();
        run.save(&sample()).unwrap();
        let busy = |r: Result<_>| r.err().map(|f| f.code()) == Some(ErrorCode::InProgress.raw());
        assert!(busy(store.begin_run("t", SubCommand::Stop).map(|_| ())));
        assert!(busy(other.begin_run("t", SubCommand::Stop).map(|_| ())));
        assert!(busy(other.reset("t", SubCommand::Stop)));
        assert_eq!(other.load("t", SubCommand::Stop).unwrap(), Some(sample()));
        // Another command or task is not held.
        drop(other.begin_run("t", SubCommand::Start).unwrap());
        drop(run);
        other.reset("t", SubCommand::Stop).unwrap();
        assert_eq!(store.load("t", SubCommand::Stop).unwrap(), None);
        // Nothing piles up per run: only the one shared lock file is left.
        let left: Vec<_> = fs::read_dir(dir.path().join("log_backup"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["runs.lock"]);
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLogRecords::new(dir.path());
        store
            .begin_run("t", SubCommand::Pause)
            .unwrap()
            .save(&sample())
            .unwrap();
        let path = store.path("t", SubCommand::Pause);
        let mut bytes = fs::read(&path).unwrap();
        bytes[30] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = store.load("t", SubCommand::Pause).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
        assert!(
            err.detail().contains(&path.display().to_string()),
            "{}",
            err.detail()
        );
        // Never silently reset: the file is still there, and a save does not replace it.
        assert!(path.exists());
        assert_eq!(fs::read(&path).unwrap(), bytes);
        // An explicit reset removes it (whose it is cannot be read; it blocks the task).
        store.reset("t", SubCommand::Pause).unwrap();
        assert!(!path.exists());
        assert_eq!(store.load("t", SubCommand::Pause).unwrap(), None);
    }

    fn sequence(retries: u32) -> Sequence {
        let mut sequence = sample();
        sequence.records[0].retry_num = retries;
        sequence
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("log_backup"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "runs.lock")
            .collect();
        names.sort();
        names
    }

    fn save(store: &FileLogRecords, task: &str, command: SubCommand, sequence: &Sequence) {
        store
            .begin_run(task, command)
            .unwrap()
            .save(sequence)
            .unwrap();
    }

    #[test]
    fn files_are_named_by_the_sha256_of_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLogRecords::new(dir.path());
        save(&store, "task-a", SubCommand::Start, &sample());
        // sha256("task-a")
        let sha = hex(&Sha256::digest(b"task-a"));
        assert_eq!(files(dir.path()), [format!("{sha}-start.rec")]);
        assert_eq!(
            store
                .path("task-a", SubCommand::Start)
                .file_name()
                .unwrap()
                .to_str(),
            Some(&*format!("{sha}-start.rec"))
        );
        let text = fs::read_to_string(store.path("task-a", SubCommand::Start)).unwrap();
        assert!(
            text.contains(&format!("\ntask {}\ncommand start\n", hex(b"task-a"))),
            "{text}"
        );
    }

    #[test]
    fn task_names_whose_file_names_collide_keep_separate_records_and_reset_never_deletes_the_others(
    ) {
        let dir = tempfile::tempdir().unwrap();
        // Every task gets the same file name: the worst a naming function can do.
        let store = FileLogRecords::with_naming(dir.path(), |_| "collide".to_string());
        let (a, b, c) = ("task-a", "task-b", "task-c");
        save(&store, a, SubCommand::Start, &sequence(1));
        save(&store, b, SubCommand::Start, &sequence(2));
        assert_eq!(
            files(dir.path()),
            ["collide-start.1.rec", "collide-start.rec"]
        );
        assert_eq!(store.load(a, SubCommand::Start).unwrap(), Some(sequence(1)));
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), Some(sequence(2)));
        assert_eq!(store.load(c, SubCommand::Start).unwrap(), None);
        // A save replaces the task's own file, not the other's.
        save(&store, b, SubCommand::Start, &sequence(3));
        assert_eq!(store.load(a, SubCommand::Start).unwrap(), Some(sequence(1)));
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), Some(sequence(3)));
        assert_eq!(files(dir.path()).len(), 2);

        // Reset of a removes a's file only, whichever name it has.
        store.reset(a, SubCommand::Start).unwrap();
        assert_eq!(store.load(a, SubCommand::Start).unwrap(), None);
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), Some(sequence(3)));
        assert_eq!(files(dir.path()), ["collide-start.1.rec"]);
        // A task with no records resets nothing of the others'.
        store.reset(c, SubCommand::Start).unwrap();
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), Some(sequence(3)));

        // The freed first name goes to the next task; b is still found behind the hole.
        save(&store, c, SubCommand::Start, &sequence(4));
        assert_eq!(store.load(c, SubCommand::Start).unwrap(), Some(sequence(4)));
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), Some(sequence(3)));
        // A success removes the runner's records only.
        store
            .begin_run(b, SubCommand::Start)
            .unwrap()
            .remove()
            .unwrap();
        assert_eq!(store.load(b, SubCommand::Start).unwrap(), None);
        assert_eq!(store.load(c, SubCommand::Start).unwrap(), Some(sequence(4)));
        assert_eq!(files(dir.path()), ["collide-start.rec"]);

        // Past NAMES_PER_TASK colliding tasks the save is refused, nothing overwritten.
        for i in 1..NAMES_PER_TASK {
            save(
                &store,
                &format!("more-{i}"),
                SubCommand::Start,
                &sequence(10 + i as u32),
            );
        }
        let full = store
            .begin_run("one-too-many", SubCommand::Start)
            .unwrap()
            .save(&sample())
            .unwrap_err();
        assert_eq!(full.code(), ErrorCode::DataCorruption.raw());
        assert_eq!(store.load(c, SubCommand::Start).unwrap(), Some(sequence(4)));
        for i in 1..NAMES_PER_TASK {
            let task = format!("more-{i}");
            assert_eq!(
                store.load(&task, SubCommand::Start).unwrap(),
                Some(sequence(10 + i as u32))
            );
        }
    }

    /// The store of the layout before SHA-256 names: files named by the FNV-1a hash.
    fn legacy_store(dir: &Path) -> FileLogRecords {
        FileLogRecords::with_naming(dir, |task| format!("{:016x}", fnv1a64(task.as_bytes())))
    }

    #[test]
    fn files_of_the_fnv_layout_are_read_when_they_name_the_task_and_move_on_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        save(
            &legacy_store(dir.path()),
            "t",
            SubCommand::Stop,
            &sequence(1),
        );
        let legacy = format!("{:016x}-stop.rec", fnv1a64(b"t"));
        assert_eq!(files(dir.path()), [legacy]);
        let store = FileLogRecords::new(dir.path());
        assert_eq!(
            store.load("t", SubCommand::Stop).unwrap(),
            Some(sequence(1))
        );
        assert_eq!(store.load("t", SubCommand::Start).unwrap(), None);
        // The next save writes the new name and removes the old file.
        save(&store, "t", SubCommand::Stop, &sequence(2));
        assert_eq!(
            files(dir.path()),
            [format!("{}-stop.rec", sha256_name("t"))]
        );
        assert_eq!(
            store.load("t", SubCommand::Stop).unwrap(),
            Some(sequence(2))
        );

        // A reset removes a legacy file of the task too.
        save(
            &legacy_store(dir.path()),
            "u",
            SubCommand::Stop,
            &sequence(3),
        );
        store.reset("u", SubCommand::Stop).unwrap();
        assert_eq!(store.load("u", SubCommand::Stop).unwrap(), None);
        assert_eq!(files(dir.path()).len(), 1);
    }

    #[test]
    fn a_file_of_the_fnv_layout_naming_another_task_is_neither_read_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        // "other"'s records under the FNV name of "t": what two task names that collide in
        // FNV-1a left behind in the old layout.
        let colliding =
            FileLogRecords::with_naming(dir.path(), |_| format!("{:016x}", fnv1a64(b"t")));
        save(&colliding, "other", SubCommand::Start, &sequence(1));
        let before = files(dir.path());
        let store = FileLogRecords::new(dir.path());
        assert_eq!(store.load("t", SubCommand::Start).unwrap(), None);
        store.reset("t", SubCommand::Start).unwrap();
        save(&store, "t", SubCommand::Start, &sequence(2));
        store
            .begin_run("t", SubCommand::Start)
            .unwrap()
            .remove()
            .unwrap();
        assert_eq!(files(dir.path()), before);
        assert_eq!(
            colliding.load("other", SubCommand::Start).unwrap(),
            Some(sequence(1))
        );
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
