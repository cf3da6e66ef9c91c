//! Fenced durable writes: the atomic replacement of [`crate::durable::write_atomic`], made
//! only if no write of the same file with a higher fencing token was made before.
//!
//! A claim (a lease, an idempotency key, a leader term) hands its holder a token that grows
//! with every new claim. A holder that stalled past its claim may wake up and write; the
//! token lets the file itself refuse that stale write, whatever the holder believes.
//!
//! # Where the token lives: a sidecar fence file
//!
//! The token of the last write of `<dir>/<name>` is kept in `<dir>/.<name>.fence`, a
//! 16-byte record: the magic `BCFN`, the token (u64 little-endian), and a CRC-32 of both.
//! A record that is neither empty nor exactly that (torn, truncated, foreign bytes) is
//! DATA_CORRUPTION, never read as "no token": that would let a stale writer through. The
//! name cannot be taken for a temp file of `durable` (`.<name>.<pid>.<seq>.tmp`: those end
//! in `.tmp`), so the sweep of dead writers' temps never removes it.
//!
//! Extended attributes were considered and rejected: not every file system carries user
//! xattrs (NFS, some tmpfs and overlay setups), and an xattr on the file being replaced
//! moves with each rename, so checking it and replacing the file atomically needs a stable
//! file to lock anyway. The sidecar is that file, and holds the token too.
//!
//! # One write: lock, check, raise the fence, replace
//!
//! 1. open (or create, 0640) the sidecar with `O_CLOEXEC | O_NOFOLLOW`;
//! 2. take an exclusive open-file-description lock on it (`F_OFD_SETLKW`), waiting for the
//!    writer that holds it. OFD locks belong to the open file, not to the process: threads
//!    of one process, each with its own descriptor, exclude each other, and closing an
//!    unrelated descriptor of the file never drops the lock (as it would a classic POSIX
//!    lock). Unlike `flock`, they reach the server on NFS, so writers on several hosts
//!    sharing a file system that honours POSIX locks exclude each other too;
//! 3. read the stored token: higher than ours is FENCED, the file untouched;
//! 4. otherwise raise the fence durably *first*: our token into the sidecar, fdatasync
//!    (and the directory fsynced when the sidecar held no token yet, so its entry is
//!    durable before any content depends on it);
//! 5. *then* replace the content ([`write_atomic`]: temp file, fsync, rename, fsync of the
//!    directory). The lock goes with the descriptor.
//!
//! Why this order: a crash between 4 and 5 leaves a raised fence over the old content,
//! which only a retry of the same claim (an equal token) or a newer claim can then
//! overwrite, never a stale one. The opposite order could leave the new content under the
//! old fence, which a stale writer would then be allowed to overwrite. An equal token
//! rewrites: it is a retry of the same claim. The record is rewritten in place (16 bytes at
//! offset 0, inside one disk sector), so the lock stays on one inode for the file's life.
//!
//! Only fenced writes are ordered: a plain write of the same file ignores the fence.

use crate::durable::{parent_dir, sync_dir, target_file_name, write_atomic, FileError};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"BCFN";
const RECORD_LEN: usize = 16;
const FENCE_SUFFIX: &str = ".fence";

/// `<dir>/.<name>.fence`, the sidecar holding the token of the last fenced write of
/// `target`; INVALID_PARAM for a path that names no file.
pub fn fence_path(target: &Path) -> Result<PathBuf> {
    let name = target_file_name(target)?;
    Ok(parent_dir(target).join(format!(".{name}{FENCE_SUFFIX}")))
}

fn encode(token: u64) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    record[..4].copy_from_slice(MAGIC);
    record[4..12].copy_from_slice(&token.to_le_bytes());
    let crc = crc32fast::hash(&record[..12]);
    record[12..].copy_from_slice(&crc.to_le_bytes());
    record
}

/// The token of a sidecar's bytes: `None` when it is empty (created, never written), a
/// corruption when it is anything but one well-formed record.
fn decode(bytes: &[u8], sidecar: &Path) -> Result<Option<u64>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let corrupt = |why: &str| {
        Error::Corruption(format!(
            "fence file {} {why}; no fenced write of its file can be checked until it is \
             restored or, once the file's content is known to be the newest claim's, removed",
            sidecar.display()
        ))
    };
    if bytes.len() != RECORD_LEN {
        return Err(corrupt(&format!(
            "is {} bytes long, not {RECORD_LEN}",
            bytes.len()
        )));
    }
    if &bytes[..4] != MAGIC {
        return Err(corrupt("does not start with the fence magic"));
    }
    let crc = u32::from_le_bytes(bytes[12..].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[..12]) {
        return Err(corrupt("fails its checksum"));
    }
    let token = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    if token == 0 {
        return Err(corrupt("holds token 0, which no write can have"));
    }
    Ok(Some(token))
}

/// Reads the whole sidecar from its descriptor (at most one byte past a record: enough to
/// tell a well-formed one from a longer file).
fn read_record(file: &File, sidecar: &Path) -> Result<Option<u64>> {
    let mut buf = [0u8; RECORD_LEN + 1];
    let mut len = 0;
    while len < buf.len() {
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileError::new("read fence file", sidecar, e).into()),
        }
    }
    decode(&buf[..len], sidecar)
}

/// The token of the last fenced write of `target`, `None` when none was made; the
/// sidecar is read without the lock (a snapshot, for inspection and tests).
pub fn stored_token(target: &Path) -> Result<Option<u64>> {
    let sidecar = fence_path(target)?;
    match File::open(&sidecar) {
        Ok(file) => read_record(&file, &sidecar),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError::new("open fence file", &sidecar, e).into()),
    }
}

/// Opens the sidecar, creating it 0640 when missing; never through a symlink.
fn open_sidecar(sidecar: &Path) -> Result<File> {
    let options = |create: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
        if create {
            o.create_new(true).mode(0o640);
        }
        o
    };
    loop {
        match options(false).open(sidecar) {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::new("open fence file", sidecar, e).into()),
        }
        match options(true).open(sidecar) {
            Ok(file) => {
                // The umask may have taken bits off the mode.
                file.set_permissions(fs::Permissions::from_mode(0o640))
                    .map_err(|e| FileError::new("chmod fence file", sidecar, e))?;
                return Ok(file);
            }
            // Another writer created it meanwhile: open theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(FileError::new("create fence file", sidecar, e).into()),
        }
    }
}

/// Takes an exclusive open-file-description lock on the whole of `file`, waiting for it.
/// Released when the descriptor is closed.
fn lock_exclusive(file: &File, sidecar: &Path) -> Result<()> {
    // SAFETY: an all-zero flock is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // to the end, whatever the length
    lock.l_pid = 0; // required by OFD locks
    loop {
        // SAFETY: a valid open descriptor and a pointer to a live, initialized flock.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &lock) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(FileError::new("lock fence file", sidecar, err).into());
        }
    }
}

/// Atomically and durably replaces `target` with `data`, unless a fenced write of
/// `target` with a higher token was made: then FENCED, and `target` is left untouched.
/// One attempt; the caller retries what is retryable.
pub fn write_fenced(target: &Path, data: &[u8], token: u64) -> Result<()> {
    if token == 0 {
        return Err(Error::InvalidArgument(format!(
            "fencing token 0 for {}: tokens start at 1",
            target.display()
        )));
    }
    let sidecar = fence_path(target)?;
    let file = open_sidecar(&sidecar)?;
    lock_exclusive(&file, &sidecar)?;
    let stored = read_record(&file, &sidecar)?;
    match stored {
        Some(stored) if stored > token => {
            return Err(Error::Fenced(format!(
                "write of {} with fencing token {token} refused: a write with the higher \
                 token {stored} was made; the file is untouched",
                target.display()
            )));
        }
        Some(stored) if stored == token => {}
        _ => {
            file.write_all_at(&encode(token), 0)
                .map_err(|e| FileError::new("write fence file", &sidecar, e))?;
            file.sync_data()
                .map_err(|e| FileError::new("fdatasync fence file", &sidecar, e))?;
            if stored.is_none() {
                // Created now, or left empty by a writer that died: make its entry durable
                // before any content relies on it.
                sync_dir(parent_dir(&sidecar))?;
            }
        }
    }
    write_atomic(target, data)?;
    drop(file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::time::{Duration, SystemTime};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn mtime(path: &Path) -> SystemTime {
        fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn a_lower_token_is_fenced_and_leaves_the_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("set.dat");
        write_fenced(&target, b"claim 7", 7).unwrap();
        let before = mtime(&target);
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&target).unwrap());
        // Coarse timestamps: let a rewrite show in the mtime if one happened.
        std::thread::sleep(Duration::from_millis(20));
        let err = write_fenced(&target, b"stale claim 6", 6).unwrap_err();
        assert_eq!(err.kind(), ErrorCode::Fenced);
        let text = err.to_string();
        for needle in [target.to_str().unwrap(), "token 6", "token 7"] {
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
        assert_eq!(fs::read(&target).unwrap(), b"claim 7");
        assert_eq!(mtime(&target), before);
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&target).unwrap()),
            inode,
            "not replaced"
        );
        assert_eq!(stored_token(&target).unwrap(), Some(7));
        assert_eq!(names(dir.path()), vec![".set.dat.fence", "set.dat"]);
    }

    #[test]
    fn an_equal_token_rewrites_and_a_higher_one_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_fenced(&target, b"first", 3).unwrap();
        write_fenced(&target, b"retry of claim 3", 3).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"retry of claim 3");
        assert_eq!(stored_token(&target).unwrap(), Some(3));
        write_fenced(&target, b"claim 4", 4).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"claim 4");
        assert_eq!(stored_token(&target).unwrap(), Some(4));
        // Tokens need not be consecutive.
        write_fenced(&target, b"claim 1000", 1000).unwrap();
        assert_eq!(stored_token(&target).unwrap(), Some(1000));
        assert_eq!(
            write_fenced(&target, b"x", 999).unwrap_err().kind(),
            ErrorCode::Fenced
        );
        write_fenced(&target, b"max", u64::MAX).unwrap();
        assert_eq!(stored_token(&target).unwrap(), Some(u64::MAX));
    }

    #[test]
    fn the_token_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_fenced(&target, b"a", 41).unwrap();
        // Everything is opened afresh on each call: what is read back is what is on disk.
        let record = fs::read(fence_path(&target).unwrap()).unwrap();
        assert_eq!(record, encode(41));
        assert_eq!(&record[..4], b"BCFN");
        assert_eq!(u64::from_le_bytes(record[4..12].try_into().unwrap()), 41);
        assert_eq!(
            write_fenced(&target, b"b", 40).unwrap_err().kind(),
            ErrorCode::Fenced
        );
        assert_eq!(fs::read(&target).unwrap(), b"a");
    }

    #[test]
    fn a_garbage_sidecar_is_data_corruption_not_token_0() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let sidecar = fence_path(&target).unwrap();
        let mut flipped = encode(9);
        flipped[5] ^= 1;
        let mut bad_magic = encode(9);
        bad_magic[0] = b'X';
        for garbage in [
            b"garbage".to_vec(),
            encode(9)[..15].to_vec(),
            [encode(9).as_slice(), b"!"].concat(),
            flipped.to_vec(),
            bad_magic.to_vec(),
            vec![0u8; RECORD_LEN],
            encode(0).to_vec(),
        ] {
            fs::write(&target, b"old").unwrap();
            fs::write(&sidecar, &garbage).unwrap();
            let err = write_fenced(&target, b"new", u64::MAX).unwrap_err();
            assert_eq!(err.kind(), ErrorCode::DataCorruption, "{garbage:?}: {err}");
            assert!(err.to_string().contains(".f.fence"), "{err}");
            assert_eq!(fs::read(&target).unwrap(), b"old");
            assert_eq!(
                fs::read(&sidecar).unwrap(),
                garbage,
                "sidecar left as found"
            );
            assert_eq!(
                stored_token(&target).unwrap_err().kind(),
                ErrorCode::DataCorruption
            );
        }
        // An empty sidecar (created by a writer that died before writing it) holds no token.
        fs::write(&sidecar, b"").unwrap();
        write_fenced(&target, b"new", 2).unwrap();
        assert_eq!(stored_token(&target).unwrap(), Some(2));
    }

    #[test]
    fn token_0_and_paths_naming_no_file_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let err = write_fenced(&target, b"x", 0).unwrap_err();
        assert_eq!(err.kind(), ErrorCode::InvalidParam);
        assert!(err.to_string().contains("token 0"), "{err}");
        let d = dir.path().display().to_string();
        for bad in [
            "",
            "/",
            &format!("{d}/"),
            &format!("{d}/."),
            &format!("{d}/.."),
        ] {
            let err = write_fenced(Path::new(bad), b"x", 1).unwrap_err();
            assert_eq!(err.kind(), ErrorCode::InvalidParam, "{bad:?}: {err}");
        }
        assert_eq!(names(dir.path()), Vec::<String>::new(), "nothing written");
    }

    #[test]
    fn no_temp_file_is_left_by_a_refused_or_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_fenced(&target, b"a", 5).unwrap();
        write_fenced(&target, b"b", 4).unwrap_err();
        assert_eq!(names(dir.path()), vec![".f.fence", "f"]);
        // A write that fails after the fence is raised: the target is a directory, so the
        // rename onto it fails (EISDIR), and the temp file is removed.
        let blocked = dir.path().join("d");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"").unwrap();
        let err = write_fenced(&blocked, b"c", 1).unwrap_err();
        assert_eq!(err.kind(), ErrorCode::FileIo, "{err}");
        assert_eq!(names(dir.path()), vec![".d.fence", ".f.fence", "d", "f"]);
        // The fence was raised first: the same claim may retry, a lower one may not.
        assert_eq!(stored_token(&blocked).unwrap(), Some(1));
    }

    #[test]
    fn a_missing_directory_is_file_io_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_fenced(&dir.path().join("no/such/f"), b"x", 1).unwrap_err();
        assert_eq!(err.kind(), ErrorCode::FileIo);
        assert!(err.to_string().contains("no/such"), "{err}");
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn the_sidecar_is_0640_and_never_swept_as_a_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_fenced(&target, b"x", 1).unwrap();
        let sidecar = fence_path(&target).unwrap();
        assert_eq!(
            fs::metadata(&sidecar).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // Plain writes of the file and of others sweep dead temps, never the sidecar.
        fs::write(dir.path().join(".f.99999999.3.tmp"), b"torn").unwrap();
        write_atomic(&target, b"y").unwrap();
        assert_eq!(names(dir.path()), vec![".f.fence", "f"]);
    }

    #[test]
    fn a_sidecar_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"").unwrap();
        std::os::unix::fs::symlink(&elsewhere, fence_path(&target).unwrap()).unwrap();
        write_fenced(&target, b"x", 1).unwrap_err();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"");
        assert!(!target.exists());
    }

    /// Threads of one process exclude each other (each call has its own descriptor, so its
    /// own open file description): after the race the file is the highest token's, no
    /// success followed a success of a higher token, and every refusal was for a token
    /// below one already stored.
    #[test]
    fn threads_racing_over_one_file_end_with_the_highest_token() {
        use std::sync::Mutex;
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("race.dat");
        let mut tokens: Vec<u64> = (1..=64).collect();
        fastrand::Rng::with_seed(7).shuffle(&mut tokens);
        let queue = Mutex::new(tokens);
        // (start, end, token, result): the order of calls is known only up to overlap.
        let log = Mutex::new(Vec::new());
        let origin = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| loop {
                    let Some(token) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let start = origin.elapsed();
                    let body = format!("content of token {token}\n").repeat(token as usize);
                    let result =
                        write_fenced(&target, body.as_bytes(), token).map_err(|e| e.kind());
                    let end = origin.elapsed();
                    log.lock().unwrap().push((start, end, token, result));
                });
            }
        });
        let log = log.into_inner().unwrap();
        assert_eq!(log.len(), 64);
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "content of token 64\n".repeat(64)
        );
        assert_eq!(stored_token(&target).unwrap(), Some(64));
        let mut fenced = 0;
        for &(start, _, token, result) in &log {
            match result {
                Ok(()) => {
                    for &(_, other_end, other, other_result) in &log {
                        if other_result.is_ok() && other_end < start {
                            assert!(other <= token, "{token} accepted after {other}");
                        }
                    }
                }
                Err(ErrorCode::Fenced) => {
                    fenced += 1;
                    // Some higher token was accepted, by a call that began before this
                    // one ended.
                    let end = log.iter().find(|e| e.2 == token).unwrap().1;
                    assert!(
                        log.iter()
                            .any(|&(s, _, t, r)| r.is_ok() && t > token && s < end),
                        "{token} fenced with no higher token accepted"
                    );
                }
                Err(other) => panic!("token {token}: {other:?}"),
            }
        }
        // Refusals of lower tokens are the point: 64 shuffled tokens cannot all arrive in
        // increasing order.
        assert!(fenced > 0);
        assert_eq!(names(dir.path()), vec![".race.dat.fence", "race.dat"]);
    }
}
