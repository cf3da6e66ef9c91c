//! Runs the C harnesses (`make -C plugins/incremental_bitmap test`): every harness against
//! the built library and generated header, plain and under AddressSanitizer + UBSan.
#[path = "common/tools.rs"]
mod tools;

use std::process::Command;

#[test]
fn c_harnesses_pass_plain_and_under_sanitizers() {
    tools::ensure_c_toolchain();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/incremental_bitmap");
    let status = Command::new("make")
        .args(["-C", dir, "test", "PROFILE=debug"])
        .status()
        .expect("make is installed");
    assert!(status.success(), "C harnesses failed: see the output above");
}
