//! Durable, atomic replacement of a file, and the errno classification of file work.
//!
//! A target is always either its old content or the complete new content, whatever
//! crashes: the new bytes go to a temp file in the same directory (exclusive create),
//! are written fully and fsynced, then renamed over the target, and the directory is
//! fsynced so the rename itself survives a power loss. A failed attempt removes its temp
//! file; temp files of writers that were killed are swept by the next successful write
//! of the same target.
//!
//! A missing parent directory is not created: backup paths come from the host, and
//! creating directories from a mistyped path would hide the mistake. It is reported as
//! BACKUP_ERROR_FILE_IO (errno ENOENT), which the retry policy retries, since a mount
//! point or a directory created by another process may yet appear.

use crate::error::{Error, ErrorCode};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file operation that failed, with everything needed to say exactly why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FileError {
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        FileError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn code(&self) -> ErrorCode {
        classify(&self.source)
    }
}

impl From<FileError> for Error {
    fn from(err: FileError) -> Self {
        Error::File {
            kind: err.code(),
            failure: std::sync::Arc::new(err),
        }
    }
}

/// ENOSPC/EDQUOT: disk full; EACCES/EPERM/EROFS: permission denied (neither is worth
/// retrying blindly); a caller's bad path (no errno, [`io::ErrorKind::InvalidInput`]):
/// invalid parameter; anything else is a possibly transient I/O error.
pub fn classify(err: &io::Error) -> ErrorCode {
    match err.raw_os_error() {
        None if err.kind() == io::ErrorKind::InvalidInput => ErrorCode::InvalidParam,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => ErrorCode::PermissionDenied,
        _ => ErrorCode::FileIo,
    }
}

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// fsync of a directory, so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    let handle = File::open(dir).map_err(|e| FileError::new("open directory", dir, e))?;
    handle
        .sync_all()
        .map_err(|e| FileError::new("fsync directory", dir, e))
}

static TEMP_SEQUENCE: AtomicU64 = AtomicU64::new(0);

const TEMP_SUFFIX: &str = ".tmp";

/// `.<name>.<pid>.<seq>.tmp`: hidden, unique per writer, and tied to the target's name so
/// that litter of a dead writer can be recognised and removed.
fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.")
}

/// Removes a temp file unless the write it belongs to completed.
struct TempGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(self.path);
        }
    }
}

/// The file name a write targets, or the caller's mistake: a path that names no file
/// (empty, ending in `/`, or whose last component is `.` or `..`) is invalid input, which
/// [`classify`] reports as INVALID_PARAM and no retry policy retries.
pub fn target_file_name(target: &Path) -> Result<&str, FileError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_os_str().as_bytes();
    let last = bytes.rsplit(|&b| b == b'/').next().unwrap_or_default();
    let names_no_file = matches!(last, b"" | b"." | b"..");
    let invalid = |why: &str| {
        FileError::new(
            "write",
            target,
            io::Error::new(io::ErrorKind::InvalidInput, why.to_string()),
        )
    };
    if names_no_file {
        return Err(invalid(
            "the path names no file (it is empty, ends in '/', '.' or '..')",
        ));
    }
    std::str::from_utf8(last).map_err(|_| invalid("the file name is not UTF-8"))
}

/// Creates `dir` and its missing parents, each 0750 whatever the process's umask, and
/// fsyncs the parent of each directory it creates, so that the new entries survive a
/// power loss. An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    match fs::DirBuilder::new().mode(0o750).create(dir) {
        Ok(()) => {}
        // Another thread or process made it meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(FileError::new("create directory", dir, e)),
    }
    // The umask may have taken bits off the mode.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
        .map_err(|e| FileError::new("chmod", dir, e))?;
    sync_dir(parent_dir(dir))
}

/// Atomically and durably replaces `target` with `data`.
pub fn write_atomic(target: &Path, data: &[u8]) -> Result<(), FileError> {
    let file_name = target_file_name(target)?;
    let dir = parent_dir(target);
    let prefix = temp_prefix(file_name);
    let (temp_path, mut file) = create_temp(dir, &prefix)?;
    let mut guard = TempGuard {
        path: &temp_path,
        armed: true,
    };
    // Keep the permissions of the file being replaced.
    if let Ok(meta) = fs::metadata(target) {
        let mode = meta.permissions().mode() & 0o7777;
        let _ = file.set_permissions(fs::Permissions::from_mode(mode));
    }
    // write_all loops over short writes and EINTR.
    file.write_all(data)
        .map_err(|e| FileError::new("write", &temp_path, e))?;
    file.sync_all()
        .map_err(|e| FileError::new("fsync", &temp_path, e))?;
    drop(file);
    fs::rename(&temp_path, target).map_err(|e| FileError::new("rename onto", target, e))?;
    guard.armed = false;
    sync_dir(dir)?;
    sweep_dead_temps(dir, &prefix);
    Ok(())
}

fn create_temp(dir: &Path, prefix: &str) -> Result<(PathBuf, File), FileError> {
    let pid = std::process::id();
    loop {
        let seq = TEMP_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{prefix}{pid}.{seq}{TEMP_SUFFIX}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            // Left by an earlier process that had our pid: pick the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(FileError::new("create temp file in", dir, e)),
        }
    }
}

/// Deletes temp files of this target whose writer process no longer exists.
fn sweep_dead_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        // Exactly `<pid>.<seq>`: a temp of another target such as `f.1` has more parts.
        let Some((pid, seq)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), seq.parse::<u64>()) else {
            continue;
        };
        if !process_alive(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_path_that_names_no_file_is_the_callers_mistake() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        for bad in [
            "",
            "/",
            &format!("{d}/"),
            &format!("{d}/."),
            &format!("{d}/.."),
        ] {
            let err = write_atomic(Path::new(bad), b"x").unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidParam, "{bad:?}: {err}");
            assert!(err.to_string().contains("names no file"), "{err}");
        }
        assert_eq!(names(dir.path()), Vec::<String>::new(), "nothing written");
        // A hidden file is a file.
        write_atomic(&dir.path().join(".hidden"), b"x").unwrap();
    }

    #[test]
    fn private_directories_are_0750_and_made_with_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_private_dir(&deep).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(dir.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o750, "{d}");
        }
        create_private_dir(&deep).unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(create_private_dir(&file.join("sub")).is_err());
    }

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("set.dat");
        write_atomic(&target, b"old").unwrap();
        write_atomic(&target, b"new content").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new content");
        assert_eq!(names(dir.path()), vec!["set.dat"]);
    }

    #[test]
    fn keeps_the_mode_of_the_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_atomic(&target, b"a").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&target, b"b").unwrap();
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn missing_parent_is_a_file_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("no/such/dir/f");
        let err = write_atomic(&target, b"x").unwrap_err();
        assert_eq!(err.code(), ErrorCode::FileIo);
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }

    #[test]
    fn stale_temps_of_dead_writers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        // A pid that cannot exist (above pid_max) stands for a writer killed mid-write.
        fs::write(dir.path().join(".f.99999999.3.tmp"), b"torn").unwrap();
        fs::write(dir.path().join(".other.99999999.3.tmp"), b"not ours").unwrap();
        // The temp of target `f.99999999`, written by a live process: not ours either.
        fs::write(dir.path().join(".f.99999999.1.2.tmp"), b"in flight").unwrap();
        write_atomic(&target, b"x").unwrap();
        assert_eq!(
            names(dir.path()),
            vec![".f.99999999.1.2.tmp", ".other.99999999.3.tmp", "f"]
        );
    }

    #[test]
    fn errno_classification() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::ENOSPC)), ErrorCode::DiskFull);
        assert_eq!(classify(&e(libc::EDQUOT)), ErrorCode::DiskFull);
        assert_eq!(classify(&e(libc::EACCES)), ErrorCode::PermissionDenied);
        assert_eq!(classify(&e(libc::EPERM)), ErrorCode::PermissionDenied);
        assert_eq!(classify(&e(libc::EROFS)), ErrorCode::PermissionDenied);
        assert_eq!(classify(&e(libc::EIO)), ErrorCode::FileIo);
        assert_eq!(classify(&e(libc::ENOENT)), ErrorCode::FileIo);
    }
}
