//! `make install` as an integrator uses it: the installed tree (library with its SONAME and
//! links, no debug info; header with its version macros; pkg-config file), a C program
//! built with `pkg-config --cflags --libs backup_coordinator` that runs against it with no
//! LD_LIBRARY_PATH (the .pc file's rpath), DESTDIR staging, a Makefile that follows
//! CARGO_TARGET_DIR, and the size of the release library the Makefile builds. The debug
//! build is installed here (it is the one `cargo test` has built, and carries the most
//! debug info to strip).
#[path = "common/tools.rs"]
mod tools;

use std::ffi::CStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/incremental_bitmap");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Two `make` runs in the same directory must not overlap.
static MAKE: Mutex<()> = Mutex::new(());

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// make and gcc; pkg-config; readelf, objcopy and strip (binutils) for the install and its checks.
fn ensure_tools() {
    tools::ensure_tool("make", &["make"]);
    tools::ensure_tool("cc", &["gcc", "libc6-dev"]);
    tools::ensure_tool("pkg-config", &["pkg-config"]);
    for tool in ["readelf", "objcopy", "strip"] {
        tools::ensure_tool(tool, &["binutils"]);
    }
}

fn make_install(prefix: &Path, destdir: Option<&Path>) {
    ensure_tools();
    let _make = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("make");
    cmd.args(["-C", PLUGIN_DIR, "install", "PROFILE=debug"])
        .arg(format!("PREFIX={}", prefix.display()));
    if let Some(destdir) = destdir {
        cmd.arg(format!("DESTDIR={}", destdir.display()));
    }
    run(&mut cmd);
}

/// Where cargo put this build: CARGO_TARGET_DIR when set, else `<root>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn readelf(args: &[&str], file: &Path) -> String {
    stdout(&run(Command::new("readelf").args(args).arg(file)))
}

#[test]
fn the_installed_tree_builds_and_runs_a_c_program_through_pkg_config() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    make_install(&prefix, None);
    let lib = prefix.join("lib");
    let real = lib.join(format!("libbackup_coordinator.so.{VERSION}"));
    let major = VERSION.split('.').next().unwrap();
    let soname = format!("libbackup_coordinator.so.{major}");

    // The library, its SONAME, and the two links.
    assert!(real.is_file() && !real.is_symlink());
    assert!(readelf(&["-d"], &real).contains(&format!("Library soname: [{soname}]")));
    assert_eq!(
        fs::read_link(lib.join(&soname)).unwrap(),
        PathBuf::from(real.file_name().unwrap())
    );
    assert_eq!(
        fs::read_link(lib.join("libbackup_coordinator.so")).unwrap(),
        PathBuf::from(&soname)
    );
    // No debug info in what is installed, though the build it came from has plenty.
    let sections = readelf(&["-S", "-W"], &real);
    assert!(
        !sections.contains(".debug_"),
        "debug sections installed:\n{sections}"
    );
    let built = target_dir().join("debug/libbackup_coordinator.so");
    if built.exists() {
        assert!(readelf(&["-S", "-W"], &built).contains(".debug_info"));
        assert!(fs::metadata(&real).unwrap().len() < fs::metadata(&built).unwrap().len() / 2);
    }

    // The header and its version macros.
    let header = fs::read_to_string(prefix.join("include/backup_coordinator.h")).unwrap();
    assert!(header.contains(&format!("#define BACKUP_COORDINATOR_VERSION \"{VERSION}\"")));
    assert!(header.contains(&format!("#define BACKUP_COORDINATOR_VERSION_MAJOR {major}")));
    assert!(
        header.contains("#define TAOSX_HEADER_VERSION 10\n"),
        "not decimal"
    );
    assert!(!header.contains("shared/ABI.md"));

    // pkg-config, and a program built with nothing else.
    let pc_path = lib.join("pkgconfig");
    let pkg = |arg: &str| {
        stdout(&run(Command::new("pkg-config")
            .env("PKG_CONFIG_PATH", &pc_path)
            .args([arg, "backup_coordinator"])))
        .trim()
        .to_string()
    };
    assert_eq!(pkg("--modversion"), VERSION);
    let flags = format!("{} {}", pkg("--cflags"), pkg("--libs"));
    assert!(
        flags.contains(&format!("-I{}/include", prefix.display())),
        "{flags}"
    );
    assert!(flags.contains(&format!("-L{}", lib.display())), "{flags}");
    let source = tmp.path().join("hello.c");
    fs::write(
        &source,
        r#"#include <stdio.h>
#include <string.h>
#include <backup_coordinator.h>
int main(void) {
    const char* v = backup_plugin_version();
    printf("%s %d.%d.%d %s\n", v, BACKUP_COORDINATOR_VERSION_MAJOR, BACKUP_COORDINATOR_VERSION_MINOR,
           BACKUP_COORDINATOR_VERSION_PATCH, backup_error_string(BACKUP_ERROR_NETWORK));
    return strcmp(v, BACKUP_COORDINATOR_VERSION) == 0 ? 0 : 1;
}
"#,
    )
    .unwrap();
    let program = tmp.path().join("hello");
    let mut cc = Command::new("sh");
    cc.arg("-c").arg(format!(
        "cc -std=c11 -Wall -Wextra -Werror -o '{}' '{}' $(pkg-config --cflags --libs backup_coordinator)",
        program.display(),
        source.display()
    ));
    run(cc.env("PKG_CONFIG_PATH", &pc_path));
    let dynamic = readelf(&["-d"], &program);
    assert!(dynamic.contains(&format!("Shared library: [{soname}]")));
    // The .pc file's rpath: the program finds the library under the prefix by itself.
    assert!(
        dynamic.contains(&format!("path: [{}]", lib.display())),
        "no rpath to {}:\n{dynamic}",
        lib.display()
    );
    let out = run(Command::new(&program).env_remove("LD_LIBRARY_PATH"));
    let minor = VERSION.split('.').nth(1).unwrap();
    let patch = VERSION.split('.').nth(2).unwrap();
    assert_eq!(
        stdout(&out),
        format!("{VERSION} {major}.{minor}.{patch} Network error\n")
    );
    // The header's version is the library's.
    let runtime =
        unsafe { CStr::from_ptr(backup_coordinator::ffi::plugin::backup_plugin_version()) };
    assert_eq!(runtime.to_str().unwrap(), VERSION);
}

#[test]
fn destdir_stages_the_tree_for_its_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    make_install(Path::new("/opt/taosx"), Some(&stage));
    let root = stage.join("opt/taosx");
    assert!(root
        .join(format!("lib/libbackup_coordinator.so.{VERSION}"))
        .is_file());
    assert!(root.join("include/backup_coordinator.h").is_file());
    // The operator's command line (docs/C_API.md §11).
    assert!(root.join("bin/backup-coordinator").is_file());
    let pc = fs::read_to_string(root.join("lib/pkgconfig/backup_coordinator.pc")).unwrap();
    // The .pc names where the files will be, not the staging area.
    assert!(pc.contains("prefix=/opt/taosx\n"), "{pc}");
    assert!(!pc.contains(&stage.display().to_string()), "{pc}");
}

#[test]
fn the_makefile_uses_the_library_cargo_built_in_cargo_target_dir() {
    // A target dir elsewhere (a link to this build's, so that nothing is rebuilt): the
    // harness must be linked against the library there, not <root>/target.
    let tmp = tempfile::tempdir().unwrap();
    let target = target_dir();
    let elsewhere = tmp.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &elsewhere).unwrap();
    ensure_tools();
    let _make = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let out = run(Command::new("make")
        .args(["-C", PLUGIN_DIR, "test_retry_mechanism", "PROFILE=debug"])
        .env("CARGO_TARGET_DIR", &elsewhere));
    assert!(stdout(&out).contains("all"), "{}", stdout(&out));
    let link = Path::new(PLUGIN_DIR).join("build/lib-debug/libbackup_coordinator.so.0");
    assert_eq!(
        fs::read_link(&link).unwrap(),
        elsewhere.join("debug/libbackup_coordinator.so")
    );
    // Back to the default, so that later runs do not point into a removed directory.
    run(Command::new("make").args(["-C", PLUGIN_DIR, "links", "PROFILE=debug"]));
}

/// What `make demo` and `make install` ship: the release library as the Makefile builds it
/// (`[profile.release]` of Cargo.toml: no debug info) is at most 8 MB. It was 44 MB with
/// `debug = 1`.
#[test]
fn the_release_library_the_makefile_builds_is_at_most_8_mb() {
    ensure_tools();
    let _make = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    run(Command::new("make").args(["-C", PLUGIN_DIR, "lib", "PROFILE=release"]));
    let lib = target_dir().join("release/libbackup_coordinator.so");
    let size = fs::metadata(&lib).unwrap().len();
    assert!(
        size <= 8_000_000,
        "{} is {size} bytes, more than 8 MB",
        lib.display()
    );
    let sections = readelf(&["-S", "-W"], &lib);
    assert!(!sections.contains(".debug_info"), "{sections}");
}
