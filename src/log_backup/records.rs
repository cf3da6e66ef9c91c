//! Durable retry records of log-backup commands: one file per (task, command) under
//! `<state_dir>/log_backup/`, replaced atomically (temp, fsync, rename, fsync of the dir).
//!
//! Task names are never used raw as file names: the file is named by a 64-bit FNV-1a hash
//! of the task and the command, and holds the full task name (hex) to detect a collision.
//! The file ends with a checksum; a file that does not parse or check is reported as
//! BACKUP_ERROR_DATA_CORRUPTION with its path, never silently reset.

use super::SubCommand;
use crate::durable::{self, FileError};
use crate::error::{ErrorCode, Failure};
use crate::hex::{hex, unhex};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub struct RecordStore {
    dir: PathBuf,
    /// One runner at a time per (task, command) in this process.
    key_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
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
        RecordStore {
            dir: state_dir.join("log_backup"),
            key_locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn path(&self, task: &str, command: SubCommand) -> PathBuf {
        self.dir.join(format!(
            "{:016x}-{}.rec",
            fnv1a64(task.as_bytes()),
            command.name()
        ))
    }

    /// Serializes runners of one (task, command) in this process.
    pub fn lock_key(&self, task: &str, command: SubCommand) -> Arc<Mutex<()>> {
        self.key_locks
            .lock()
            .entry(self.path(task, command))
            .or_default()
            .clone()
    }

    pub fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>, Failure> {
        let path = self.path(task, command);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileError::new("read retry records", &path, e).into()),
        };
        let corrupt = |why: &str| {
            Failure::new(
                ErrorCode::DataCorruption,
                format!(
                    "Data corruption detected: retry record file {}: {why}",
                    path.display()
                ),
            )
        };
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
                    .push(parse_record(value).ok_or_else(|| corrupt("bad record"))?),
                _ => return Err(corrupt("unknown field")),
            }
        }
        Ok(Some(sequence))
    }

    pub fn save(
        &self,
        task: &str,
        command: SubCommand,
        sequence: &Sequence,
    ) -> Result<(), Failure> {
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
            let _ = writeln!(
                body,
                "record {} {} {} {} {} {}",
                r.retry_num,
                r.detect_failed_at_ms,
                r.expected_retry_at_ms,
                r.real_retry_at_ms,
                r.reason_code,
                hex(r.original_reason.as_bytes())
            );
        }
        let checksum = fnv1a64(body.as_bytes());
        let _ = writeln!(body, "checksum {checksum:016x}");
        durable::write_atomic(&self.path(task, command), body.as_bytes()).map_err(Failure::from)
    }

    /// Removes the records of (task, command); none is fine.
    pub fn remove(&self, task: &str, command: SubCommand) -> Result<(), Failure> {
        let path = self.path(task, command);
        match fs::remove_file(&path) {
            Ok(()) => durable::sync_dir(&self.dir).map_err(Failure::from),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FileError::new("remove retry records", &path, e).into()),
        }
    }

    fn ensure_dir(&self) -> Result<(), Failure> {
        if self.dir.is_dir() {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&self.dir)
            .map_err(|e| FileError::new("create directory", &self.dir, e))?;
        // The new directory entry must survive a crash too.
        durable::sync_dir(durable::parent_dir(&self.dir)).map_err(Failure::from)
    }
}

fn parse_record(value: &str) -> Option<RetryRecord> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        store.save(task, SubCommand::Start, &sample()).unwrap();
        assert_eq!(store.load(task, SubCommand::Start).unwrap(), Some(sample()));
        assert_eq!(store.load(task, SubCommand::Stop).unwrap(), None);
        assert_eq!(store.load("other", SubCommand::Start).unwrap(), None);
        let name = store.path(task, SubCommand::Start);
        assert!(name.parent().unwrap().ends_with("log_backup"));
        store.remove(task, SubCommand::Start).unwrap();
        assert_eq!(store.load(task, SubCommand::Start).unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        store.save("t", SubCommand::Pause, &sample()).unwrap();
        let path = store.path("t", SubCommand::Pause);
        let mut bytes = fs::read(&path).unwrap();
        bytes[30] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = store.load("t", SubCommand::Pause).unwrap_err();
        assert_eq!(err.code, ErrorCode::DataCorruption.raw());
        assert!(
            err.detail.contains(&path.display().to_string()),
            "{}",
            err.detail
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
