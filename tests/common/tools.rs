//! The programs and packages a test needs, installed by the test itself when missing, so that
//! `cargo test` on a fresh Debian machine needs no step beyond the README's: as root, a
//! missing tool is installed with apt-get (policy-rc.d keeps a package's own service, such as
//! Prometheus's or etcd's server, from being started); otherwise, or when the install fails,
//! the test fails and names the packages. A test never skips for a missing tool.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::sync::Mutex;

/// One install at a time per test binary (apt and dpkg take a lock anyway; waiting on ours
/// keeps the messages in order).
static INSTALLING: Mutex<()> = Mutex::new(());

fn sh_ok(script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `check` (a shell command) succeed, installing the Debian `packages` that provide
/// what it looks for when it does not; `what` names it in the failure.
pub fn ensure(what: &str, check: &str, packages: &[&str]) {
    if sh_ok(check) {
        return;
    }
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if sh_ok(check) {
        return; // another test of this binary installed it meanwhile
    }
    let list = packages.join(" ");
    assert!(
        is_root() && sh_ok("command -v apt-get"),
        "{what} is missing and this test cannot install it (it installs missing packages with \
         apt-get only when run as root): install Debian's {list} (apt-get install {list}), or \
         run `cargo test` as root"
    );
    eprintln!("{what} is missing: installing Debian's {list} with apt-get");
    let out = Command::new("sh")
        .args([
            "-c",
            "made=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d; \
             chmod +x /usr/sbin/policy-rc.d; made=1; }; \
             apt-get -o DPkg::Lock::Timeout=600 update -qq && \
             DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
             --no-install-recommends \"$@\"; rc=$?; [ -z \"$made\" ] || rm -f /usr/sbin/policy-rc.d; exit $rc",
            "sh",
        ])
        .args(packages)
        .output()
        .expect("run apt-get");
    assert!(
        out.status.success(),
        "installing Debian's {list} (for {what}) failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sh_ok(check),
        "{what} is still missing after installing Debian's {list}"
    );
}

/// Makes the command `tool` available on PATH, installing the Debian `packages` that provide
/// it when missing: `ensure_tool("promtool", &["prometheus"])`.
pub fn ensure_tool(tool: &str, packages: &[&str]) {
    ensure(tool, &format!("command -v '{tool}'"), packages);
}

/// Makes `module` importable by Debian's /usr/bin/python3, installing `packages` (python3
/// itself included) when it is not.
pub fn ensure_python_module(module: &str, packages: &[&str]) {
    ensure(
        &format!("Python module {module} (for /usr/bin/python3)"),
        &format!("/usr/bin/python3 -c 'import {module}'"),
        packages,
    );
}

/// gcc with the sanitizer runtimes and make: what the C harnesses, the demo host and the
/// install check build with.
pub fn ensure_c_toolchain() {
    ensure_tool("make", &["make"]);
    ensure_tool("cc", &["gcc", "libc6-dev"]);
    // -fsanitize=address,undefined links these runtimes (gcc 12: libasan8, libubsan1).
    ensure(
        "gcc's AddressSanitizer and UBSan runtimes",
        "printf 'int main(void){return 0;}' | cc -x c -fsanitize=address,undefined -o /dev/null -",
        &["libasan8", "libubsan1"],
    );
}

/// The path of `tool`, after installing the Debian `package` that ships it if it is not on
/// the PATH (`ensure_tool`). Panics, saying why, when it cannot be had.
pub fn require(tool: &str, package: &str) -> std::path::PathBuf {
    ensure_tool(tool, &[package]);
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(tool))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| panic!("{tool} is on no directory of PATH"))
}
