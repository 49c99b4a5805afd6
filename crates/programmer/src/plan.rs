//! Desired ruleset × last committed state → one ordered transaction.
//!
//! The batch only carries the difference, ordered so every reference is
//! valid at the point the kernel processes it:
//!
//! 1. `NEWTABLE` (new table) — a new table is then filled in nft's order:
//!    chains, sets + elements, maps + elements, rules; only its sets go
//!    most used first (`by_references`: the kernel finds a rule's set by
//!    walking its list of sets), numbered as nft would in name order.
//! 2. `NEWCHAIN` for new chains, and base-chain policy updates.
//! 3. `NEWSET` + `NEWSETELEM` for new sets, then new maps (their elements
//!    may `goto` chains from step 2).
//! 4. Element deltas of kept sets and maps: `DELSETELEM`, then `NEWSETELEM`
//!    (a changed map element is deleted and re-added).
//! 5. `DELRULE` (flush) of chains whose rules change, of removed chains, of
//!    re-created chains, and of chains whose rules use a re-created set —
//!    except a changed chain whose committed rules' kernel handles the
//!    caller read ([`RuleHandles`]): only the rules between its kept
//!    first and last rules are deleted, by handle.
//! 6. `DELSET` of removed and re-created sets/maps (their rules are gone).
//! 7. `DELCHAIN` of removed and re-created chains (no rule or map element
//!    refers to them any more).
//! 8. `NEWCHAIN`/`NEWSET` + elements for re-created objects (a base chain
//!    whose hook or priority changed; a set whose type or comment changed —
//!    the kernel cannot update those in place).
//! 9. `NEWRULE` for new, rewritten and re-created chains; in an edited
//!    chain, only the new rules between the kept ones, placed before the
//!    first kept rule after them (or at the end).
//!
//! A table that disappears from the desired ruleset is destroyed whole.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use compiler::nft::{
    is_our_table, referenced_sets, Chain, Ruleset, Set, Table, TableFamily, VerdictMap, TABLE_NAME,
};

use crate::batch::Batch;
use crate::consts::{NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM};
use crate::encode::{self, RawElem};
use crate::{TableKey, Tables};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the desired ruleset has a table {family} {name}; nftpolicy only programs tables named {TABLE_NAME} or {TABLE_NAME}-g<N>")]
    ForeignTable { family: &'static str, name: String },
    #[error("the desired ruleset has two tables {family} {name}")]
    DuplicateTable { family: &'static str, name: String },
    #[error(transparent)]
    Encode(#[from] encode::Error),
}

/// What one apply would send: the encoded batch and, per message, its kind
/// and object. Returned by `NftProgrammer::plan` for inspection.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub(crate) batch: Batch,
}

impl Transaction {
    /// True when the desired ruleset equals the last committed one.
    pub fn is_empty(&self) -> bool {
        self.batch.message_count() == 0
    }

    /// nf_tables messages (without the batch framing).
    pub fn messages(&self) -> usize {
        self.batch.message_count()
    }

    /// Bytes of the whole batch as sent.
    pub fn bytes(&self) -> usize {
        self.batch.w.len()
    }

    /// Message count per kind, e.g. `"NEWSETELEM" → 3`.
    pub fn kinds(&self) -> BTreeMap<&'static str, usize> {
        self.batch.kinds()
    }

    /// Every nf_tables message as encoded: netlink message type and the
    /// payload after the `nlmsghdr` (nfgenmsg + attributes). For tests
    /// comparing our encoding with nft's.
    pub fn encoded(&self) -> Vec<(u16, &[u8])> {
        (0..self.batch.msgs.len())
            .filter(|&i| !self.batch.msgs[i].is_framing())
            .map(|i| {
                let m = self.batch.message_bytes(i);
                (
                    u16::from_ne_bytes([m[4], m[5]]),
                    &m[crate::nla::NLMSG_HDRLEN..],
                )
            })
            .collect()
    }

    /// Every message in order as `(kind, object)`, e.g.
    /// `("DELRULE", "chain ip nftpolicy cali-fw-x")`.
    pub fn steps(&self) -> Vec<(&'static str, String)> {
        (0..self.batch.msgs.len())
            .filter(|&i| !self.batch.msgs[i].is_framing())
            .map(|i| (self.batch.msgs[i].kind, self.batch.subject(i).to_string()))
            .collect()
    }
}

/// Builds the transaction turning `last` (our tables as last committed)
/// into `desired`. Tables are independent of each other (no rule or
/// element refers to another table), so each one's messages follow the
/// order above on their own; tables of ours that `desired` lacks are
/// destroyed first.
pub fn plan(last: &Tables, desired: &Ruleset) -> Result<Transaction, Error> {
    let mut want: BTreeMap<TableKey, &Table> = BTreeMap::new();
    for t in &desired.tables {
        if !is_our_table(&t.name) {
            return Err(Error::ForeignTable {
                family: t.family.keyword(),
                name: t.name.clone(),
            });
        }
        if want.insert(crate::key_of(t), t).is_some() {
            return Err(Error::DuplicateTable {
                family: t.family.keyword(),
                name: t.name.clone(),
            });
        }
    }
    let mut b = Batch::new();
    for (family, name) in last.keys().filter(|k| !want.contains_key(*k)) {
        encode::destroy_table(&mut b, *family, name);
    }
    for (key, n) in &want {
        match last.get(key) {
            None => create_table(&mut b, n)?,
            Some(o) => diff_table(&mut b, o, n, &RuleHandles::new())?,
        }
    }
    b.finish();
    Ok(Transaction { batch: b })
}

fn create_table(b: &mut Batch, t: &Table) -> Result<(), Error> {
    let f = t.family;
    encode::new_table(b, f, &t.name);
    for c in t.chains.values() {
        encode::new_chain(b, f, &t.name, c)?;
    }
    b.reserve_set_ids(f, &t.name, t.sets.keys().map(String::as_str));
    for s in by_references(t) {
        create_set(b, f, &t.name, s)?;
    }
    for m in t.maps.values() {
        create_map(b, f, &t.name, m)?;
    }
    for c in t.chains.values() {
        add_rules(b, f, &t.name, c)?;
    }
    Ok(())
}

/// `t`'s sets, the ones most rules use first (ties by name).
///
/// The kernel finds the set of a rule's lookup (and of an element message)
/// by walking the table's list of sets, in creation order, comparing
/// names; `NFTA_LOOKUP_SET_ID` is only tried after the name fails, and the
/// name is mandatory. With ~1,400 sets per table that walk was about 40 %
/// of a rule's kernel cost at cold start. Creating the most used sets
/// first shortens the average walk (at 3,000 policies about 3.5× fewer
/// list nodes visited: two sets are used by ~800 rules each, most by 1–5).
fn by_references(t: &Table) -> Vec<&Set> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for c in t.chains.values() {
        for s in referenced_sets(c) {
            *uses.entry(s).or_default() += 1;
        }
    }
    let mut sets: Vec<&Set> = t.sets.values().collect();
    // Stable: equal counts keep the map's name order.
    sets.sort_by_key(|s| std::cmp::Reverse(uses.get(s.name.as_str()).copied().unwrap_or(0)));
    sets
}

fn create_set(b: &mut Batch, f: TableFamily, table: &str, s: &Set) -> Result<(), Error> {
    encode::new_set(b, f, table, s)?;
    let elems = all_set_elems(f, s)?;
    encode::elements(b, NFT_MSG_NEWSETELEM, f, table, &s.name, &elems)?;
    Ok(())
}

fn create_map(b: &mut Batch, f: TableFamily, table: &str, m: &VerdictMap) -> Result<(), Error> {
    encode::new_map(b, f, table, m)?;
    let elems = m
        .elements
        .iter()
        .map(|(k, v)| encode::map_elem(f, m, k, v))
        .collect::<Result<Vec<_>, _>>()?;
    encode::elements(b, NFT_MSG_NEWSETELEM, f, table, &m.name, &elems)?;
    Ok(())
}

fn all_set_elems(f: TableFamily, s: &Set) -> Result<Vec<RawElem>, Error> {
    Ok(match s.key {
        key if !key.is_interval() => encode::plain_elems(f, s.key, &s.name, &s.elements)?,
        key => {
            let ivs = encode::intervals(f, s)?;
            encode::interval_elems(
                encode::interval_width(f, key),
                &ivs,
                encode::needs_zero_end(&ivs),
            )
        }
    })
}

fn add_rules(b: &mut Batch, f: TableFamily, table: &str, c: &Chain) -> Result<(), Error> {
    for (i, r) in c.rules.iter().enumerate() {
        encode::new_rule(b, f, table, &c.name, i, r, encode::Place::End, false)?;
    }
    Ok(())
}

/// A set or a map: they share one namespace in the kernel.
#[derive(Clone, Copy)]
enum SetLike<'a> {
    Set(&'a Set),
    Map(&'a VerdictMap),
}

impl SetLike<'_> {
    /// Same kernel definition (so only elements may differ)?
    fn same_definition(&self, other: &SetLike<'_>) -> bool {
        match (self, other) {
            (SetLike::Set(a), SetLike::Set(b)) => a.key == b.key && a.comment == b.comment,
            (SetLike::Map(a), SetLike::Map(b)) => a.key == b.key && a.comment == b.comment,
            _ => false,
        }
    }
}

fn set_likes(t: &Table) -> BTreeMap<&str, SetLike<'_>> {
    let mut m: BTreeMap<&str, SetLike<'_>> = t
        .sets
        .iter()
        .map(|(k, s)| (k.as_str(), SetLike::Set(s)))
        .collect();
    for (k, v) in &t.maps {
        m.insert(k.as_str(), SetLike::Map(v));
    }
    m
}

/// Per chain, the kernel handles of its committed rules, in order (read
/// back and checked against the committed rules by the caller): a chain
/// listed here whose rules change is edited rather than flushed and
/// refilled, so its kept rules keep their counters and the kernel parses
/// only the new ones.
pub(crate) type RuleHandles = HashMap<String, Vec<u64>>;

/// How a chain's rules change when only a run in the middle differs: the
/// committed and desired lists share `prefix` rules at the start and
/// `suffix` at the end (`prefix + suffix` ≤ both lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RuleEdit {
    pub prefix: usize,
    pub suffix: usize,
}

impl RuleEdit {
    pub fn of(old: &[compiler::nft::Rule], new: &[compiler::nft::Rule]) -> RuleEdit {
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let room = old.len().min(new.len()) - prefix;
        let suffix = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take(room)
            .take_while(|(a, b)| a == b)
            .count();
        RuleEdit { prefix, suffix }
    }

    /// Whether editing keeps any rule (else a flush and refill is as
    /// cheap, in one message fewer).
    pub fn keeps_any(&self) -> bool {
        self.prefix + self.suffix > 0
    }
}

pub(crate) fn diff_table(
    b: &mut Batch,
    o: &Table,
    n: &Table,
    handles: &RuleHandles,
) -> Result<(), Error> {
    let f = n.family;
    let table = n.name.as_str();

    // Chains.
    let mut new_chains: Vec<&Chain> = Vec::new();
    let mut policy_updates: Vec<&Chain> = Vec::new();
    let mut recreate_chains: Vec<&Chain> = Vec::new();
    let mut rewrite: BTreeSet<&str> = BTreeSet::new();
    for (name, nc) in &n.chains {
        match o.chains.get(name) {
            None => new_chains.push(nc),
            Some(oc) => {
                if oc.base != nc.base {
                    match (oc.base, nc.base) {
                        (Some(a), Some(z)) if a.hook == z.hook && a.priority == z.priority => {
                            policy_updates.push(nc)
                        }
                        _ => recreate_chains.push(nc),
                    }
                }
                if oc.rules != nc.rules {
                    rewrite.insert(name.as_str());
                }
            }
        }
    }
    let removed_chains: Vec<&Chain> = o
        .chains
        .values()
        .filter(|c| !n.chains.contains_key(&c.name))
        .collect();
    let recreated_chain_names: HashSet<&str> =
        recreate_chains.iter().map(|c| c.name.as_str()).collect();

    // Sets and maps.
    let old_sets = set_likes(o);
    let new_sets = set_likes(n);
    let mut created: Vec<SetLike<'_>> = Vec::new();
    let mut recreated: Vec<SetLike<'_>> = Vec::new();
    let mut deltas: Vec<(SetLike<'_>, SetLike<'_>)> = Vec::new();
    for (name, ns) in &new_sets {
        match old_sets.get(name) {
            None => created.push(*ns),
            Some(os) if os.same_definition(ns) => deltas.push((*os, *ns)),
            Some(_) => recreated.push(*ns),
        }
    }
    let removed_sets: Vec<&str> = old_sets
        .keys()
        .filter(|k| !new_sets.contains_key(*k))
        .copied()
        .collect();
    let recreated_names: HashSet<&str> = recreated
        .iter()
        .map(|s| match s {
            SetLike::Set(s) => s.name.as_str(),
            SetLike::Map(m) => m.name.as_str(),
        })
        .collect();
    if !recreated_names.is_empty() {
        // A set cannot be deleted while a rule uses it: flush and refill
        // every kept chain that uses one that is re-created.
        for (name, oc) in &o.chains {
            if n.chains.contains_key(name)
                && referenced_sets(oc).any(|s| recreated_names.contains(s))
            {
                rewrite.insert(name.as_str());
            }
        }
    }

    // 2. New chains, policy updates.
    for c in new_chains.iter().chain(policy_updates.iter()) {
        encode::new_chain(b, f, table, c)?;
    }
    // 3. New sets, then new maps.
    for s in created.iter().filter(|s| matches!(s, SetLike::Set(_))) {
        if let SetLike::Set(s) = s {
            create_set(b, f, table, s)?;
        }
    }
    for m in created.iter() {
        if let SetLike::Map(m) = m {
            create_map(b, f, table, m)?;
        }
    }
    // 4. Element deltas.
    for (os, ns) in &deltas {
        match (os, ns) {
            (SetLike::Set(os), SetLike::Set(ns)) => set_delta(b, f, table, os, ns)?,
            (SetLike::Map(om), SetLike::Map(nm)) => map_delta(b, f, table, om, nm)?,
            _ => unreachable!("same_definition implies same kind"),
        }
    }
    // Chains edited in place: their handles are known, and none of their
    // committed rules uses a re-created set (those must go).
    let mut edits: HashMap<&str, (RuleEdit, &[u64])> = HashMap::new();
    for name in &rewrite {
        let (Some(oc), Some(nc), Some(h)) =
            (o.chains.get(*name), n.chains.get(*name), handles.get(*name))
        else {
            continue;
        };
        if recreated_chain_names.contains(name)
            || h.len() != oc.rules.len()
            || referenced_sets(oc).any(|s| recreated_names.contains(s))
        {
            continue;
        }
        let edit = RuleEdit::of(&oc.rules, &nc.rules);
        if edit.keeps_any() {
            edits.insert(name, (edit, h.as_slice()));
        }
    }

    // 5. Flush (or delete an edited chain's changed run by handle).
    for name in &rewrite {
        if recreated_chain_names.contains(name) {
            continue;
        }
        if let Some((edit, h)) = edits.get(name) {
            for &handle in &h[edit.prefix..h.len() - edit.suffix] {
                encode::del_rule(b, f, table, name, handle);
            }
            continue;
        }
        if o.chains.get(*name).is_some_and(|c| !c.rules.is_empty()) {
            encode::flush_chain(b, f, table, name);
        }
    }
    for c in removed_chains.iter() {
        if !c.rules.is_empty() {
            encode::flush_chain(b, f, table, &c.name);
        }
    }
    for c in &recreate_chains {
        if o.chains.get(&c.name).is_some_and(|c| !c.rules.is_empty()) {
            encode::flush_chain(b, f, table, &c.name);
        }
    }
    // 6. Delete sets.
    for s in &recreated {
        let name = match s {
            SetLike::Set(s) => s.name.as_str(),
            SetLike::Map(m) => m.name.as_str(),
        };
        encode::del_set(b, f, table, name);
    }
    for name in &removed_sets {
        encode::del_set(b, f, table, name);
    }
    // 7. Delete chains.
    for c in removed_chains.iter().chain(recreate_chains.iter()) {
        encode::del_chain(b, f, table, &c.name);
    }
    // 8. Re-create.
    for c in &recreate_chains {
        encode::new_chain(b, f, table, c)?;
    }
    for s in &recreated {
        if let SetLike::Set(s) = s {
            create_set(b, f, table, s)?;
        }
    }
    for m in &recreated {
        if let SetLike::Map(m) = m {
            create_map(b, f, table, m)?;
        }
    }
    // 9. Rules, in the desired table's chain order.
    for (name, c) in &n.chains {
        if let Some((edit, h)) = edits.get(name.as_str()) {
            // Before the first kept rule after the run; the deleted run
            // sits there until the commit, and goes then.
            let place = match edit.suffix {
                0 => encode::Place::End,
                k => encode::Place::Before(h[h.len() - k]),
            };
            let run = edit.prefix..c.rules.len() - edit.suffix;
            for (i, r) in c.rules[run.clone()].iter().enumerate() {
                encode::new_rule(b, f, table, name, run.start + i, r, place, false)?;
            }
            continue;
        }
        let refill = !o.chains.contains_key(name)
            || rewrite.contains(name.as_str())
            || recreated_chain_names.contains(name.as_str());
        if refill {
            add_rules(b, f, table, c)?;
        }
    }
    Ok(())
}

fn set_delta(b: &mut Batch, f: TableFamily, table: &str, os: &Set, ns: &Set) -> Result<(), Error> {
    if os.elements == ns.elements {
        return Ok(());
    }
    match ns.key {
        key if !key.is_interval() => {
            let old: HashSet<_> = os.elements.iter().collect();
            let new: HashSet<_> = ns.elements.iter().collect();
            let del = encode::plain_elems(
                f,
                ns.key,
                &ns.name,
                os.elements.iter().filter(|e| !new.contains(e)),
            )?;
            let add = encode::plain_elems(
                f,
                ns.key,
                &ns.name,
                ns.elements.iter().filter(|e| !old.contains(e)),
            )?;
            encode::elements(b, NFT_MSG_DELSETELEM, f, table, &ns.name, &del)?;
            encode::elements(b, NFT_MSG_NEWSETELEM, f, table, &ns.name, &add)?;
        }
        key => {
            let width = encode::interval_width(f, key);
            let oi = encode::intervals(f, os)?;
            let ni = encode::intervals(f, ns)?;
            let old: HashSet<_> = oi.iter().collect();
            let new: HashSet<_> = ni.iter().collect();
            let removed: Vec<_> = oi.iter().filter(|i| !new.contains(i)).copied().collect();
            let added: Vec<_> = ni.iter().filter(|i| !old.contains(i)).copied().collect();
            // Whole intervals go and come (start and end element together):
            // the kernel never merges or splits them, and deleting all the
            // old ones before adding the new ones means no transient
            // overlap. nft's zero element is added like nft does (adding
            // an existing one is a no-op) and never deleted: we cannot see
            // whether it is there, and it is harmless.
            let zero =
                !added.is_empty() && encode::needs_zero_end(&ni) && !encode::needs_zero_end(&oi);
            let del = encode::interval_elems(width, &removed, false);
            let add = encode::interval_elems(width, &added, zero);
            encode::elements(b, NFT_MSG_DELSETELEM, f, table, &ns.name, &del)?;
            encode::elements(b, NFT_MSG_NEWSETELEM, f, table, &ns.name, &add)?;
        }
    }
    Ok(())
}

fn map_delta(
    b: &mut Batch,
    f: TableFamily,
    table: &str,
    om: &VerdictMap,
    nm: &VerdictMap,
) -> Result<(), Error> {
    if om.elements == nm.elements {
        return Ok(());
    }
    let mut del = Vec::new();
    let mut add = Vec::new();
    for (k, v) in &om.elements {
        if nm.elements.get(k) != Some(v) {
            del.push(encode::map_elem(f, om, k, v)?);
        }
    }
    for (k, v) in &nm.elements {
        if om.elements.get(k) != Some(v) {
            add.push(encode::map_elem(f, nm, k, v)?);
        }
    }
    encode::elements(b, NFT_MSG_DELSETELEM, f, table, &nm.name, &del)?;
    encode::elements(b, NFT_MSG_NEWSETELEM, f, table, &nm.name, &add)?;
    Ok(())
}
