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

use std::time::Instant;

use compiler::nft::{
    ElementDelta, RulesetPatch, Set, SetDelta, SetElement, SetKey, Table, TablePatch,
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
    let mut done = vec![false; delta.sets.len()];
    for i in 0..delta.sets.len() {
        if done[i] {
            continue;
        }
        let d = &delta.sets[i];
        let list = |committed: &crate::Tables, table: &str| {
            committed
                .get(&(d.family, table.to_owned()))
                .and_then(|t| t.sets.get(&d.set))
                .map(|s| s.elements.clone())
        };
        let Some(first) = list(committed, &d.table) else {
            continue;
        };
        // The tables whose copy is this list and which get this change.
        let mut sharers = vec![d.table.clone()];
        for (j, other) in delta.sets.iter().enumerate().skip(i + 1) {
            if !done[j]
                && other.same_change(d)
                && list(committed, &other.table).is_some_and(|l| l.shares(&first))
            {
                done[j] = true;
                sharers.push(other.table.clone());
            }
        }
        // Take the list out of every sharer, so that (unless the compiler
        // still holds it too) it is changed in place.
        for table in &sharers {
            if let Some(s) = committed
                .get_mut(&(d.family, table.clone()))
                .and_then(|t| t.sets.get_mut(&d.set))
            {
                s.elements = Default::default();
            }
        }
        let mut changed = first;
        d.apply_to_list(&mut changed);
        for table in &sharers {
            if let Some(s) = committed
                .get_mut(&(d.family, table.clone()))
                .and_then(|t| t.sets.get_mut(&d.set))
            {
                s.elements = changed.clone();
            }
        }
    }
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
        SetKey::NamedPort | SetKey::Host => {
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
