//! Generates `include/backup_coordinator.h` from the FFI layer with cbindgen, and gives the
//! shared library its SONAME. The header is committed; it is rewritten only when its content
//! changes so that an unchanged build leaves the work tree clean (CI fails on a stale
//! header). A header that cannot be generated fails the build: a warning would let the
//! committed header go stale unnoticed.
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // cbindgen reads this crate only (`parse_deps = false`): the `ffi` layer under src/.
    // The core (core/, a crate of its own) has no C in it and never reaches the header.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=Cargo.toml");

    // Programs linking the library record the major version, so that an incompatible
    // release can be installed beside this one (libbackup_coordinator.so.<major>).
    let major = env("CARGO_PKG_VERSION_MAJOR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libbackup_coordinator.so.{major}");

    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|err| panic!("cbindgen.toml: {err}"));
    // The version macros come from Cargo.toml, the one place the version is written.
    let versions = format!(
        "\n/* The library's version; backup_plugin_version() returns the same string. */\n\
         #define BACKUP_COORDINATOR_VERSION \"{}\"\n\
         #define BACKUP_COORDINATOR_VERSION_MAJOR {major}\n\
         #define BACKUP_COORDINATOR_VERSION_MINOR {}\n\
         #define BACKUP_COORDINATOR_VERSION_PATCH {}\n\n",
        env("CARGO_PKG_VERSION"),
        env("CARGO_PKG_VERSION_MINOR"),
        env("CARGO_PKG_VERSION_PATCH"),
    );
    config.after_includes = Some(versions + config.after_includes.as_deref().unwrap_or(""));
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|err| {
            panic!("cbindgen could not generate include/backup_coordinator.h: {err}")
        });
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let header = crate_dir.join("include/backup_coordinator.h");
    if std::fs::read(&header).ok().as_deref() != Some(generated.as_slice()) {
        std::fs::create_dir_all(crate_dir.join("include")).expect("create include/");
        std::fs::write(&header, generated).expect("write include/backup_coordinator.h");
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"))
}
