//! Outside tools the tests run (promtool), installed from Debian when missing, the way
//! `.ci/run` installs them: `apt-get install --no-install-recommends`, with a policy-rc.d
//! that exits 101 so that a package's own server (prometheus) is never started. A tool that
//! cannot be had fails the test that needs it, loudly: it is never skipped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One install at a time (apt holds a lock of its own, and fails rather than waits).
static INSTALL: Mutex<()> = Mutex::new(());

/// The path of `tool`, after installing the Debian `package` that ships it if it is not on
/// the PATH. Panics, saying why, when it cannot be had.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = which(tool) {
        return path;
    }
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
            })
            .unwrap_or_else(|e| {
                panic!("{tool} is missing and {} cannot be written to install {package} without starting its service: {e}", policy.display())
            });
    }
    let run = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut outcome = run(&["install", "-y", "-qq", "--no-install-recommends", package]);
    if !outcome.as_ref().is_ok_and(|o| o.status.success()) {
        // A machine that never fetched the package lists: fetch them, then try again.
        let _ = run(&["update", "-qq"]);
        outcome = run(&["install", "-y", "-qq", "--no-install-recommends", package]);
    }
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    let detail = match &outcome {
        Ok(out) => format!(
            "apt-get exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("apt-get could not run: {e}"),
    };
    which(tool).unwrap_or_else(|| {
        panic!("{tool} is not installed and the Debian package {package} could not be installed ({detail}); .ci/run installs it")
    })
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}
