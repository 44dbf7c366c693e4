//! The engine's map keys and hashers: the ordering key of an aggregate as the engine
//! holds it — shared (a clone is a reference count, not two strings), with its 64-bit
//! hash computed once, keyed by this process's random seed, so the maps keyed by it hash
//! nothing again (`KeyMap`, `KeySet`) —, and the maps keyed by row ids and aggregate
//! hashes (`HashMap`, `HashSet`: foldhash, randomly seeded, instead of SipHash, which
//! took a twentieth of the relay's instructions in a drain).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, OnceLock};

/// (`aggregate_type`, `aggregate_id`), both in one shared allocation.
#[derive(Clone)]
pub struct AggKey {
    hash: u64,
    /// Where `aggregate_type` ends in `text`.
    split: usize,
    text: Arc<[u8]>,
}

/// This process's hash seed: random, as std's maps are, so producers cannot choose keys
/// that collide.
fn seed() -> &'static RandomState {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    SEED.get_or_init(RandomState::new)
}

impl AggKey {
    pub fn new(aggregate_type: &str, aggregate_id: &str) -> Self {
        Self {
            hash: seed().hash_one((aggregate_type, aggregate_id)),
            split: aggregate_type.len(),
            // One allocation (the iterator knows its length).
            text: aggregate_type.bytes().chain(aggregate_id.bytes()).collect(),
        }
    }

    /// The key's hash (the same for equal keys within this process).
    pub fn hash64(&self) -> u64 {
        self.hash
    }

    /// Its `aggregate_type` (a tenant, for the sweep's fairness between types).
    pub fn aggregate_type(&self) -> &str {
        // Built from a `&str` and split at its end: always UTF-8.
        std::str::from_utf8(&self.text[..self.split]).unwrap_or_default()
    }
}

impl std::fmt::Debug for AggKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (t, id) = self.text.split_at(self.split);
        f.debug_tuple("AggKey")
            .field(&String::from_utf8_lossy(t))
            .field(&String::from_utf8_lossy(id))
            .finish()
    }
}

impl PartialEq for AggKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.split == other.split && self.text == other.text
    }
}

impl Eq for AggKey {}

impl Hash for AggKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A hasher that takes a key's ready hash as it is (`AggKey` writes one `u64`).
#[derive(Debug, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not what `AggKey` or `u64` write; folded in so any key still hashes.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type KeyMap<V> = std::collections::HashMap<AggKey, V, BuildHasherDefault<KeyHasher>>;
pub type KeySet = std::collections::HashSet<AggKey, BuildHasherDefault<KeyHasher>>;

/// The engine's maps keyed by ids and hashes.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The engine's sets of ids and hashes.
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_hash_alike_and_the_pair_is_unambiguous() {
        let (a, b) = (AggKey::new("order", "42"), AggKey::new("order", "42"));
        assert_eq!(a, b);
        assert_eq!(a.hash64(), b.hash64());
        assert_ne!(AggKey::new("ord", "er42"), AggKey::new("order", "42"));
        assert_ne!(
            AggKey::new("ord", "er42").hash64(),
            AggKey::new("order", "42").hash64()
        );
        let mut m = KeyMap::default();
        m.insert(a.clone(), 1);
        assert_eq!(m.get(&b), Some(&1));
        assert_eq!(m.get(&AggKey::new("order", "43")), None);
        assert_eq!(AggKey::new("ord", "er42").aggregate_type(), "ord");
        assert_eq!(AggKey::new("", "x").aggregate_type(), "");
    }
}
