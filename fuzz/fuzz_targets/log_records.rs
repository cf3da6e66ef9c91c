//! The log-backup retry-record file reader: arbitrary file contents for a (task, command)
//! are loaded with `FileLogRecords::load`. Half the inputs get a correct checksum line
//! appended, so that the fuzzer reaches the parser behind the checksum.
//!
//! Must hold: Ok or BACKUP_ERROR_DATA_CORRUPTION (naming the file), never a panic; a file
//! that is not the task's records (it names another task or command, or is empty) loads as
//! none and is left as it was; and what loads is what a save writes back: saving the loaded
//! sequence and loading it again gives the same sequence.
#![no_main]

use arbitrary::Arbitrary;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::log_backup::records::{fnv1a64, FileLogRecords, LogRecordStore};
use backup_coordinator::log_backup::SubCommand;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    task: String,
    command: u8,
    fix_checksum: bool,
    contents: Vec<u8>,
}

fn scratch_dir() -> tempfile::TempDir {
    let base = std::path::Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).expect("temp dir")
    } else {
        tempfile::tempdir().expect("temp dir")
    }
}

fuzz_target!(|input: Input| {
    if input.task.is_empty() || input.task.len() > 255 {
        return;
    }
    let command = SubCommand::ALL[input.command as usize % SubCommand::ALL.len()];
    let dir = scratch_dir();
    let store = FileLogRecords::new(dir.path());
    let path = store.path(&input.task, command);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut contents = input.contents.clone();
    if input.fix_checksum {
        let sum = fnv1a64(&contents);
        contents.extend_from_slice(format!("checksum {sum:016x}\n").as_bytes());
    }
    std::fs::write(&path, &contents).unwrap();
    match store.load(&input.task, command) {
        Ok(Some(sequence)) => {
            let run = store
                .begin_run(&input.task, command)
                .expect("nobody else runs it");
            run.save(&sequence).expect("save what was loaded");
            drop(run);
            let again = store
                .load(&input.task, command)
                .expect("load what was saved");
            assert_eq!(again.as_ref(), Some(&sequence), "a save does not load back");
        }
        // A file naming another (task, command) (names may collide), or an empty one (a
        // name being taken), is not this task's records: it is left exactly as it was.
        Ok(None) => assert_eq!(
            std::fs::read(&path).unwrap(),
            contents,
            "a file that is not the task's records was changed"
        ),
        Err(failure) => {
            assert_eq!(
                failure.code(),
                ErrorCode::DataCorruption.raw(),
                "unexpected failure {failure:?}"
            );
            assert!(
                failure.detail().contains(&*path.to_string_lossy()),
                "the error does not name the file: {}",
                failure.detail()
            );
        }
    }
});
