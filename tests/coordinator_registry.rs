//! The coordinator registry (src/ffi/coordinator.rs) against callers that break the
//! contract of C_API §3 by freeing a coordinator with `free()` instead of destroy: a new
//! coordinator that malloc returns at the same address never inherits the freed one's
//! history, counts or string ownership. And a coordinator's `error_buffer_size` is capped
//! as the plugin's is.

use backup_coordinator::coordinator::{Coordinator, CoordinatorSettings};
use backup_coordinator::ffi::coordinator::*;
use backup_coordinator::ffi::retry::backup_retry_context_init;
use backup_coordinator::ffi::types::*;
use backup_coordinator::tracker::MAX_HISTORY;
use std::ffi::{c_char, CStr};
use std::mem::size_of;
use std::ptr::{addr_of_mut, null_mut};

/// A coordinator as a C caller makes it: malloc, every field written, strings the caller's.
unsafe fn malloc_coordinator(key: *const c_char) -> *mut SBackupCoordinator {
    unsafe {
        let c = libc::malloc(size_of::<SBackupCoordinator>()) as *mut SBackupCoordinator;
        assert!(!c.is_null());
        std::ptr::write_bytes(c as *mut u8, 0, size_of::<SBackupCoordinator>());
        (*c).config.encryption_key = key as *mut c_char;
        (*c).config.error_buffer_size = 8;
        backup_retry_context_init(addr_of_mut!((*c).retry_context), 0, 0);
        c
    }
}

fn last_error(c: *mut SBackupCoordinator) -> String {
    unsafe { CStr::from_ptr(backup_get_last_error(c)) }
        .to_string_lossy()
        .into_owned()
}

fn stats(c: *mut SBackupCoordinator) -> (u64, u64) {
    let (mut errors, mut retries) = (u64::MAX, u64::MAX);
    backup_get_error_stats(c, &mut errors, &mut retries);
    (errors, retries)
}

#[test]
fn a_coordinator_at_a_freed_ones_address_starts_clean() {
    unsafe {
        let first = malloc_coordinator(c"first-key".as_ptr());
        backup_record_error(
            first,
            BACKUP_ERROR_NETWORK,
            c"first coordinator's error".as_ptr(),
        );
        assert_eq!(stats(first), (1, 0));
        // Against the contract: free() instead of destroy (the library's last_error_message
        // is leaked with it; freed first here so that the leak checker stays quiet).
        libc::free((*first).last_error_message as *mut libc::c_void);
        libc::free(first as *mut libc::c_void);

        let second = malloc_coordinator(c"second-key".as_ptr());
        // glibc hands a just-freed chunk of the same size straight back (thread cache).
        assert_eq!(
            second, first,
            "malloc did not reuse the address: the test proves nothing"
        );
        assert_eq!(
            last_error(second),
            "Success",
            "the new coordinator inherited an error"
        );
        assert_eq!(stats(second), (0, 0));
        let mut held = u32::MAX;
        assert_eq!(
            backup_get_error_history(second, null_mut(), 0, &mut held),
            BACKUP_SUCCESS
        );
        assert_eq!(held, 0, "the new coordinator inherited a history");
        backup_record_error(second, BACKUP_ERROR_DISK_FULL, std::ptr::null());
        assert_eq!(stats(second), (1, 0));
        assert_eq!(last_error(second), "Disk full");
        backup_coordinator_destroy(second);
    }
}

#[test]
fn a_caller_coordinator_at_a_freed_library_ones_address_keeps_its_strings() {
    unsafe {
        let config = {
            let mut config: SBackupCoordinatorConfig = std::mem::zeroed();
            config.encryption_key = c"library-copy".as_ptr() as *mut c_char;
            config.error_buffer_size = 4;
            config
        };
        let made = backup_coordinator_init(&config, null_mut(), null_mut());
        assert!(!made.is_null());
        // Against the contract: the library's coordinator freed with free() (its strdup'd
        // key freed too, by hand, so that the leak checker stays quiet).
        libc::free((*made).config.encryption_key as *mut libc::c_void);
        libc::free(made as *mut libc::c_void);

        // A caller's coordinator whose key is a static string, not heap memory: were the
        // stale "library-created" entry believed, destroy would free() it and abort.
        let key = c"caller-owned-static-key";
        let c = malloc_coordinator(key.as_ptr());
        assert_eq!(
            c, made,
            "malloc did not reuse the address: the test proves nothing"
        );
        backup_record_error(c, BACKUP_ERROR_NETWORK, c"after reuse".as_ptr());
        assert_eq!(stats(c), (1, 0));
        backup_coordinator_destroy(c);
        assert_eq!(key.to_str().unwrap(), "caller-owned-static-key");
    }
}

#[test]
fn a_coordinator_changed_by_its_caller_is_read_again_from_its_fields() {
    unsafe {
        let c = malloc_coordinator(std::ptr::null());
        backup_record_error(c, BACKUP_ERROR_NETWORK, c"one".as_ptr());
        backup_record_error(c, BACKUP_ERROR_NETWORK, c"two".as_ptr());
        assert_eq!(stats(c), (2, 0));
        // The caller resets its counters in place: the library follows the struct.
        (*c).error_count = 0;
        assert_eq!(stats(c), (0, 0));
        backup_coordinator_destroy(c);
    }
}

#[test]
fn error_buffer_size_is_capped_as_the_plugins_is() {
    let coordinator = Coordinator::new(
        CoordinatorSettings {
            error_buffer_size: u32::MAX as usize,
            ..CoordinatorSettings::default()
        },
        0,
        0,
    );
    assert_eq!(coordinator.tracker().history_capacity(), MAX_HISTORY);
    assert_eq!(MAX_HISTORY, 1_000_000);
    let small = Coordinator::new(
        CoordinatorSettings {
            error_buffer_size: 3,
            ..CoordinatorSettings::default()
        },
        0,
        0,
    );
    assert_eq!(small.tracker().history_capacity(), 3);
    // The plugin's config refuses what the coordinator caps.
    let err = backup_coordinator::config::PluginConfig::parse(b"error_buffer_size = 1000001")
        .unwrap_err();
    assert!(err.0.contains("1000000"), "{}", err.0);
}

#[test]
fn a_library_coordinator_whose_counts_its_caller_reset_keeps_its_string_ownership() {
    unsafe {
        let config = {
            let mut config: SBackupCoordinatorConfig = std::mem::zeroed();
            config.encryption_key = c"library-copy".as_ptr() as *mut c_char;
            config.error_buffer_size = 4;
            config
        };
        let c = backup_coordinator_init(&config, null_mut(), null_mut());
        assert!(!c.is_null());
        backup_record_error(c, BACKUP_ERROR_NETWORK, c"one".as_ptr());
        (*c).error_count = 0;
        backup_record_error(c, BACKUP_ERROR_NETWORK, c"two".as_ptr());
        assert_eq!(stats(c), (1, 0));
        // The library's copy of the key is still the library's: destroy frees it (the
        // ASan run of test_bool_bytes.c checks that nothing leaks), and the caller's stays.
        backup_coordinator_destroy(c);
        assert_eq!(
            CStr::from_ptr(config.encryption_key).to_str().unwrap(),
            "library-copy"
        );
    }
}
