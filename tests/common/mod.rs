//! Helpers shared by the integration tests that break things, and (tools.rs) the packages a
//! test installs for itself when missing. Each test binary uses some of them.
#![allow(dead_code)]

pub mod tools;
#[allow(unused_imports)]
pub use tools::{ensure_python_module, ensure_tool};

pub mod proxy;

pub mod child;

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
        ensure_tool("mount", &["mount"]);
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
    /// Unmounts for certain: a file still closing elsewhere ("target is busy") gets a few
    /// more tries, then a lazy unmount detaches the mount anyway, so that no test leaves a
    /// tmpfs behind, whatever it failed on.
    fn drop(&mut self) {
        let unmount = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&self.path)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for _ in 0..20 {
            if unmount(&[]) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !unmount(&["-l"]) {
            eprintln!("could not unmount {}", self.path.display());
        }
    }
}
