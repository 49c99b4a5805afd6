//! Applying set element deltas: the fast path for pod churn.
//!
//! When an incremental compile finds that only set members changed, there
//! is no need to diff the whole desired ruleset against the committed one
//! (which costs time in proportion to the ruleset, not to the change): the
//! delta is encoded as it is — `DELSETELEM`, then `NEWSETELEM`, per set —
//! in one atomic batch, and applied to the committed copy on success.
//!
//! A local endpoint change also touches a few chains, sets and maps: a
//! [`RulesetPatch`] names them, and only they are diffed against their
//! committed versions (with the same ordering rules as a full apply).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use compiler::nft::{
    ElementDelta, Elements, RulesetPatch, Set, SetDelta, SetElement, Table, TableFamily, TablePatch,
};

use tracing::debug;

use crate::batch::Batch;
use crate::consts::{NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM};
use crate::plan::{RuleEdit, RuleHandles};
use crate::readback::read_rules;
use crate::{decode, encode, netlink, ApplyReport, Error, NftProgrammer, Tables};

impl NftProgrammer {
    /// Applies set element changes to sets we committed earlier, in ONE
    /// atomic transaction. Fails with [`Error::NotCommitted`] (nothing
    /// sent) when a set of the delta is not in the committed state, or
    /// nothing was committed yet: the caller then applies the full ruleset.
    pub fn apply_elements(&mut self, delta: &ElementDelta) -> Result<ApplyReport, Error> {
        let t0 = Instant::now();
        let mut b = Batch::new();
        encode_element_delta(&mut b, self.committed_tables()?, delta)?;
        self.send_unless_empty(b, t0, |committed| apply_shared(committed, delta))
    }

    /// Applies a patch of chains, sets and maps (and element changes) to
    /// our committed tables, in ONE atomic transaction: the named objects
    /// are diffed against their committed versions, nothing else is
    /// looked at. Fails with [`Error::NotCommitted`] (nothing sent) when a
    /// table or an element-changed set is not in the committed state.
    pub fn apply_patch(&mut self, patch: &RulesetPatch) -> Result<ApplyReport, Error> {
        let t0 = Instant::now();
        let mut b = Batch::new();
        {
            // Borrowed field by field: the socket reads edited chains'
            // handles while the committed tables are borrowed.
            let committed = self
                .committed
                .as_ref()
                .ok_or_else(crate::nothing_committed)?;
            for p in &patch.tables {
                let table = committed.get(&(p.family, p.table.clone())).ok_or_else(|| {
                    Error::NotCommitted {
                        object: format!("table {} {}", p.family.keyword(), p.table),
                    }
                })?;
                let handles = rule_handles(&mut self.sock, table, p);
                let (before, after) = patched_objects(table, p);
                crate::plan::diff_table(&mut b, &before, &after, &handles)?;
            }
            encode_element_delta(&mut b, committed, &patch.elements)?;
        }
        self.send_unless_empty(b, t0, |committed| {
            for p in &patch.tables {
                if let Some(t) = committed.get_mut(&(p.family, p.table.clone())) {
                    p.apply_to_table(t);
                    for name in p.sets.keys() {
                        if let Some(s) = t.sets.get_mut(name) {
                            crate::canonical_set(s);
                        }
                    }
                }
            }
            apply_shared(committed, &patch.elements);
        })
    }
}

/// Applies `delta` to the committed tables. The groups' copies of a set
/// share one element list (`compiler::nft::Shared`) and each group's
/// share of a delta makes the same change: the list is changed once, in
/// place, and stays shared — not copied once per group, which would cost
/// each group its own list of every set that ever changed.
fn apply_shared(committed: &mut crate::Tables, delta: &ElementDelta) {
    // A set's deltas (one per group's table that holds it): bucketed by
    // set, so finding a delta's sharers looks at its few groups only.
    let mut by_set: BTreeMap<(TableFamily, &str), Vec<&SetDelta>> = BTreeMap::new();
    for d in &delta.sets {
        by_set.entry((d.family, &d.set)).or_default().push(d);
    }
    for ((family, set), deltas) in by_set {
        let tables: BTreeSet<&str> = deltas.iter().map(|d| d.table.as_str()).collect();
        if tables.len() < deltas.len() {
            // Two changes to one table's set: in order, one by one.
            for d in deltas {
                if let Some(list) = elements_of(committed, family, &d.table, set) {
                    d.apply_to_list(list);
                }
            }
            continue;
        }
        // Each table's list, taken out; copies of one list that get the
        // same change become one entry (the others are dropped here), so
        // that the list is changed in place unless the compiler still
        // holds it too.
        let mut changes: Vec<(Elements, &SetDelta, Vec<&str>)> = Vec::new();
        for d in deltas {
            let Some(list) = elements_of(committed, family, &d.table, set) else {
                continue;
            };
            let list = std::mem::take(list);
            match changes
                .iter_mut()
                .find(|(l, c, _)| l.shares(&list) && c.same_change(d))
            {
                Some((_, _, tables)) => tables.push(&d.table),
                None => changes.push((list, d, vec![&d.table])),
            }
        }
        for (mut list, d, tables) in changes {
            d.apply_to_list(&mut list);
            for table in tables {
                if let Some(slot) = elements_of(committed, family, table, set) {
                    *slot = list.clone();
                }
            }
        }
    }
}

/// The committed element list of set `set` in table `table`, if it has it.
fn elements_of<'a>(
    committed: &'a mut crate::Tables,
    family: TableFamily,
    table: &str,
    set: &str,
) -> Option<&'a mut Elements> {
    committed
        .get_mut(&(family, table.to_owned()))
        .and_then(|t| t.sets.get_mut(set))
        .map(|s| &mut s.elements)
}

/// The most chains of one table's patch edited in place: each costs a dump
/// of its rules first (a round trip), so a patch rewriting many chains
/// (a namespace relabelled) flushes and refills the others.
const MAX_EDITED_CHAINS: usize = 16;

/// For the chains of `p` whose rules change but keep some at the start or
/// the end ([`RuleEdit`]), the kernel handles of their committed rules:
/// read back, and used only when the kernel holds exactly the committed
/// rules. Otherwise (someone else changed the chain, or the dump failed)
/// the chain is left out and flushed and refilled, which is always right.
fn rule_handles(sock: &mut netlink::Socket, committed: &Table, p: &TablePatch) -> RuleHandles {
    let mut handles = RuleHandles::new();
    let edited = p.chains.iter().filter_map(|(name, new)| {
        let (old, new) = (committed.chains.get(name)?, new.as_ref()?);
        let keeps = old.rules != new.rules && RuleEdit::of(&old.rules, &new.rules).keeps_any();
        keeps.then_some(old)
    });
    for old in edited.take(MAX_EDITED_CHAINS) {
        let kernel = match read_rules(sock, p.family, &p.table, Some(&old.name)) {
            Ok(k) => k,
            Err(e) => {
                debug!(chain = %old.name, "reading the chain's rule handles failed ({e}); refilling it");
                continue;
            }
        };
        let same = kernel.len() == old.rules.len()
            && kernel
                .iter()
                .zip(&old.rules)
                .all(|(k, r)| decode::ir_rule(p.family, k) == *r);
        if same {
            handles.insert(old.name.clone(), kernel.iter().map(|k| k.handle).collect());
        } else {
            debug!(chain = %old.name, "the kernel's rules differ from the committed ones; refilling the chain");
        }
    }
    handles
}

/// The delta's element messages, against the committed sets (each must
/// exist).
fn encode_element_delta(
    b: &mut Batch,
    committed: &Tables,
    delta: &ElementDelta,
) -> Result<(), Error> {
    for d in &delta.sets {
        let set = committed
            .get(&(d.family, d.table.clone()))
            .and_then(|t| t.sets.get(&d.set))
            .ok_or_else(|| Error::NotCommitted {
                object: format!("set {} {} {}", d.family.keyword(), d.table, d.set),
            })?;
        encode_set_delta(b, set, d).map_err(crate::plan::Error::from)?;
    }
    Ok(())
}

/// One set's delta as netlink messages, against the committed `set`.
fn encode_set_delta(b: &mut Batch, set: &Set, d: &SetDelta) -> Result<(), encode::Error> {
    let f = d.family;
    let with = |elements: &[SetElement]| Set {
        name: set.name.clone(),
        key: set.key,
        elements: elements.to_vec().into(),
        comment: None,
    };
    match set.key {
        key if !key.is_interval() => {
            let del = encode::plain_elems(f, set.key, &d.set, &d.remove)?;
            let add = encode::plain_elems(f, set.key, &d.set, &d.add)?;
            encode::elements(b, NFT_MSG_DELSETELEM, f, &d.table, &d.set, &del)?;
            encode::elements(b, NFT_MSG_NEWSETELEM, f, &d.table, &d.set, &add)?;
        }
        key => {
            let width = encode::interval_width(f, key);
            let removed = encode::intervals(f, &with(&d.remove))?;
            let added = encode::intervals(f, &with(&d.add))?;
            // nft's zero interval-end element: needed once the set's first
            // interval does not start at 0 (see plan::set_delta). The new
            // first element is the smallest of the added ones and the
            // first committed one not removed.
            let old_first = set.elements.first();
            let kept_first = set.elements.iter().find(|e| !d.remove.contains(e));
            let new_first = match (kept_first, d.add.iter().min()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let starts_above_zero = |e: Option<&SetElement>| -> Result<bool, encode::Error> {
                Ok(match e {
                    None => false,
                    Some(e) => encode::needs_zero_end(&encode::intervals(
                        f,
                        &with(std::slice::from_ref(e)),
                    )?),
                })
            };
            let zero = !added.is_empty()
                && starts_above_zero(new_first)?
                && !starts_above_zero(old_first)?;
            let del = encode::interval_elems(width, &removed, false);
            let add = encode::interval_elems(width, &added, zero);
            encode::elements(b, NFT_MSG_DELSETELEM, f, &d.table, &d.set, &del)?;
            encode::elements(b, NFT_MSG_NEWSETELEM, f, &d.table, &d.set, &add)?;
        }
    }
    Ok(())
}

/// The objects a table patch names, as committed (`before`) and as they
/// must be (`after`): two partial tables to diff.
fn patched_objects(committed: &Table, p: &TablePatch) -> (Table, Table) {
    let mut before = Table::new(committed.family, &committed.name);
    for name in p.chains.keys() {
        if let Some(c) = committed.chains.get(name) {
            before.chains.insert(name.clone(), c.clone());
        }
    }
    for name in p.sets.keys() {
        if let Some(s) = committed.sets.get(name) {
            before.sets.insert(name.clone(), s.clone());
        }
    }
    for name in p.maps.keys() {
        if let Some(m) = committed.maps.get(name) {
            before.maps.insert(name.clone(), m.clone());
        }
    }
    let mut after = before.clone();
    p.apply_to_table(&mut after);
    for s in after.sets.values_mut() {
        crate::canonical_set(s);
    }
    (before, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> SetElement {
        SetElement::Net(s.parse().unwrap())
    }

    /// Three groups' tables whose set `s` shares `list`.
    fn grouped(list: &Elements) -> crate::Tables {
        (0..3)
            .map(|g| {
                let name = compiler::groups::table_name(g);
                let mut t = Table::new(TableFamily::Ip, &name);
                t.sets.insert(
                    "s".into(),
                    Set {
                        name: "s".into(),
                        key: compiler::nft::SetKey::Addr,
                        elements: list.clone(),
                        comment: None,
                    },
                );
                ((TableFamily::Ip, name), t)
            })
            .collect()
    }

    fn delta(g: usize, add: &[SetElement], remove: &[SetElement]) -> SetDelta {
        SetDelta {
            family: TableFamily::Ip,
            table: compiler::groups::table_name(g),
            set: "s".into(),
            add: add.to_vec(),
            remove: remove.to_vec(),
        }
    }

    fn list(tables: &crate::Tables, g: usize) -> &Elements {
        &tables[&(TableFamily::Ip, compiler::groups::table_name(g))].sets["s"].elements
    }

    #[test]
    fn one_change_to_every_group_keeps_one_list() {
        let caller: Elements = vec![net("198.18.0.1/32")].into();
        let mut tables = grouped(&caller);
        let x = net("198.18.0.2/32");
        let all = ElementDelta {
            sets: (0..3)
                .map(|g| delta(g, std::slice::from_ref(&x), &[]))
                .collect(),
        };
        apply_shared(&mut tables, &all);
        assert_eq!(
            caller,
            vec![net("198.18.0.1/32")],
            "the caller's list changed"
        );
        assert_eq!(*list(&tables, 0), vec![net("198.18.0.1/32"), x]);
        assert!(
            list(&tables, 0).shares(list(&tables, 1)) && list(&tables, 0).shares(list(&tables, 2))
        );
    }

    #[test]
    fn changes_that_differ_or_repeat_a_table_apply_one_by_one() {
        let mut tables = grouped(&vec![net("198.18.0.1/32")].into());
        let (x, y) = (net("198.18.0.2/32"), net("198.18.0.3/32"));
        // Group 0 gets x then loses it again; group 1 gets y; group 2 nothing.
        let d = ElementDelta {
            sets: vec![
                delta(0, std::slice::from_ref(&x), &[]),
                delta(1, std::slice::from_ref(&y), &[]),
                delta(0, &[], std::slice::from_ref(&x)),
            ],
        };
        apply_shared(&mut tables, &d);
        assert_eq!(*list(&tables, 0), vec![net("198.18.0.1/32")]);
        assert_eq!(*list(&tables, 1), vec![net("198.18.0.1/32"), y.clone()]);
        assert_eq!(*list(&tables, 2), vec![net("198.18.0.1/32")]);
        // Without a repeat: groups 0 and 2 share the same change, 1 its own.
        let mut tables = grouped(&vec![net("198.18.0.1/32")].into());
        let d = ElementDelta {
            sets: vec![
                delta(0, std::slice::from_ref(&x), &[]),
                delta(1, std::slice::from_ref(&y), &[]),
                delta(2, std::slice::from_ref(&x), &[]),
            ],
        };
        apply_shared(&mut tables, &d);
        assert_eq!(*list(&tables, 1), vec![net("198.18.0.1/32"), y]);
        assert_eq!(*list(&tables, 2), vec![net("198.18.0.1/32"), x]);
        assert!(list(&tables, 0).shares(list(&tables, 2)));
        assert!(!list(&tables, 0).shares(list(&tables, 1)));
    }
}
