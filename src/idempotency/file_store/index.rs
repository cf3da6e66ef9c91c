//! The in-memory index of the journal: for each live key, a 64-bit hash of the key and the
//! offset of its last record (16 bytes a slot, open addressing with linear probing). The
//! record itself stays in the journal and is read back (`pread`) when a hash matches, which
//! also settles the rare hash collisions by comparing the stored key.
//!
//! Deletions leave tombstones, so that entries never move except when the table is rebuilt:
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
    /// The slot as an image covering the journal up to `covered` keeps it: a later record
    /// is replayed from the journal, so its slot becomes a tombstone (keeping probe chains).
    pub fn as_of(&self, covered: u64) -> Slot {
        if self.is_full() && self.offset() >= covered {
            Slot {
                hash: self.hash,
                meta: TOMB,
            }
        } else {
            *self
        }
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

pub(super) struct Index {
    slots: Vec<Slot>,
    len: usize,
    tombs: usize,
    claims: u64,
    /// Moves on each rebuild (entries moved): an image copied in pieces starts over.
    pub epoch: u64,
}

impl Default for Index {
    fn default() -> Self {
        Index::with_capacity(0)
    }
}

impl Index {
    /// An empty index with room for `keys` keys before it grows.
    pub fn with_capacity(keys: usize) -> Self {
        let slots = (keys.saturating_mul(4) / 3 + 1)
            .next_power_of_two()
            .max(MIN_SLOTS);
        Index {
            slots: vec![Slot::default(); slots],
            len: 0,
            tombs: 0,
            claims: 0,
            epoch: 0,
        }
    }

    /// An index from an image's slots and counts.
    pub fn from_slots(slots: Vec<Slot>, len: usize, tombs: usize, claims: u64) -> Self {
        debug_assert!(slots.len().is_power_of_two());
        Index {
            slots,
            len,
            tombs,
            claims,
            epoch: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    #[cfg(test)]
    pub fn tombs(&self) -> usize {
        self.tombs
    }
    /// Keys whose last record is a claim: each may still need room for its completion.
    pub fn claims(&self) -> u64 {
        self.claims
    }
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot of the key hashed `hash` for which `is_key(offset)` holds (it reads the
    /// record at the offset and compares keys).
    pub fn find<E>(
        &self,
        hash: u64,
        mut is_key: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<Option<usize>, E> {
        let mut at = hash as usize & self.mask();
        loop {
            let slot = self.slots[at];
            if slot.meta == EMPTY {
                return Ok(None);
            }
            if slot.is_full() && slot.hash == hash && is_key(slot.offset())? {
                return Ok(Some(at));
            }
            at = (at + 1) & self.mask();
        }
    }

    /// Whether the slot of hash `hash` points at `offset` (the key's current record).
    pub fn is_current(&self, hash: u64, offset: u64) -> bool {
        matches!(self.find::<()>(hash, |at| Ok(at == offset)), Ok(Some(_)))
    }

    #[cfg(test)]
    pub fn slot(&self, at: usize) -> Slot {
        self.slots[at]
    }

    /// Points the key found at `found` (or a new key hashed `hash`) at the record at `offset`.
    pub fn set(&mut self, found: Option<usize>, hash: u64, offset: u64, claim: bool) {
        match found {
            Some(at) => {
                let old = self.slots[at];
                self.claims = self.claims - old.is_claim() as u64 + claim as u64;
                self.slots[at] = Slot::full(hash, offset, claim);
            }
            None => self.insert_new(hash, offset, claim),
        }
    }

    /// Adds a key known not to be in the index.
    pub fn insert_new(&mut self, hash: u64, offset: u64, claim: bool) {
        if (self.len + self.tombs + 1) * 4 > self.slots.len() * 3 {
            self.rebuild();
        }
        let mut at = hash as usize & self.mask();
        while self.slots[at].is_full() {
            at = (at + 1) & self.mask();
        }
        if self.slots[at].meta == TOMB {
            self.tombs -= 1;
        }
        self.slots[at] = Slot::full(hash, offset, claim);
        self.len += 1;
        self.claims += claim as u64;
    }

    pub fn remove(&mut self, at: usize) {
        let old = self.slots[at];
        debug_assert!(old.is_full());
        self.claims -= old.is_claim() as u64;
        self.slots[at] = Slot {
            hash: old.hash,
            meta: TOMB,
        };
        self.len -= 1;
        self.tombs += 1;
    }

    /// Rehashes without tombstones, twice as large when more than 3/8 full.
    fn rebuild(&mut self) {
        let size = if self.len * 8 > self.slots.len() * 3 {
            self.slots.len() * 2
        } else {
            self.slots.len()
        };
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); size]);
        let mask = size - 1;
        for slot in old.into_iter().filter(Slot::is_full) {
            let mut at = slot.hash as usize & mask;
            while self.slots[at].is_full() {
                at = (at + 1) & mask;
            }
            self.slots[at] = slot;
        }
        self.tombs = 0;
        self.epoch += 1;
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
        let find = |index: &Index, offset| index.find::<()>(7, |at| Ok(at == offset)).unwrap();
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
        assert_eq!((index.len(), index.tombs()), (2, 1));
    }

    #[test]
    fn growing_keeps_every_key() {
        let mut index = Index::default();
        for i in 0..100_000u64 {
            index.insert_new(hash_key(&i.to_le_bytes()), i * 100, i % 3 == 0);
        }
        assert!(index.slots().len() >= 100_000 * 4 / 3);
        assert!(index.bytes() / 100_000 <= 48, "{}", index.bytes() / 100_000);
        for i in (0..100_000u64).step_by(7) {
            assert!(index.is_current(hash_key(&i.to_le_bytes()), i * 100), "{i}");
        }
        assert_eq!(index.claims(), 33_334);
    }

    #[test]
    fn image_slots_past_the_covered_offset_become_tombstones() {
        let slot = Slot::full(1, 50, true);
        assert_eq!(slot.as_of(51), slot);
        assert!(!slot.as_of(50).is_full());
        assert_eq!(slot.as_of(50).meta, TOMB);
    }
}
