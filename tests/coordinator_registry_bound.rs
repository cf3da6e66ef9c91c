//! The coordinator registry never holds more than MAX_REGISTERED_COORDINATORS entries,
//! whatever a caller leaks. Alone in its test binary: it fills the process-wide registry.

use backup_coordinator::ffi::coordinator::*;
use backup_coordinator::ffi::retry::backup_retry_context_init;
use backup_coordinator::ffi::types::*;
use std::mem::size_of;
use std::ptr::addr_of_mut;

#[test]
fn leaked_caller_coordinators_cannot_grow_the_registry_past_its_bound() {
    let extra = 100;
    let mut leaked = Vec::new();
    unsafe {
        for _ in 0..MAX_REGISTERED_COORDINATORS + extra {
            // calloc: all-zero is a filled coordinator (NULL strings, zero counts).
            let c = libc::calloc(1, size_of::<SBackupCoordinator>()) as *mut SBackupCoordinator;
            assert!(!c.is_null());
            (*c).config.error_buffer_size = 1;
            backup_retry_context_init(addr_of_mut!((*c).retry_context), 0, 0);
            backup_record_error(c, BACKUP_ERROR_NETWORK, std::ptr::null());
            leaked.push(c);
        }
        assert_eq!(registered_coordinators(), MAX_REGISTERED_COORDINATORS);
        // The oldest entries were dropped; their coordinators still work, counts intact
        // (they live in the struct).
        let first = leaked[0];
        backup_record_error(first, BACKUP_ERROR_DISK_FULL, std::ptr::null());
        let (mut errors, mut retries) = (0, 0);
        backup_get_error_stats(first, &mut errors, &mut retries);
        assert_eq!((errors, retries), (2, 0));
        assert!(registered_coordinators() <= MAX_REGISTERED_COORDINATORS);
        for c in leaked {
            backup_coordinator_destroy(c);
        }
        assert_eq!(registered_coordinators(), 0);
    }
}
