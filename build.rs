//! Generates `include/backup_coordinator.h` from the FFI layer with cbindgen.
//! The header is committed; it is rewritten only when its content changes so that
//! an unchanged build leaves the work tree clean (CI fails on a stale header).
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    let bindings = match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => bindings,
        Err(err) => {
            // A half-edited source tree must not break `cargo check`; rustc reports the real error.
            println!("cargo:warning=cbindgen could not generate the header: {err}");
            return;
        }
    };
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let header = crate_dir.join("include/backup_coordinator.h");
    if std::fs::read(&header).ok().as_deref() != Some(generated.as_slice()) {
        std::fs::create_dir_all(crate_dir.join("include")).unwrap();
        std::fs::write(&header, generated).expect("write include/backup_coordinator.h");
    }
}
