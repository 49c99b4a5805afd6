//! Labelled objects (endpoints, network sets, nodes) by label value.
//!
//! A selector with an equality (or `in`) conjunct can only match objects
//! carrying one of those values, so an IP set is filled by evaluating its
//! selector on those candidates instead of on every object in the cluster.
//! A full compile builds the index over the labelled objects at once (slot
//! = position in [`ClusterState::labelled_nets`]); the incremental compiler
//! keeps it, with each slot's object key, and updates it as objects change,
//! so that a new selector set (a policy added) finds its members without
//! looking at the 250,000 pods it does not select.
//!
//! The index may hold more than an object's labels (a label a pod's own
//! value overrides is indexed under both values, and such an entry can
//! outlive the object in a reused slot): a candidate list is a superset,
//! and the selector is always evaluated on the candidates. It must never
//! hold less.
//!
//! [`ClusterState::labelled_nets`]: model::state::ClusterState::labelled_nets
use std::collections::{BTreeSet, HashMap};

use model::calico::ResourceKey;
use model::selector::{LabelView, Selector};
use model::state::LabelledNets;

/// Label → value → slots carrying it (sorted, no duplicates); with
/// [`LabelIndex::with_keys`], which object is in each slot.
#[derive(Debug, Default)]
pub(crate) struct LabelIndex {
    by_label: HashMap<Box<str>, HashMap<Box<str>, Vec<u32>>>,
    /// Which object is in which slot; empty for an index a full compile
    /// uses and drops.
    keys: SlotKeys,
    free: Vec<u32>,
}

/// Slot ↔ object key. The slots given at build time are the labelled
/// objects in key order, so they need no map: slot `i` is `built[i]` and a
/// key's slot is found by binary search (at 250,000 pods, an `Arc` and a
/// hash-map entry per object cost ~200 ms of cold start and ~15 MiB).
/// Objects that take a slot later (new, or re-using a freed slot) are in
/// the two small maps.
#[derive(Debug, Default)]
struct SlotKeys {
    /// The objects at build time, sorted; `built_live[i]`: `built[i]` still
    /// holds slot `i`.
    built: Vec<ResourceKey>,
    built_live: Vec<bool>,
    later: HashMap<ResourceKey, u32>,
    later_by_slot: HashMap<u32, ResourceKey>,
    /// Slots handed out so far (build-time ones included).
    len: u32,
}

impl SlotKeys {
    fn slot(&self, key: &ResourceKey) -> Option<u32> {
        if let Some(slot) = self.later.get(key) {
            return Some(*slot);
        }
        let i = self.built.binary_search(key).ok()?;
        self.built_live[i].then(|| u32::try_from(i).expect("fewer than 4 billion"))
    }

    fn key(&self, slot: u32) -> Option<&ResourceKey> {
        let i = slot as usize;
        if self.built_live.get(i) == Some(&true) {
            return Some(&self.built[i]);
        }
        self.later_by_slot.get(&slot)
    }

    fn insert(&mut self, key: &ResourceKey, slot: u32) {
        self.later.insert(key.clone(), slot);
        self.later_by_slot.insert(slot, key.clone());
    }

    fn remove(&mut self, key: &ResourceKey, slot: u32) {
        if self.later.remove(key).is_some() {
            self.later_by_slot.remove(&slot);
        } else if let Ok(i) = self.built.binary_search(key) {
            self.built_live[i] = false;
        }
    }
}

impl LabelIndex {
    /// Indexes `nets`: slot `i` is `nets[i]`.
    pub(crate) fn new(nets: &[LabelledNets<'_>]) -> LabelIndex {
        let mut index = LabelIndex::default();
        for (i, n) in nets.iter().enumerate() {
            let slot = u32::try_from(i).expect("fewer than 4 billion labelled objects");
            for (k, v) in n.labels.pairs() {
                // Slots come in ascending order: pushing keeps lists sorted.
                let list = index.list_mut(k, v);
                if list.last() != Some(&slot) {
                    list.push(slot);
                }
            }
        }
        index
    }

    /// Names the object in each slot (`keys[i]` for slot `i`, as given to
    /// [`LabelIndex::new`], in key order), so the index can follow changes
    /// ([`LabelIndex::relabel`]) and say which objects a slot holds.
    pub(crate) fn with_keys(mut self, keys: impl Iterator<Item = ResourceKey>) -> LabelIndex {
        let built: Vec<ResourceKey> = keys.collect();
        debug_assert!(built.is_sorted(), "labelled objects come in key order");
        self.keys = SlotKeys {
            built_live: vec![true; built.len()],
            len: u32::try_from(built.len()).expect("fewer than 4 billion labelled objects"),
            built,
            ..SlotKeys::default()
        };
        self
    }

    fn list_mut(&mut self, k: &str, v: &str) -> &mut Vec<u32> {
        // Looked up by &str first: allocating the key only for a new value.
        if !self.by_label.contains_key(k) {
            self.by_label.insert(k.into(), HashMap::new());
        }
        let values = self.by_label.get_mut(k).expect("inserted above");
        if !values.contains_key(v) {
            values.insert(v.into(), Vec::new());
        }
        values.get_mut(v).expect("inserted above")
    }

    /// Object `key` changed from `before` to `after` labels (`None`: it did
    /// not exist / no longer exists).
    pub(crate) fn relabel(
        &mut self,
        key: &ResourceKey,
        before: Option<&LabelView<'_>>,
        after: Option<&LabelView<'_>>,
    ) {
        let pairs = |l: Option<&LabelView<'_>>| -> BTreeSet<(String, String)> {
            l.into_iter()
                .flat_map(LabelView::pairs)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let (before, after) = (pairs(before), pairs(after));
        let slot = match self.keys.slot(key) {
            Some(slot) => slot,
            None if after.is_empty() && before.is_empty() => return,
            None => self.assign(key),
        };
        for (k, v) in before.difference(&after) {
            if let Some(list) = self
                .by_label
                .get_mut(k.as_str())
                .and_then(|m| m.get_mut(v.as_str()))
            {
                if let Ok(at) = list.binary_search(&slot) {
                    list.remove(at);
                }
            }
        }
        for (k, v) in after.difference(&before) {
            let list = self.list_mut(k, v);
            if let Err(at) = list.binary_search(&slot) {
                list.insert(at, slot);
            }
        }
        if after.is_empty() {
            // Gone (or carries no label: still nothing to find it by).
            self.keys.remove(key, slot);
            self.free.push(slot);
        }
    }

    fn assign(&mut self, key: &ResourceKey) -> u32 {
        let slot = self.free.pop().unwrap_or_else(|| {
            let slot = self.keys.len;
            self.keys.len = slot
                .checked_add(1)
                .expect("fewer than 4 billion labelled objects");
            slot
        });
        self.keys.insert(key, slot);
        slot
    }

    /// The object in `slot` (`None`: a free slot).
    pub(crate) fn key(&self, slot: u32) -> Option<&ResourceKey> {
        self.keys.key(slot)
    }

    /// Slots that may hold a match of `sel` (a superset), or `None` for
    /// "any": the intersection of the slots carrying each label value the
    /// selector requires (for `a == 'x' && b == 'y'`, exactly the matches).
    pub(crate) fn candidates(&self, sel: &Selector) -> Option<Vec<u32>> {
        let mut lists: Vec<Vec<u32>> = sel
            .required_labels()
            .into_iter()
            .map(|(label, values)| {
                let of_label = self.by_label.get(label);
                let mut c: Vec<u32> = values
                    .iter()
                    .flat_map(|v| of_label.and_then(|m| m.get(*v)).into_iter().flatten())
                    .copied()
                    .collect();
                if values.len() > 1 {
                    c.sort_unstable();
                    c.dedup();
                }
                c
            })
            .collect();
        lists.sort_by_key(Vec::len);
        let mut lists = lists.into_iter();
        let mut best = lists.next()?;
        for other in lists {
            if best.is_empty() {
                break;
            }
            best = intersect_sorted(&best, &other);
        }
        Some(best)
    }
}

/// Elements of both sorted lists.
fn intersect_sorted(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len().min(b.len()));
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}
