//! Durable retry records of log-backup commands, behind [`LogRecordStore`]: the store of
//! the records of each (task, command), and the claim that lets one runner at a time run
//! it, across threads, processes and (with a shared store) hosts.
//!
//! [`RecordStore`] is the embedded implementation: one file per (task, command) under
//! `<state_dir>/log_backup/`, replaced atomically (temp, fsync, rename, fsync of the dir).
//! A run is claimed by a lock the kernel releases when the runner's process dies (see
//! [`super::run_lock`]): a dead runner never blocks the next.
//!
//! Task names are never used raw as file names: the file is named by a 64-bit FNV-1a hash
//! of the task and the command, and holds the full task name (hex) to detect a collision.
//! The file ends with a checksum; a file that does not parse or check is reported as
//! BACKUP_ERROR_DATA_CORRUPTION with its path, never silently reset.

use super::run_lock::{slot_of, RunLocks, RunSlot};
use super::SubCommand;
use crate::durable::{self, FileError};
use crate::error::Failure;
use crate::hex::{hex, unhex};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Longest reason kept, NUL excluded (the C record has 256 bytes).
pub const MAX_REASON_BYTES: usize = 255;
const MAGIC: &str = "backup-log-retry v1";

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
    fn begin_run(&self, task: &str, command: SubCommand)
        -> Result<Box<dyn RunClaim + '_>, Failure>;

    /// [`Self::begin_run`] as the attempt of one call whose identity `run` is the same on
    /// every retry of that call: a claim an earlier attempt made whose answer was lost is
    /// found again as this call's own, not as another runner's (BACKUP_ERROR_IN_PROGRESS).
    /// A store whose claims cannot be left behind by a lost answer ignores `run`.
    fn begin_run_as(
        &self,
        task: &str,
        command: SubCommand,
        run: crate::idempotency::ClaimId,
    ) -> Result<Box<dyn RunClaim + '_>, Failure> {
        let _ = run;
        self.begin_run(task, command)
    }

    /// The records of (task, command), if any.
    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>, Failure>;

    /// Removes the records of (task, command), abandoning an unfinished sequence; none is
    /// fine. While a run holds (task, command): BACKUP_ERROR_IN_PROGRESS, nothing removed.
    fn reset(&self, task: &str, command: SubCommand) -> Result<(), Failure>;
}

/// The running claim of one (task, command): its writes are fenced on the claim.
pub trait RunClaim {
    /// Persists the sequence (durable before this returns).
    fn save(&self, sequence: &Sequence) -> Result<(), Failure>;
    /// Removes the records (a success clears them); none is fine.
    fn remove(&self) -> Result<(), Failure>;
}

pub fn in_progress(task: &str, command: SubCommand) -> Failure {
    Failure::InProgress(format!(
        "{} of task {task:?} is being run by another caller",
        command.name()
    ))
}

pub struct RecordStore {
    dir: PathBuf,
    runs: RunLocks,
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

impl RecordStore {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("log_backup");
        RecordStore {
            runs: RunLocks::new(&dir),
            dir,
        }
    }

    fn stem(task: &str, command: SubCommand) -> String {
        format!("{:016x}-{}", fnv1a64(task.as_bytes()), command.name())
    }

    pub fn path(&self, task: &str, command: SubCommand) -> PathBuf {
        self.dir.join(format!("{}.rec", Self::stem(task, command)))
    }

    pub fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>, Failure> {
        let path = self.path(task, command);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileError::new("read retry records", &path, e).into()),
        };
        let corrupt =
            |why: &str| Failure::Corruption(format!("retry record file {}: {why}", path.display()));
        let text = String::from_utf8(text).map_err(|_| corrupt("not UTF-8"))?;
        let body_end = text
            .rfind("checksum ")
            .ok_or_else(|| corrupt("no checksum"))?;
        let (body, checksum_line) = text.split_at(body_end);
        let stored = checksum_line
            .trim_end()
            .strip_prefix("checksum ")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| corrupt("unreadable checksum"))?;
        if stored != fnv1a64(body.as_bytes()) {
            return Err(corrupt("checksum mismatch"));
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(corrupt("unknown format"));
        }
        let mut sequence = Sequence::default();
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| corrupt("malformed line"))?;
            match key {
                "task" => {
                    if unhex(value).as_deref() != Some(task.as_bytes()) {
                        return Err(corrupt("it belongs to another task (hash collision)"));
                    }
                }
                "command" => {
                    if value != command.name() {
                        return Err(corrupt("it belongs to another command"));
                    }
                }
                "outcome" => {
                    sequence.outcome = match value {
                        "none" => None,
                        code => Some(code.parse().map_err(|_| corrupt("bad outcome"))?),
                    }
                }
                "first_failure" => {
                    let ms: u64 = value.parse().map_err(|_| corrupt("bad first_failure"))?;
                    sequence.first_failure_ms = (ms > 0).then_some(ms);
                }
                "record" => sequence
                    .records
                    .push(RetryRecord::parse_fields(value).ok_or_else(|| corrupt("bad record"))?),
                _ => return Err(corrupt("unknown field")),
            }
        }
        Ok(Some(sequence))
    }

    fn save(&self, task: &str, command: SubCommand, sequence: &Sequence) -> Result<(), Failure> {
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
        durable::write_atomic(&self.path(task, command), body.as_bytes()).map_err(Failure::from)
    }

    /// Removes the records of (task, command); none is fine.
    fn remove(&self, task: &str, command: SubCommand) -> Result<(), Failure> {
        let path = self.path(task, command);
        match fs::remove_file(&path) {
            Ok(()) => durable::sync_dir(&self.dir).map_err(Failure::from),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FileError::new("remove retry records", &path, e).into()),
        }
    }

    fn ensure_dir(&self) -> Result<(), Failure> {
        // 0750 whatever the umask; the new directory entry must survive a crash too.
        durable::create_private_dir(&self.dir).map_err(Failure::from)
    }
}

/// The run of one (task, command) in the file store.
struct FileRun<'a> {
    store: &'a RecordStore,
    task: String,
    command: SubCommand,
    _slot: RunSlot<'a>,
}

impl RunClaim for FileRun<'_> {
    fn save(&self, sequence: &Sequence) -> Result<(), Failure> {
        self.store.save(&self.task, self.command, sequence)
    }

    fn remove(&self) -> Result<(), Failure> {
        self.store.remove(&self.task, self.command)
    }
}

impl LogRecordStore for RecordStore {
    fn begin_run(
        &self,
        task: &str,
        command: SubCommand,
    ) -> Result<Box<dyn RunClaim + '_>, Failure> {
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

    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>, Failure> {
        RecordStore::load(self, task, command)
    }

    fn reset(&self, task: &str, command: SubCommand) -> Result<(), Failure> {
        let run = self.begin_run(task, command)?;
        run.remove()
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
        let store = RecordStore::new(dir.path());
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
        let store = RecordStore::new(dir.path());
        // A second handle on the same directory stands for another process.
        let other = RecordStore::new(dir.path());
        let run = store.begin_run("t", SubCommand::Stop).unwrap();
        run.save(&sample()).unwrap();
        let busy =
            |r: Result<_, Failure>| r.err().map(|f| f.code()) == Some(ErrorCode::InProgress.raw());
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
        let store = RecordStore::new(dir.path());
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
        // Never silently reset: the file is still there.
        assert!(path.exists());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
