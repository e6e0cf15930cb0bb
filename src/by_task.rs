//! [`ByTask`]: the router's maps by task id, which grow without stopping it.

use std::borrow::Borrow;
use std::collections::{hash_map, HashMap};
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many hash tables a [`ByTask`] spreads its entries over.
const SHARDS: usize = 64;

type Shard<K, V> = HashMap<K, V, ahash::RandomState>;

/// A map by task id.
///
/// Hashed with aHash: keyed at random per process like std's SipHash (task ids come from
/// clients), and cheaper on keys this short. The router looks a task up, inserts it and files its
/// timers by id for every event: in a `perf` profile of `scripts/bench-routing`, hashing was
/// 3.6 % of the router's route task with SipHash and 1.8 % with aHash.
///
/// Spread over 64 tables by the id's hash, so that growing never rehashes more than about
/// a 64th of the entries at once. One table doubles its buckets when full and rehashes every
/// entry on the router's task meanwhile: with three partitions of 57,000 open tasks each growing
/// at the same rate, `scripts/bench-routing`'s latency runs at 35,000 events/s stopped the router
/// for 10-12 ms three times in a row (a batch of 28-124 events took that long to decide instead
/// of 1-3 ms), at 28,700 and 57,300 tasks a partition, and nearly all of each run's events over
/// its p99 fell in those moments. Alternated twice at that rate, the router's median p99 went
/// from 27.4 and 18.6 ms to 17.7 and 17.1 ms, its max from 33-52 ms to 21-31 ms. Each table
/// picks its buckets with a hasher of its own: the bits that chose the table are the same for all
/// its ids.
#[derive(Clone)]
pub struct ByTask<V, K = String> {
    shards: Box<[Shard<K, V>]>,
    pick: ahash::RandomState,
    len: usize,
}

impl<V, K> Default for ByTask<V, K> {
    fn default() -> Self {
        let inner = ahash::RandomState::new();
        Self {
            shards: (0..SHARDS)
                .map(|_| HashMap::with_hasher(inner.clone()))
                .collect(),
            pick: ahash::RandomState::new(),
            len: 0,
        }
    }
}

/// An iterator over a [`ByTask`]'s entries, in no particular order.
pub type Iter<'a, K, V> = std::iter::FlatMap<
    std::slice::Iter<'a, Shard<K, V>>,
    hash_map::Iter<'a, K, V>,
    fn(&'a Shard<K, V>) -> hash_map::Iter<'a, K, V>,
>;

impl<V, K: Borrow<str> + Hash + Eq> ByTask<V, K> {
    fn shard(&self, id: &str) -> usize {
        (self.pick.hash_one(id) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    /// The entry of `id`.
    pub fn get(&self, id: &str) -> Option<&V> {
        self.shards[self.shard(id)].get(id)
    }

    /// The entry of `id`, with the key it is filed under.
    pub fn get_key_value(&self, id: &str) -> Option<(&K, &V)> {
        self.shards[self.shard(id)].get_key_value(id)
    }

    /// The entry of `id`, to change it.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        let shard = self.shard(id);
        self.shards[shard].get_mut(id)
    }

    /// Whether `id` has an entry.
    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Sets the entry of `id`; returns the one it replaces.
    pub fn insert(&mut self, id: K, value: V) -> Option<V> {
        let shard = self.shard(id.borrow());
        let old = self.shards[shard].insert(id, value);
        self.len += usize::from(old.is_none());
        old
    }

    /// The entry of `id`, set to `make()` first when there is none, with whether it was: one
    /// lookup where [`Self::get_mut`] then [`Self::insert`] take two.
    pub fn get_or_insert_with(&mut self, id: K, make: impl FnOnce() -> V) -> (&mut V, bool) {
        let shard = self.shard(id.borrow());
        match self.shards[shard].entry(id) {
            hash_map::Entry::Occupied(entry) => (entry.into_mut(), false),
            hash_map::Entry::Vacant(entry) => {
                self.len += 1;
                (entry.insert(make()), true)
            }
        }
    }

    /// Takes the entry of `id` out.
    pub fn remove(&mut self, id: &str) -> Option<V> {
        self.remove_entry(id).map(|(_, value)| value)
    }

    /// Takes the entry of `id` out, with the key it was filed under.
    pub fn remove_entry(&mut self, id: &str) -> Option<(K, V)> {
        let shard = self.shard(id);
        let removed = self.shards[shard].remove_entry(id);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its entries, in no particular order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    /// Its ids, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(id, _)| id)
    }

    /// Its values, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, value)| value)
    }
}

impl<'a, V, K: Borrow<str> + Hash + Eq> IntoIterator for &'a ByTask<V, K> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<V, K: Borrow<str> + Hash + Eq> FromIterator<(K, V)> for ByTask<V, K> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut map = Self::default();
        for (id, value) in entries {
            map.insert(id, value);
        }
        map
    }
}

impl<V, K: Borrow<str> + Hash + Eq> std::ops::Index<&str> for ByTask<V, K> {
    type Output = V;

    /// The entry of `id`; panics when there is none.
    fn index(&self, id: &str) -> &V {
        self.get(id).expect("no entry for this task id")
    }
}

/// Equal when both hold the same ids with equal values, whatever their tables.
impl<V: PartialEq, K: Borrow<str> + Hash + Eq> PartialEq for ByTask<V, K> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|(id, v)| other.get(id.borrow()) == Some(v))
    }
}

impl<V: fmt::Debug, K: fmt::Debug + Borrow<str> + Hash + Eq> fmt::Debug for ByTask<V, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serialized as one map, like a `HashMap`.
impl<V: Serialize, K: Serialize + Borrow<str> + Hash + Eq> Serialize for ByTask<V, K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, V, K> Deserialize<'de> for ByTask<V, K>
where
    V: Deserialize<'de>,
    K: Deserialize<'de> + Borrow<str> + Hash + Eq,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V, K>(PhantomData<(V, K)>);

        impl<'de, V, K> Visitor<'de> for Entries<V, K>
        where
            V: Deserialize<'de>,
            K: Deserialize<'de> + Borrow<str> + Hash + Eq,
        {
            type Value = ByTask<V, K>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map by task id")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Self::Value, A::Error> {
                let mut map = ByTask::default();
                while let Some((id, value)) = entries.next_entry()? {
                    map.insert(id, value);
                }
                Ok(map)
            }
        }

        deserializer.deserialize_map(Entries(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map() {
        let mut map: ByTask<u32> = ByTask::default();
        assert!(map.is_empty());
        for i in 0..1000 {
            assert_eq!(map.insert(format!("t{i}"), i), None);
        }
        assert_eq!(map.insert("t7".into(), 70), Some(7), "replaced");
        assert_eq!(map.len(), 1000);
        assert_eq!(map.get("t7"), Some(&70));
        assert_eq!(map["t8"], 8);
        *map.get_mut("t8").unwrap() = 80;
        assert_eq!(map.remove("t8"), Some(80));
        assert_eq!(map.remove("t8"), None);
        assert_eq!(map.remove_entry("t9"), Some(("t9".to_string(), 9)));
        assert!(!map.contains_key("t9") && map.contains_key("t10"));
        assert_eq!(map.get_or_insert_with("t9".into(), || 90), (&mut 90, true));
        assert_eq!(map.get_or_insert_with("t9".into(), || 0), (&mut 90, false));
        assert_eq!(map.remove("t9"), Some(90));
        assert_eq!(map.len(), 998);
        assert_eq!(map.iter().count(), 998);
        assert_eq!(map.values().filter(|v| **v == 70).count(), 2, "t7 and t70");
        assert!(map.keys().all(|k| map.contains_key(k)));
    }

    #[test]
    fn growing_rehashes_a_small_part_at_a_time() {
        let map: ByTask<()> = (0..64_000).map(|i| (format!("task-{i}"), ())).collect();
        let sizes: Vec<usize> = map.shards.iter().map(HashMap::len).collect();
        // 1,000 per table on average: none holds more than a fortieth of the entries.
        assert!(sizes.iter().all(|n| (700..1600).contains(n)), "{sizes:?}");
    }

    #[test]
    fn equal_and_serialized_whatever_the_tables() {
        let a: ByTask<u32> = (0..100).map(|i| (format!("t{i}"), i)).collect();
        let b: ByTask<u32> = (0..100).rev().map(|i| (format!("t{i}"), i)).collect();
        assert_eq!(a, b, "other random keys, other insertion order");
        let mut c = b.clone();
        c.insert("t1".into(), 2);
        assert_ne!(a, c);
        let json = serde_json::to_string(&a).unwrap();
        let plain: HashMap<String, u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(plain.len(), 100);
        assert_eq!(serde_json::from_str::<ByTask<u32>>(&json).unwrap(), a);
    }
}
