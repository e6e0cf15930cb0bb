//! A task's steps by id.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::state::StepState;

/// A task's steps in id order: a sorted vector, since a task has a handful of steps and a
/// `BTreeMap` allocates a node of eleven on its first insert (over a kilobyte per open task, half
/// of what one took). Serialized as a map from id to step, as the `BTreeMap` it replaces was, so
/// state records and snapshots read the same.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Steps(Vec<(u32, StepState)>);

type Pair = (u32, StepState);
type Iter<'a> = std::iter::Map<std::slice::Iter<'a, Pair>, fn(&Pair) -> (&u32, &StepState)>;
type IterMut<'a> =
    std::iter::Map<std::slice::IterMut<'a, Pair>, fn(&mut Pair) -> (&u32, &mut StepState)>;

impl Steps {
    /// Where step `id` is, or where it would go.
    fn find(&self, id: u32) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(k, _)| *k)
    }

    /// Step `id`.
    pub fn get(&self, id: &u32) -> Option<&StepState> {
        let at = self.find(*id).ok()?;
        Some(&self.0[at].1)
    }

    /// Step `id`, to change.
    pub fn get_mut(&mut self, id: &u32) -> Option<&mut StepState> {
        let at = self.find(*id).ok()?;
        Some(&mut self.0[at].1)
    }

    /// Sets step `id`; returns the step it replaced.
    pub fn insert(&mut self, id: u32, step: StepState) -> Option<StepState> {
        match self.find(id) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, step)),
            Err(at) => {
                // One place at a time while few: most tasks end with one or two steps, and a
                // vector's first growth would make room for four.
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, (id, step));
                None
            }
        }
    }

    /// How many steps.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The steps with their ids, in id order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&u32, &StepState)> {
        self.into_iter()
    }

    /// The ids, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &u32> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl<'a> IntoIterator for &'a Steps {
    type Item = (&'a u32, &'a StepState);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'a> IntoIterator for &'a mut Steps {
    type Item = (&'a u32, &'a mut StepState);
    type IntoIter = IterMut<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }
}

impl Serialize for Steps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<u32, StepState>::deserialize(deserializer)?;
        Ok(Self(map.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StepStatus;

    fn step(card: &str) -> StepState {
        StepState {
            card: card.into(),
            attempt: 1,
            status: StepStatus::Pending,
            since: 0,
            not_before: None,
            escalated_by: None,
            reminders: 0,
            sent_by: None,
        }
    }

    #[test]
    fn steps_keep_id_order_and_read_and_write_like_the_map_they_replace() {
        let mut steps = Steps::default();
        let mut map = BTreeMap::new();
        for (id, card) in [(3, "c"), (1, "a"), (2, "b"), (1, "a2")] {
            assert_eq!(steps.insert(id, step(card)), map.insert(id, step(card)));
        }
        assert_eq!(steps.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(steps.get(&1).unwrap().card, "a2");
        assert!(steps.get(&4).is_none());
        let json = serde_json::to_string(&steps).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        assert_eq!(serde_json::from_str::<Steps>(&json).unwrap(), steps);
        for (_, s) in &mut steps {
            s.attempt = 2;
        }
        assert!(steps.iter().all(|(_, s)| s.attempt == 2));
    }
}
