//! The in-memory index of the journal: for each live key, a 64-bit hash of the key and the
//! offset of its last record (16 bytes a slot, open addressing with linear probing). The
//! record itself stays in the journal and is read back (`pread`) when a hash matches, which
//! also settles the rare hash collisions by comparing the stored key.
//!
//! Deletions leave tombstones, so that entries never move except while the table grows:
//! an image of the table can then be copied in pieces while callers keep using it.

/// A slot: `meta` 0 is empty, 1 a tombstone, else `(offset + 1) << 1 | is_claim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Slot {
    pub hash: u64,
    pub meta: u64,
}

const EMPTY: u64 = 0;
const TOMB: u64 = 1;
const MIN_SLOTS: usize = 1024;

impl Slot {
    pub fn is_full(&self) -> bool {
        self.meta > TOMB
    }
    pub fn offset(&self) -> u64 {
        (self.meta >> 1) - 1
    }
    pub fn is_claim(&self) -> bool {
        self.meta & 1 == 1
    }
    fn full(hash: u64, offset: u64, claim: bool) -> Slot {
        Slot {
            hash,
            meta: (offset + 1) << 1 | claim as u64,
        }
    }
    /// Whether an image covering the journal up to `covered` holds the slot: a key whose
    /// last record lies past it is replayed from the journal instead.
    pub fn covered_by(&self, covered: u64) -> bool {
        self.is_full() && self.offset() < covered
    }
}

/// The hash of a key (stable across processes and versions: images are shared on disk).
pub(super) fn hash_key(key: &[u8]) -> u64 {
    const M: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (key.len() as u64).wrapping_mul(M) ^ 0x5851_f42d_4c95_7f2d;
    for chunk in key.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(M);
        h ^= h >> 29;
    }
    // murmur3's finalizer: every bit of the key reaches the low bits used for the slot.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A table of `n` empty slots, zeroed by the allocator: a large one comes as fresh pages
/// from the kernel, zeroed when first touched, instead of being written whole (hundreds
/// of MB, a stall of a few hundred ms) while the table grows under the store's mutex.
fn empty_table(n: usize) -> Vec<Slot> {
    let layout = std::alloc::Layout::array::<Slot>(n).expect("an index table fits in memory");
    assert!(layout.size() > 0);
    // SAFETY: the layout has a non-zero size (checked above); a null pointer is handled
    // before use. All-zero bytes are a valid `Slot` (two `u64`s; meta 0 is an empty slot).
    // The pointer comes from the global allocator with the layout of `n` slots, which is
    // the layout a `Vec<Slot>` of capacity `n` frees it with, and all `n` are initialized.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<Slot>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, n, n)
    }
}

/// Huge pages of the kernel's transparent huge page support (x86_64, aarch64 with 4 KB pages).
const HUGE_PAGE: usize = 2 << 20;

/// A table of `n` empty slots in huge pages where the kernel gives them (`MADV_HUGEPAGE`),
/// touched whole now: for a table filled with no lock held (a compaction's, one loaded
/// from an image). At millions of keys every lookup misses the TLB of a table in 4 KB
/// pages; in 2 MB pages its translations fit. Faulting a huge page in zeroes 2 MB, so
/// every page is faulted in here, never by an insertion under the store's mutex (a table
/// that grows under it keeps small pages: that cost 10 ms holds when tried).
fn prefaulted_table(n: usize) -> Vec<Slot> {
    let mut table = empty_table(n);
    let bytes = n * std::mem::size_of::<Slot>();
    if bytes < 2 * HUGE_PAGE {
        return table;
    }
    let start = table.as_mut_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let len = (start + bytes - aligned) / HUGE_PAGE * HUGE_PAGE;
    // SAFETY: `aligned..aligned + len` lies inside the table's allocation (rounded inwards
    // to whole huge pages); the advice changes how the kernel backs those pages, never
    // their contents (all zero, empty slots). Its failure (no THP support) changes nothing.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    let slots_per_page = 4096 / std::mem::size_of::<Slot>();
    for slot in table.iter_mut().step_by(slots_per_page) {
        // A store, so that the page is faulted in now; it writes what is there (empty).
        // SAFETY: `slot` is a valid, aligned, initialized element of the table.
        unsafe { std::ptr::write_volatile(&mut slot.meta, EMPTY) };
    }
    table
}

pub(super) struct Index {
    slots: Vec<Slot>,
    /// While the table grows: the previous table, moved over a few slots at each insertion
    /// (never all at once, which would stall callers); its slots below `moved` are moved.
    old: Vec<Slot>,
    moved: usize,
    /// The old table once moved over: freed by [`Index::take_retired`] outside the mutex
    /// (unmapping hundreds of MB takes milliseconds).
    retired: Vec<Slot>,
    /// Keys in both tables.
    len: usize,
    /// Full slots and tombstones of `slots`.
    used: usize,
    claims: u64,
    /// Moves whenever slots move between tables: an image copied in pieces starts over.
    pub epoch: u64,
}

/// Old slots moved to the new table at each insertion while growing.
const MOVE_STEP: usize = 64;

impl Default for Index {
    fn default() -> Self {
        Index::with_capacity(0)
    }
}

impl Index {
    /// An empty index with room for `keys` keys before it grows.
    pub fn with_capacity(keys: usize) -> Self {
        Index::with_slots(
            (keys.saturating_mul(4) / 3 + 1)
                .next_power_of_two()
                .max(MIN_SLOTS),
        )
    }

    /// An empty index of `slots` slots (a power of two), to be filled with no lock held:
    /// its table is in huge pages, faulted in now (see [`prefaulted_table`]).
    pub fn with_slots(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two());
        Index {
            slots: prefaulted_table(slots.max(MIN_SLOTS)),
            old: Vec::new(),
            moved: 0,
            retired: Vec::new(),
            len: 0,
            used: 0,
            claims: 0,
            epoch: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    /// Keys whose last record is a claim: each may still need room for its completion.
    pub fn claims(&self) -> u64 {
        self.claims
    }
    /// The table's slots; `None` while it grows (slots move).
    pub fn slots(&self) -> Option<&[Slot]> {
        self.old.is_empty().then_some(&self.slots[..])
    }
    /// The address of the table and the mask of its slot numbers (a prefetch hint).
    pub fn table(&self) -> (usize, usize) {
        (self.slots.as_ptr() as usize, self.slots.len() - 1)
    }
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        (self.slots.len() + self.old.len()) * std::mem::size_of::<Slot>()
    }

    /// The slot of the key hashed `hash` for which `is_key(offset, is_claim)` holds (it
    /// reads the record at the offset and compares keys). Slots of the old table while growing are
    /// numbered after the new table's.
    pub fn find<E>(
        &self,
        hash: u64,
        mut is_key: impl FnMut(u64, bool) -> Result<bool, E>,
    ) -> Result<Option<usize>, E> {
        for (table, base) in [(&self.slots, 0), (&self.old, self.slots.len())] {
            if table.is_empty() {
                continue;
            }
            let mask = table.len() - 1;
            let mut at = hash as usize & mask;
            loop {
                let slot = table[at];
                if slot.meta == EMPTY {
                    break;
                }
                if slot.is_full() && slot.hash == hash && is_key(slot.offset(), slot.is_claim())? {
                    return Ok(Some(base + at));
                }
                at = (at + 1) & mask;
            }
        }
        Ok(None)
    }

    /// Whether the slot of hash `hash` points at `offset` (the key's current record).
    pub fn is_current(&self, hash: u64, offset: u64) -> bool {
        matches!(self.find::<()>(hash, |at, _| Ok(at == offset)), Ok(Some(_)))
    }

    fn slot_mut(&mut self, at: usize) -> &mut Slot {
        match at.checked_sub(self.slots.len()) {
            Some(old) => &mut self.old[old],
            None => &mut self.slots[at],
        }
    }

    #[cfg(test)]
    pub fn slot(&mut self, at: usize) -> Slot {
        *self.slot_mut(at)
    }

    /// Points the key found at `found` (or a new key hashed `hash`) at the record at `offset`.
    pub fn set(&mut self, found: Option<usize>, hash: u64, offset: u64, claim: bool) {
        match found {
            Some(at) => {
                let slot = self.slot_mut(at);
                let was_claim = slot.is_claim();
                *slot = Slot::full(hash, offset, claim);
                self.claims = self.claims - was_claim as u64 + claim as u64;
            }
            None => self.insert_new(hash, offset, claim),
        }
    }

    /// Adds a key known not to be in the index.
    pub fn insert_new(&mut self, hash: u64, offset: u64, claim: bool) {
        if !self.old.is_empty() {
            self.move_some(MOVE_STEP);
        }
        if (self.used + 1) * 4 > self.slots.len() * 3 {
            // Growing again before the last growth is done: finish it first.
            self.move_some(usize::MAX);
            self.start_growing();
        }
        self.place(Slot::full(hash, offset, claim));
        self.len += 1;
        self.claims += claim as u64;
    }

    /// Whether an old table waits to be freed.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Keeps the table of an index this one replaces, to be freed outside the mutex.
    pub fn retire(&mut self, replaced: Index) {
        self.retired = replaced.slots;
    }

    /// The old table, to be dropped outside the mutex.
    pub fn take_retired(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.retired)
    }

    /// Puts a full slot in the first free (empty or tombstone) slot of its chain.
    fn place(&mut self, slot: Slot) {
        let mask = self.slots.len() - 1;
        let mut at = slot.hash as usize & mask;
        while self.slots[at].is_full() {
            at = (at + 1) & mask;
        }
        if self.slots[at].meta == EMPTY {
            self.used += 1;
        }
        self.slots[at] = slot;
    }

    pub fn remove(&mut self, at: usize) {
        // A tombstone, in the old table too, keeps chains whole; it goes with the table.
        let slot = self.slot_mut(at);
        debug_assert!(slot.is_full());
        let was_claim = slot.is_claim();
        slot.meta = TOMB;
        self.claims -= was_claim as u64;
        self.len -= 1;
    }

    /// Adds a slot of an index image (its key is not in the index yet).
    pub fn insert_loaded(&mut self, slot: Slot) {
        debug_assert!(slot.is_full() && self.old.is_empty());
        if (self.used + 1) * 4 > self.slots.len() * 3 {
            self.move_some(usize::MAX);
            self.start_growing();
            self.move_some(usize::MAX);
        }
        self.place(slot);
        self.len += 1;
        self.claims += slot.is_claim() as u64;
    }

    /// A new table (twice as large when more than 3/8 full, else as large, without the
    /// tombstones); the current one becomes the old table, moved over bit by bit.
    fn start_growing(&mut self) {
        let size = if self.len * 8 > self.slots.len() * 3 {
            self.slots.len() * 2
        } else {
            self.slots.len()
        };
        self.old = std::mem::replace(&mut self.slots, empty_table(size));
        self.moved = 0;
        self.used = 0;
        self.epoch += 1;
    }

    /// Moves up to `n` old slots to the new table.
    fn move_some(&mut self, n: usize) {
        let end = self.moved.saturating_add(n).min(self.old.len());
        for at in self.moved..end {
            let slot = self.old[at];
            if slot.is_full() {
                self.place(slot);
                // A tombstone keeps the old table's chains whole for lookups.
                self.old[at].meta = TOMB;
            }
        }
        self.moved = end;
        if self.moved == self.old.len() && !self.old.is_empty() {
            self.retired = std::mem::take(&mut self.old);
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_one_hash_are_told_apart_by_their_records() {
        let mut index = Index::default();
        // Three keys share a hash; "records" at offsets 10, 20, 30.
        for offset in [10, 20, 30] {
            index.insert_new(7, offset, offset == 20);
        }
        let find = |index: &Index, offset| index.find::<()>(7, |at, _| Ok(at == offset)).unwrap();
        let at = find(&index, 20).expect("found");
        assert_eq!(index.slot(at).offset(), 20);
        assert_eq!(index.claims(), 1);
        index.set(Some(at), 7, 40, false);
        assert_eq!(index.claims(), 0);
        assert!(find(&index, 20).is_none());
        let at = find(&index, 10).unwrap();
        index.remove(at);
        assert!(find(&index, 10).is_none());
        assert!(find(&index, 30).is_some(), "found past the tombstone");
        assert!(index.is_current(7, 40) && !index.is_current(7, 10));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn growing_keeps_every_key() {
        let mut index = Index::default();
        for i in 0..100_000u64 {
            index.insert_new(hash_key(&i.to_le_bytes()), i * 100, i % 3 == 0);
        }
        // Growing moves the old table over bit by bit: every key is found meanwhile.
        for i in (0..100_000u64).step_by(7) {
            assert!(index.is_current(hash_key(&i.to_le_bytes()), i * 100), "{i}");
        }
        for i in 100_000..250_000u64 {
            index.insert_new(hash_key(&i.to_le_bytes()), i * 100, false);
        }
        let slots = index.slots().expect("done growing").len();
        assert!(slots >= 250_000 * 4 / 3);
        assert!(index.bytes() / 250_000 <= 48, "{}", index.bytes() / 250_000);
        for i in (0..250_000u64).step_by(7) {
            assert!(index.is_current(hash_key(&i.to_le_bytes()), i * 100), "{i}");
        }
        assert_eq!(index.claims(), 33_334);
    }

    #[test]
    fn an_image_holds_the_keys_whose_last_record_it_covers() {
        let slot = Slot::full(1, 50, true);
        assert!(slot.covered_by(51));
        assert!(!slot.covered_by(50));
        assert!(!Slot::default().covered_by(51));
    }
}
