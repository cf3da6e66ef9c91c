//! Many threads recording through the plugin's C entry point at once (C_API §4, §6): every
//! line is in the log exactly once and whole, files roll by size while the threads write,
//! and the counts, the last error and the history agree with what was recorded. Its own
//! test binary: the plugin is one instance per process.

use backup_coordinator::error_log::log_files;
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_error_stats, backup_plugin_get_last_error,
    backup_plugin_init, backup_plugin_record_error,
};
use std::collections::HashSet;
use std::ffi::{c_char, CStr, CString};
use std::fs;

const THREADS: usize = 8;
const LINES: usize = 1500;
const ROTATION: u64 = 16 * 1024;

/// Lines of varied lengths, so that batches end anywhere against the rotation size.
fn message(t: usize, i: usize) -> String {
    format!(
        "thread {t} line {i:05} {}",
        "x".repeat((t * 7 + i * 13) % 300)
    )
}

#[test]
fn threads_recording_through_the_plugin_lose_glue_and_repeat_no_line_across_rotations() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("errors");
    let config = format!(
        "error_store_path = \"{}\"\nerror_log_rotation_size = \"16KB\"\nerror_log_rotation_count = 100000\nerror_buffer_size = 100\n",
        dir.display()
    );
    assert_eq!(
        backup_plugin_init(config.as_ptr() as *const c_char, config.len() as u32),
        0
    );
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for i in 0..LINES {
                    let text = CString::new(message(t, i)).unwrap();
                    backup_plugin_record_error(-6, text.as_ptr());
                }
            });
        }
    });

    let (mut errors, mut retries) = (0u64, 0u64);
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    assert_eq!((errors, retries), ((THREADS * LINES) as u64, 0));
    let last = unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_str()
        .unwrap()
        .to_string();
    // The last error is the last line of some thread (each thread's lines are in order).
    assert!(
        (0..THREADS).any(|t| last == message(t, LINES - 1)),
        "last error {last:?}"
    );

    let files = log_files(&dir).unwrap();
    assert!(
        files.len() > 10,
        "the log rolled only {} times",
        files.len()
    );
    let mut seen = HashSet::new();
    let mut next_of_thread = [0usize; THREADS];
    for (_, path) in &files {
        let text = fs::read_to_string(path).unwrap();
        assert!(text.len() as u64 <= ROTATION, "{} too big", path.display());
        assert!(
            text.ends_with('\n'),
            "{} ends in a partial line",
            path.display()
        );
        for line in text.lines() {
            let (stamp, rest) = line.split_once("] Error -6: ").expect(line);
            assert!(
                stamp.strip_prefix('[').unwrap().parse::<u64>().is_ok(),
                "{line}"
            );
            let mut words = rest.split(' ');
            let (t, i): (usize, usize) = match (words.next(), words.next(), words.next()) {
                (Some("thread"), Some(t), Some("line")) => {
                    (t.parse().unwrap(), words.next().unwrap().parse().unwrap())
                }
                _ => panic!("not a recorded line: {line:?}"),
            };
            assert_eq!(rest, message(t, i), "line glued or cut: {line:?}");
            assert!(seen.insert((t, i)), "{rest} twice");
            // Files are in name order, lines of one thread were recorded one after another.
            assert_eq!(i, next_of_thread[t], "thread {t}'s lines out of order");
            next_of_thread[t] += 1;
        }
    }
    assert_eq!(seen.len(), THREADS * LINES);
    backup_plugin_cleanup();
}
