//! Helpers shared by the integration tests that break things.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// A mount point that is unmounted (and removed) when dropped.
pub struct Mount {
    pub path: PathBuf,
    _parent: tempfile::TempDir,
}

impl Mount {
    pub fn new(args: &[&str]) -> Mount {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("mnt");
        fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(args)
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount {args:?} failed: these tests need root"
        );
        Mount {
            path,
            _parent: parent,
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
