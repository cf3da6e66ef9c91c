//! Which coordinators the library knows, and who owns their config strings (C_API §3).
//!
//! A coordinator's memory is the caller's or the library's, and the C struct has no room
//! for the library's own state: the registry maps each coordinator's address (an opaque
//! `usize`) to its [`Coordinator`]. It also remembers whether the library created the
//! coordinator, which decides at destroy whether the config strings are the library's
//! copies (freed) or the caller's (left alone).
//!
//! The registry cannot outgrow the live coordinators by much: an entry is removed at
//! destroy; a caller's coordinator freed without destroy is detected when its address is
//! reused (the fields differ from what the library last saw, see [`Seen`]); and at
//! [`MAX_REGISTERED_COORDINATORS`] the least recently used caller-allocated entry goes.

use backup_coordinator_core::coordinator::Coordinator;
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

/// Most coordinators the registry holds at once. Only a caller that frees coordinators
/// with `free()` instead of `backup_coordinator_destroy` (against C_API §3) could otherwise
/// grow it without end; at this bound the least recently used caller-allocated entry is
/// dropped (its coordinator keeps its counts, which live in the struct, and loses its
/// history and last error). Library-created entries are never dropped: destroy needs them
/// to know which config strings are the library's.
pub const MAX_REGISTERED_COORDINATORS: usize = 65_536;

/// The fields of a coordinator as the library last wrote or read them: its counts, and the
/// addresses of its strings. A struct at a registered address whose fields differ is
/// another coordinator: the registered one was freed without destroy and its memory
/// reused. Its stale entry is dropped, so the new coordinator never inherits another's
/// history, counts or string ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub error_count: u64,
    pub retry_count: u64,
    pub last_error_message: usize,
    /// The config's strings (encryption key, error store path, backup path).
    pub strings: [usize; 3],
}

/// A coordinator the registry knows.
pub struct Registered {
    pub core: Coordinator,
    /// Created by the library: the config strings are the library's copies.
    library_owned: bool,
    /// Serializes writes to the struct's fields, and holds what they were last seen to be.
    fields: Mutex<Seen>,
    /// Tick of the last use, for the eviction at the bound.
    last_used: AtomicU64,
}

impl Registered {
    /// The lock every write to the coordinator's fields is made under, holding what they
    /// were last seen to be (update it after writing them).
    pub fn fields(&self) -> MutexGuard<'_, Seen> {
        self.fields.lock()
    }
}

/// What destroy learns from the registry.
pub struct Removed {
    /// The state of this very coordinator, if it had one.
    pub state: Option<Arc<Registered>>,
    /// The config strings are the library's (free them).
    pub owns_strings: bool,
}

/// What the registry holds for an address.
enum Entry {
    /// The state of this very coordinator.
    Current(Arc<Registered>),
    /// None, or a stale one (removed now). `owns_strings`: the stale entry was the
    /// library's and the struct still holds the library's copies of the config strings, so
    /// the library still owns them (the caller changed a count, not the coordinator).
    Absent { owns_strings: bool },
}

#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<usize, Arc<Registered>>>,
    tick: AtomicU64,
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);
    &REGISTRY
}

impl Registry {
    /// Coordinators registered now (live ones, and freed ones not yet detected): at most
    /// [`MAX_REGISTERED_COORDINATORS`].
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a coordinator the library creates: `create` makes it (allocates the
    /// struct) and returns its address, state and fields. `None` when every entry is a
    /// live library-created coordinator (nothing may be dropped), or when `create` fails.
    pub fn create(
        &self,
        create: impl FnOnce() -> Option<(usize, Coordinator, Seen)>,
    ) -> Option<usize> {
        let mut entries = self.entries.lock();
        if !self.make_room(&mut entries) {
            return None;
        }
        let (address, core, seen) = create()?;
        entries.insert(address, self.entry(core, true, seen));
        Some(address)
    }

    /// The state of the coordinator at `address`. A coordinator met for the first time
    /// (allocated by the caller, or at the address of one freed without destroy) is
    /// adopted: `adopt` makes its state from its fields. `observe` reads the fields now.
    pub fn lookup(
        &self,
        address: usize,
        observe: impl Fn() -> Seen,
        adopt: impl FnOnce() -> Coordinator,
    ) -> Arc<Registered> {
        let mut entries = self.entries.lock();
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let owns_strings = match current_entry(&mut entries, address, &observe) {
            Entry::Current(state) => {
                state.last_used.store(tick, Ordering::Relaxed);
                return state;
            }
            Entry::Absent { owns_strings } => owns_strings,
        };
        let state = self.entry(adopt(), owns_strings, observe());
        // With no room (every entry a live library coordinator), the state serves this call only.
        if self.make_room(&mut entries) {
            entries.insert(address, state.clone());
        }
        state
    }

    /// Forgets the coordinator at `address` (destroy). Only the entry of this very
    /// coordinator (not a stale one of a coordinator freed without destroy at the same
    /// address) decides who owns the config strings.
    pub fn remove(&self, address: usize, observe: impl Fn() -> Seen) -> Removed {
        let mut entries = self.entries.lock();
        let entry = current_entry(&mut entries, address, &observe);
        entries.remove(&address);
        match entry {
            Entry::Current(state) => Removed {
                owns_strings: state.library_owned,
                state: Some(state),
            },
            Entry::Absent { owns_strings } => Removed {
                state: None,
                owns_strings,
            },
        }
    }

    fn entry(&self, core: Coordinator, library_owned: bool, seen: Seen) -> Arc<Registered> {
        Arc::new(Registered {
            core,
            library_owned,
            fields: Mutex::new(seen),
            last_used: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
        })
    }

    /// Room for one more entry: drops the least recently used caller-allocated entry at the
    /// bound. False when every entry is library-created (all live, as far as we know).
    fn make_room(&self, entries: &mut HashMap<usize, Arc<Registered>>) -> bool {
        if entries.len() < MAX_REGISTERED_COORDINATORS {
            return true;
        }
        let oldest = entries
            .iter()
            .filter(|(_, state)| !state.library_owned)
            .min_by_key(|(_, state)| state.last_used.load(Ordering::Relaxed))
            .map(|(address, _)| *address);
        match oldest {
            Some(address) => entries.remove(&address).is_some(),
            None => false,
        }
    }
}

/// The registered state at `address` if the struct there is still the coordinator it was
/// registered for; a stale entry (another coordinator at a freed one's address) is removed.
fn current_entry(
    entries: &mut HashMap<usize, Arc<Registered>>,
    address: usize,
    observe: &impl Fn() -> Seen,
) -> Entry {
    let Some(state) = entries.get(&address).cloned() else {
        return Entry::Absent {
            owns_strings: false,
        };
    };
    // Under the field lock, no other call writes the fields being compared (they are
    // written only under it).
    let fields = state.fields.lock();
    let seen = *fields;
    let now = observe();
    drop(fields);
    if seen == now {
        return Entry::Current(state);
    }
    entries.remove(&address);
    Entry::Absent {
        owns_strings: state.library_owned && seen.strings == now.strings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backup_coordinator_core::coordinator::CoordinatorSettings;

    fn core() -> Coordinator {
        Coordinator::new(CoordinatorSettings::default(), 0, 0)
    }

    fn seen(errors: u64, key: usize) -> Seen {
        Seen {
            error_count: errors,
            retry_count: 0,
            last_error_message: 0,
            strings: [key, 0, 0],
        }
    }

    #[test]
    fn created_coordinators_own_their_strings_adopted_ones_do_not() {
        let registry = Registry::default();
        let created = registry
            .create(|| Some((0x1000, core(), seen(0, 7))))
            .unwrap();
        let _ = registry.lookup(0x2000, || seen(0, 9), core);
        assert_eq!(registry.len(), 2);
        assert!(registry.remove(created, || seen(0, 7)).owns_strings);
        assert!(!registry.remove(0x2000, || seen(0, 9)).owns_strings);
        assert!(registry.is_empty());
    }

    #[test]
    fn a_reused_address_is_a_new_coordinator() {
        let registry = Registry::default();
        let first = registry.lookup(0x1000, || seen(0, 0), core);
        first.core.record_error(-6, None);
        *first.fields() = seen(1, 0);
        // Freed without destroy; a new caller coordinator (zero counts) at the same address.
        let second = registry.lookup(0x1000, || seen(0, 0), core);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.core.tracker().stats(), (0, 0));
        // The library's strings still in place, only a count changed: still the library's.
        let created = registry
            .create(|| Some((0x3000, core(), seen(0, 5))))
            .unwrap();
        assert!(registry.remove(created, || seen(4, 5)).owns_strings);
        // Other strings there: the caller's.
        let created = registry
            .create(|| Some((0x3000, core(), seen(0, 5))))
            .unwrap();
        assert!(!registry.remove(created, || seen(0, 6)).owns_strings);
    }
}
