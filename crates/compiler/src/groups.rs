//! Namespace groups: the node's tables cut into one table per group of
//! local endpoints, each holding what its endpoints reach.
//!
//! The kernel validates a whole table at every commit that adds a rule, so
//! a policy add costs in proportion to the table it lands in (README,
//! Performance). Cut by groups of local endpoints (their namespaces dealt
//! into groups), a namespaced policy lands in the one table of its
//! namespace's group. A group's table holds the base and dispatch chains,
//! the dispatch maps, and every chain and set its own interfaces reach; a
//! chain or set reached from two groups is in both. In a group's dispatch
//! maps the other groups' interfaces map to `return`: their packets pass
//! on to the next table, whose group judges them, while an interface in
//! no group still falls through to the "Unknown interface" drop. (On the
//! input hook `cali-wl-to-host` then applies its configured default
//! action to another group's packet without its egress policy; whatever
//! that action, the packet's own group ends the same way: Drop drops it
//! there too, after the policy or instead of it, and Accept or Return let
//! it go on.) An element that returns does not make the kernel validate
//! the table, as one that jumps does. Only maps keyed by interface are
//! cut so; a map keyed by address goes whole to every group (the
//! compiler writes none: the two-stage lookup `bench::two_stage`
//! measures has one).
//!
//! [`Split`] keeps, per family and group, how many references inside the
//! group each chain and set has (felix's calculation graph in miniature),
//! so that a patch from the incremental compiler becomes per-group patches
//! touching only the groups it reaches; [`Split::full`] is the same code
//! applied to empty groups.
//!
//! The agent cuts its tables with `--table-groups N` or `auto` (the
//! default: [`TableGroups`], one table until the ruleset is large; the
//! nftables backend, `dataplane::NftDataplane`), grouping interfaces by their
//! endpoint's namespace ([`by_namespace`]); each group's tables are named
//! [`table_name`]. `bench --example split_projection` and
//! `split_packet_cost` measure the cut (README, Performance).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::logical::LogicalRuleset;
use crate::nft::{
    referenced_sets, ElementDelta, MapKey, Ruleset, RulesetPatch, SetDelta, Table, TableFamily,
    TablePatch, Verdict, VerdictMap,
};

/// How many namespace groups to cut the tables into (`--table-groups`):
/// a fixed count, or [`Auto`](TableGroups::Auto), chosen from the size
/// of the ruleset ([`auto_groups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableGroups {
    /// One table while the ruleset is small, groups once it is large.
    Auto,
    /// Exactly this many (1: the single table `nftpolicy`).
    Fixed(usize),
}

/// The most groups `--table-groups` takes.
pub const MAX_TABLE_GROUPS: usize = 64;

/// [`TableGroups::Auto`] keeps one table while every family's table holds
/// fewer rules than this.
pub const AUTO_MIN_RULES: usize = 10_000;
/// … and above it cuts one group per this many rules of the larger table …
pub const AUTO_RULES_PER_GROUP: usize = 2_500;
/// … up to this many groups.
pub const AUTO_MAX_GROUPS: usize = 8;

/// [`TableGroups::Auto`] keeps the count the kernel's tables already have
/// while it is what a ruleset this much smaller or larger would get
/// (percent).
pub const AUTO_KEEP_PERCENT: usize = 10;

impl TableGroups {
    /// The count for `ruleset` (the compiler's whole, uncut ruleset).
    pub fn resolve(self, ruleset: &Ruleset) -> usize {
        self.resolve_keeping(ruleset, None)
    }

    /// [`resolve`](Self::resolve) for an agent that found our tables cut
    /// into `running` groups (from its last run): `auto` keeps that count
    /// while the ruleset is within [`AUTO_KEEP_PERCENT`] of a size that
    /// gets it ([`auto_groups_keeping`]).
    pub fn resolve_keeping(self, ruleset: &Ruleset, running: Option<usize>) -> usize {
        match self {
            TableGroups::Fixed(n) => n.max(1),
            TableGroups::Auto => auto_groups_keeping(largest_table_rules(ruleset), running),
        }
    }
}

/// [`auto_groups`], except that a `running` count is kept while `rules`
/// is within [`AUTO_KEEP_PERCENT`] of a size that gets it: a node near a
/// threshold does not replace all its tables (and restart their counters)
/// at every restart because its ruleset grew or shrank a little.
pub fn auto_groups_keeping(rules: usize, running: Option<usize>) -> usize {
    let fresh = auto_groups(rules);
    let Some(k) = running else {
        return fresh;
    };
    let low = auto_groups(rules * (100 - AUTO_KEEP_PERCENT) / 100);
    let high = auto_groups(rules * (100 + AUTO_KEEP_PERCENT) / 100);
    if (low..=high).contains(&k) {
        k
    } else {
        fresh
    }
}

/// How many groups a family's tables of ours (`names`, as the kernel
/// lists them) are cut into: 1 for [`crate::nft::TABLE_NAME`] alone, N
/// for `nftpolicy-g0` … `nftpolicy-g<N-1>`; `None` for none, or for a mix
/// (a run interrupted between counts; replaced whole anyway).
pub fn running_groups(names: &[String]) -> Option<usize> {
    if names.len() == 1 && names[0] == crate::nft::TABLE_NAME {
        return Some(1);
    }
    let n = names.len();
    let mut seen = vec![false; n];
    for name in names {
        let g: usize = name
            .strip_prefix(crate::nft::TABLE_NAME)?
            .strip_prefix("-g")?
            .parse()
            .ok()?;
        if g >= n || std::mem::replace(&mut seen[g], true) {
            return None;
        }
    }
    (n > 0).then_some(n)
}

impl std::fmt::Display for TableGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableGroups::Auto => f.write_str("auto"),
            TableGroups::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for TableGroups {
    type Err = String;

    fn from_str(s: &str) -> Result<TableGroups, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(TableGroups::Auto);
        }
        match s.parse::<usize>() {
            Ok(n @ 1..=MAX_TABLE_GROUPS) => Ok(TableGroups::Fixed(n)),
            _ => Err(format!(
                "{s:?} is neither `auto` nor a count from 1 to {MAX_TABLE_GROUPS}"
            )),
        }
    }
}

/// The rules of `ruleset`'s largest table (its families' tables hold
/// about the same).
pub fn largest_table_rules(ruleset: &Ruleset) -> usize {
    ruleset
        .tables
        .iter()
        .map(|t| t.chains.values().map(|c| c.rules.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// [`TableGroups::Auto`]'s count for a table of `rules` rules: 1 below
/// [`AUTO_MIN_RULES`], else one group per [`AUTO_RULES_PER_GROUP`] rules,
/// at most [`AUTO_MAX_GROUPS`].
///
/// Why these numbers (README, Table groups): the kernel validates the
/// whole table at every commit that adds a rule, so a policy add costs in
/// proportion to its table; each group costs every new connection about
/// 0.8 µs (one more forward chain walked) and a pod change a little more
/// (its sets are in several groups' tables). At the benchmark's 10,000
/// policies (16,100 rules in the IPv4 table) six groups bring a policy add
/// from 8–9 ms to about 3 ms, under 10× a pod relabel; at 3,000 policies
/// (7,960 rules) six groups gain only a quarter, and at 1,000 nothing a
/// user would notice, so smaller tables stay whole.
pub fn auto_groups(rules: usize) -> usize {
    if rules < AUTO_MIN_RULES {
        1
    } else {
        (rules / AUTO_RULES_PER_GROUP).clamp(2, AUTO_MAX_GROUPS)
    }
}

/// The name of group `g`'s table in each family: `nftpolicy-g<g>`.
pub fn table_name(g: usize) -> String {
    format!("{}-g{g}", crate::nft::TABLE_NAME)
}

/// A namespace's group among `groups`: FNV-1a of its name, so that it is
/// the same on every run and every build (a restarted agent adopts its
/// tables and finds each interface where it left it).
pub fn group_of_namespace(namespace: &str, groups: usize) -> usize {
    let hash = namespace.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % groups.max(1) as u64) as usize
}

/// The group of each local interface of `logical`: its endpoint's
/// namespace's ([`group_of_namespace`]); group 0 for an interface with no
/// namespaced endpoint.
pub fn by_namespace(logical: &LogicalRuleset, groups: usize) -> impl Fn(&str) -> usize + '_ {
    move |iface| {
        logical
            .endpoints
            .get(iface)
            .and_then(|e| e.key.namespace.as_deref())
            .map_or(0, |ns| group_of_namespace(ns, groups))
    }
}

/// `ruleset` (lowered from `logical`) cut whole into `groups` groups by
/// namespace ([`by_namespace`]): the [`Split`] that patches it from here
/// on, and every group's tables as one ruleset.
pub fn cut_by_namespace(
    logical: &LogicalRuleset,
    ruleset: &Ruleset,
    groups: usize,
) -> (Split, Ruleset) {
    let mut split = Split::new(groups);
    let cut = merge(split.full(ruleset, &by_namespace(logical, groups)));
    (split, cut)
}

/// Per-group rulesets (as [`Split::full`] gives them, each table named
/// by its group) as one ruleset.
pub fn merge(groups: Vec<Ruleset>) -> Ruleset {
    Ruleset {
        tables: groups.into_iter().flat_map(|r| r.tables).collect(),
    }
}

/// Per-group patches (as [`Split::patch`] gives them) as one patch, for
/// one transaction.
pub fn merge_patches(groups: Vec<RulesetPatch>) -> RulesetPatch {
    let mut out = RulesetPatch::default();
    for p in groups {
        out.tables
            .extend(p.tables.into_iter().filter(|t| !t.is_empty()));
        out.elements.sets.extend(p.elements.sets);
    }
    out
}

/// Per-group element changes (as [`Split::elements`] gives them) as one
/// delta.
pub fn merge_elements(groups: Vec<ElementDelta>) -> ElementDelta {
    ElementDelta {
        sets: groups.into_iter().flat_map(|d| d.sets).collect(),
    }
}

/// `d` for group `g`'s table.
fn in_group(d: &SetDelta, g: usize) -> SetDelta {
    SetDelta {
        table: table_name(g),
        ..d.clone()
    }
}

/// The groups' reach, kept across patches.
#[derive(Debug, Clone)]
pub struct Split {
    groups: usize,
    /// Each local interface's group, chosen when it first appears in a
    /// dispatch map and kept while it is in one.
    iface_group: HashMap<String, usize>,
    reach: BTreeMap<TableFamily, Vec<Reach>>,
}

/// One group's part of one table.
#[derive(Debug, Clone, Default)]
struct Reach {
    /// Chain → references from inside the group (a base chain counts one
    /// for itself).
    chains: HashMap<String, usize>,
    /// The edges counted for each chain in `chains`.
    edges: HashMap<String, Edges>,
    /// Set → references from the group's chains.
    sets: HashMap<String, usize>,
    /// Each dispatch map as this group has it (other groups' interfaces
    /// `return`).
    maps: BTreeMap<String, VerdictMap>,
}

/// What a chain references: chains it jumps or goes to, sets it looks up
/// (a verdict map it looks up is not here: every group has every map).
#[derive(Debug, Clone, Default, PartialEq)]
struct Edges {
    chains: Vec<String>,
    sets: Vec<String>,
}

/// Names touched by one patch, each with whether it was there before, and
/// the maps whose share changed.
#[derive(Default)]
struct Touched {
    chains: HashMap<String, bool>,
    sets: HashMap<String, bool>,
    maps: BTreeSet<String>,
}

fn touched(groups: usize) -> Vec<Touched> {
    (0..groups).map(|_| Touched::default()).collect()
}

fn edges_of(t: &Table, chain: &str) -> Edges {
    let mut e = Edges::default();
    let Some(c) = t.chains.get(chain) else {
        return e;
    };
    for r in &c.rules {
        if let Some(Verdict::Jump(to) | Verdict::Goto(to)) = &r.verdict {
            e.chains.push(to.clone());
        }
    }
    e.sets = referenced_sets(c)
        .filter(|s| !t.maps.contains_key(*s))
        .map(str::to_owned)
        .collect();
    e
}

fn targets(m: &VerdictMap) -> Vec<String> {
    m.elements
        .values()
        .filter_map(|v| match v {
            Verdict::Jump(to) | Verdict::Goto(to) => Some(to.clone()),
            _ => None,
        })
        .collect()
}

/// `new` minus `old` as multisets, in `new`'s order.
fn minus(new: &[String], old: &[String]) -> Vec<String> {
    let mut old: HashMap<&str, usize> = old.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.as_str()).or_default() += 1;
        m
    });
    new.iter()
        .filter(|s| match old.get_mut(s.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

impl Reach {
    fn enter_chain(&mut self, t: &Table, name: &str, touched: &mut Touched) {
        let before = self.chains.contains_key(name);
        touched.chains.entry(name.to_owned()).or_insert(before);
        let n = self.chains.entry(name.to_owned()).or_insert(0);
        *n += 1;
        if *n > 1 {
            return;
        }
        let e = edges_of(t, name);
        for c in &e.chains {
            self.enter_chain(t, c, touched);
        }
        for s in &e.sets {
            self.enter_set(s, touched);
        }
        self.edges.insert(name.to_owned(), e);
    }

    fn leave_chain(&mut self, name: &str, touched: &mut Touched) {
        touched.chains.entry(name.to_owned()).or_insert(true);
        let n = self
            .chains
            .get_mut(name)
            .unwrap_or_else(|| panic!("chain {name} left a group it is not in"));
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.chains.remove(name);
        let e = self.edges.remove(name).unwrap_or_default();
        for c in &e.chains {
            self.leave_chain(c, touched);
        }
        for s in &e.sets {
            self.leave_set(s, touched);
        }
    }

    fn enter_set(&mut self, name: &str, touched: &mut Touched) {
        let before = self.sets.contains_key(name);
        touched.sets.entry(name.to_owned()).or_insert(before);
        *self.sets.entry(name.to_owned()).or_insert(0) += 1;
    }

    fn leave_set(&mut self, name: &str, touched: &mut Touched) {
        touched.sets.entry(name.to_owned()).or_insert(true);
        let n = self
            .sets
            .get_mut(name)
            .unwrap_or_else(|| panic!("set {name} left a group it is not in"));
        *n -= 1;
        if *n == 0 {
            self.sets.remove(name);
        }
    }

    /// Group `g`'s table, from `t`'s objects that it reaches.
    fn table(&self, t: &Table, g: usize) -> Table {
        let mut out = Table::new(t.family, &table_name(g));
        out.maps = self.maps.clone();
        for name in self.chains.keys() {
            out.chains.insert(name.clone(), t.chains[name].clone());
        }
        for name in self.sets.keys() {
            out.sets.insert(name.clone(), t.sets[name].clone());
        }
        out
    }
}

impl Split {
    /// `groups` groups (at least one).
    pub fn new(groups: usize) -> Split {
        assert!(groups > 0, "at least one group");
        Split {
            groups,
            iface_group: HashMap::new(),
            reach: BTreeMap::new(),
        }
    }

    /// Forgets everything and cuts `ruleset` whole: one ruleset per group.
    /// `group_of` chooses a new interface's group.
    pub fn full(&mut self, ruleset: &Ruleset, group_of: &dyn Fn(&str) -> usize) -> Vec<Ruleset> {
        self.reach.clear();
        self.iface_group.clear();
        let mut out = vec![Ruleset::default(); self.groups];
        for t in &ruleset.tables {
            let mut reach = vec![Reach::default(); self.groups];
            let mut seen = touched(self.groups);
            for (r, seen) in reach.iter_mut().zip(&mut seen) {
                for c in t.chains.values().filter(|c| c.base.is_some()) {
                    r.enter_chain(t, &c.name, seen);
                }
            }
            self.reach.insert(t.family, reach);
            // The maps as a patch from nothing: every element is new.
            for name in t.maps.keys() {
                self.update_map(t, name, &mut seen, group_of);
            }
            for (g, r) in self.reach[&t.family].iter().enumerate() {
                out[g].tables.push(r.table(t, g));
            }
        }
        out
    }

    /// Element changes per group: each group gets those of the sets it
    /// holds.
    pub fn elements(&self, delta: &ElementDelta) -> Vec<ElementDelta> {
        (0..self.groups)
            .map(|g| ElementDelta {
                sets: delta
                    .sets
                    .iter()
                    .filter(|d| {
                        self.reach
                            .get(&d.family)
                            .is_some_and(|r| r[g].sets.contains_key(&d.set))
                    })
                    .map(|d| in_group(d, g))
                    .collect(),
            })
            .collect()
    }

    /// `patch` (from the incremental compiler, which now holds `new`) as
    /// one patch per group; a group it does not reach gets an empty one.
    /// The groups must have been cut whole ([`Split::full`]) first.
    pub fn patch(
        &mut self,
        new: &Ruleset,
        patch: &RulesetPatch,
        group_of: &dyn Fn(&str) -> usize,
    ) -> Vec<RulesetPatch> {
        let mut out = vec![RulesetPatch::default(); self.groups];
        for tp in &patch.tables {
            let t = new
                .tables
                .iter()
                .find(|t| t.family == tp.family)
                .expect("a patch's table is in the new ruleset");
            let mut touched = touched(self.groups);
            let reach = self
                .reach
                .entry(t.family)
                .or_insert_with(|| vec![Reach::default(); self.groups]);
            // Chains the patch replaces or deletes: their counted edges
            // become the new ones. References gained are counted before
            // those lost, so that nothing referenced in the end leaves.
            let mut lost: Vec<Vec<Edges>> = vec![Vec::new(); self.groups];
            for (g, r) in reach.iter_mut().enumerate() {
                let mut gained = Vec::new();
                for name in tp.chains.keys() {
                    let Some(old) = r.edges.get(name).cloned() else {
                        continue;
                    };
                    touched[g].chains.entry(name.clone()).or_insert(true);
                    let now = edges_of(t, name);
                    gained.push(Edges {
                        chains: minus(&now.chains, &old.chains),
                        sets: minus(&now.sets, &old.sets),
                    });
                    lost[g].push(Edges {
                        chains: minus(&old.chains, &now.chains),
                        sets: minus(&old.sets, &now.sets),
                    });
                    r.edges.insert(name.clone(), now);
                }
                for e in gained {
                    for c in &e.chains {
                        r.enter_chain(t, c, &mut touched[g]);
                    }
                    for s in &e.sets {
                        r.enter_set(s, &mut touched[g]);
                    }
                }
            }
            for name in tp.maps.keys() {
                self.update_map(t, name, &mut touched, group_of);
            }
            let reach = self.reach.get_mut(&t.family).expect("inserted above");
            for (g, r) in reach.iter_mut().enumerate() {
                for e in std::mem::take(&mut lost[g]) {
                    for c in &e.chains {
                        r.leave_chain(c, &mut touched[g]);
                    }
                    for s in &e.sets {
                        r.leave_set(s, &mut touched[g]);
                    }
                }
                out[g].tables.push(group_patch(r, t, g, tp, &touched[g]));
                out[g].elements.sets.extend(
                    patch
                        .elements
                        .sets
                        .iter()
                        .filter(|d| {
                            // Not a set this group's patch creates or
                            // replaces: those go whole, as they are now.
                            d.family == t.family
                                && r.sets.contains_key(&d.set)
                                && touched[g].sets.get(&d.set) != Some(&false)
                                && !tp.sets.contains_key(&d.set)
                        })
                        .map(|d| in_group(d, g)),
                );
            }
        }
        // Element changes of tables the patch leaves alone.
        for d in &patch.elements.sets {
            if patch.tables.iter().any(|tp| tp.family == d.family) {
                continue;
            }
            for (g, o) in out.iter_mut().enumerate() {
                if self
                    .reach
                    .get(&d.family)
                    .is_some_and(|r| r[g].sets.contains_key(&d.set))
                {
                    o.elements.sets.push(in_group(d, g));
                }
            }
        }
        out
    }

    /// Brings every group's share of map `name` to `t`'s (the map may be
    /// gone): the chains its elements gain are entered now, those it loses
    /// left.
    fn update_map(
        &mut self,
        t: &Table,
        name: &str,
        touched: &mut [Touched],
        group_of: &dyn Fn(&str) -> usize,
    ) {
        let new = t.maps.get(name);
        // Only the dispatch maps (keyed by interface) are cut: each group
        // jumps to its own interfaces' chains. A map keyed by address is
        // not about interfaces, and every group gets all of it.
        let by_iface = new.is_some_and(|m| m.key == MapKey::IfName);
        if let Some(m) = new.filter(|_| by_iface) {
            for iface in m.elements.keys() {
                if !self.iface_group.contains_key(iface) {
                    let g = group_of(iface) % self.groups;
                    self.iface_group.insert(iface.clone(), g);
                }
            }
        }
        let reach = self.reach.get_mut(&t.family).expect("the family's groups");
        for (g, r) in reach.iter_mut().enumerate() {
            let share = new.map(|m| VerdictMap {
                elements: m
                    .elements
                    .iter()
                    .map(|(iface, v)| {
                        let mine = !by_iface || self.iface_group.get(iface) == Some(&g);
                        (
                            iface.clone(),
                            if mine { v.clone() } else { Verdict::Return },
                        )
                    })
                    .collect(),
                ..m.clone()
            });
            let old_targets = r.maps.get(name).map(targets).unwrap_or_default();
            let new_targets = share.as_ref().map(targets).unwrap_or_default();
            for c in minus(&new_targets, &old_targets) {
                r.enter_chain(t, &c, &mut touched[g]);
            }
            for c in minus(&old_targets, &new_targets) {
                r.leave_chain(&c, &mut touched[g]);
            }
            if r.maps.get(name) != share.as_ref() {
                touched[g].maps.insert(name.to_owned());
            }
            match share {
                Some(s) => r.maps.insert(name.to_owned(), s),
                None => r.maps.remove(name),
            };
        }
        // Interfaces in no map any more are forgotten.
        let in_maps = |iface: &str| {
            self.reach
                .values()
                .flatten()
                .any(|r| r.maps.values().any(|m| m.elements.contains_key(iface)))
        };
        let gone: Vec<String> = self
            .iface_group
            .keys()
            .filter(|i| !in_maps(i))
            .cloned()
            .collect();
        for i in gone {
            self.iface_group.remove(&i);
        }
    }
}

/// Group `g`'s patch of table `t` after `tp`: what entered (as it is
/// now), what left, what the patch changed and the group keeps, and its
/// share of every map the patch touched.
fn group_patch(r: &Reach, t: &Table, g: usize, tp: &TablePatch, touched: &Touched) -> TablePatch {
    let mut out = TablePatch::new(t.family, &table_name(g));
    for (name, &before) in &touched.chains {
        let after = r.chains.contains_key(name);
        if after && (!before || tp.chains.contains_key(name)) {
            out.chains
                .insert(name.clone(), Some(t.chains[name].clone()));
        } else if before && !after {
            out.chains.insert(name.clone(), None);
        }
    }
    for (name, change) in &tp.sets {
        if r.sets.contains_key(name) && touched.sets.get(name) != Some(&false) {
            out.sets.insert(name.clone(), change.clone());
        }
    }
    for (name, &before) in &touched.sets {
        let after = r.sets.contains_key(name);
        if after && !before {
            out.sets.insert(name.clone(), Some(t.sets[name].clone()));
        } else if before && !after {
            out.sets.insert(name.clone(), None);
        }
    }
    for name in &touched.maps {
        out.maps.insert(name.clone(), r.maps.get(name).cloned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{BaseChain, Chain, ChainPolicy, Dir, Hook, IfDir, Rule};

    fn chain(name: &str, verdict: Verdict) -> Chain {
        Chain {
            name: name.into(),
            base: None,
            rules: vec![Rule {
                matches: vec![],
                stmts: vec![],
                verdict: Some(verdict),
                comment: None,
            }]
            .into(),
        }
    }

    /// The dispatch map is cut by interface; a map keyed by address goes
    /// whole to every group that reaches it, with the chains it jumps to.
    #[test]
    fn only_maps_keyed_by_interface_are_cut() {
        let mut t = Table::new(TableFamily::Ip, "nftpolicy");
        let mut fwd = chain(
            "fwd",
            Verdict::IfNameVmap {
                dir: IfDir::Out,
                map: "dispatch".into(),
            },
        );
        fwd.base = Some(BaseChain {
            hook: Hook::Forward,
            priority: 0,
            policy: ChainPolicy::Accept,
        });
        let by_addr = |name: &str| {
            chain(
                name,
                Verdict::AddrVmap {
                    dir: Dir::Src,
                    map: "peers".into(),
                },
            )
        };
        for c in [
            fwd,
            by_addr("tw-a"),
            by_addr("tw-b"),
            chain("pc-1", Verdict::Return),
        ] {
            t.chains.insert(c.name.clone(), c);
        }
        let map = |name: &str, key, elements: &[(&str, Verdict)]| VerdictMap {
            name: name.into(),
            key,
            elements: elements
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            comment: None,
        };
        t.maps.insert(
            "dispatch".into(),
            map(
                "dispatch",
                MapKey::IfName,
                &[
                    ("calia", Verdict::Goto("tw-a".into())),
                    ("calib", Verdict::Goto("tw-b".into())),
                ],
            ),
        );
        let peers = map(
            "peers",
            MapKey::Addr,
            &[("198.18.0.1", Verdict::Jump("pc-1".into()))],
        );
        t.maps.insert("peers".into(), peers.clone());
        let rs = Ruleset { tables: vec![t] };
        let group_of = |iface: &str| usize::from(iface == "calib");
        let cut = Split::new(2).full(&rs, &group_of);
        for (g, (mine, other)) in [("calia", "calib"), ("calib", "calia")]
            .into_iter()
            .enumerate()
        {
            let t = &cut[g].tables[0];
            let dispatch = &t.maps["dispatch"].elements;
            assert!(matches!(dispatch[mine], Verdict::Goto(_)), "group {g}");
            assert_eq!(dispatch[other], Verdict::Return, "group {g}");
            assert_eq!(t.maps["peers"], peers, "group {g}");
            assert!(t.chains.contains_key("pc-1"), "group {g}");
        }
    }

    #[test]
    fn auto_keeps_small_tables_whole_and_cuts_large_ones() {
        assert_eq!(auto_groups(0), 1);
        assert_eq!(auto_groups(7_960), 1);
        assert_eq!(auto_groups(AUTO_MIN_RULES - 1), 1);
        assert_eq!(auto_groups(AUTO_MIN_RULES), 4);
        assert_eq!(auto_groups(16_100), 6);
        assert_eq!(auto_groups(1_000_000), AUTO_MAX_GROUPS);
    }

    #[test]
    fn table_groups_parse_and_print() {
        assert_eq!("auto".parse(), Ok(TableGroups::Auto));
        assert_eq!(" AUTO ".parse(), Ok(TableGroups::Auto));
        assert_eq!("6".parse(), Ok(TableGroups::Fixed(6)));
        assert_eq!("64".parse(), Ok(TableGroups::Fixed(64)));
        for bad in ["0", "65", "-1", "six", ""] {
            let e = bad.parse::<TableGroups>().unwrap_err();
            assert!(
                e.contains("neither `auto` nor a count from 1 to 64"),
                "{bad}: {e}"
            );
        }
        assert_eq!(TableGroups::Auto.to_string(), "auto");
        assert_eq!(TableGroups::Fixed(3).to_string(), "3");
    }

    #[test]
    fn auto_keeps_a_running_count_near_its_size() {
        assert_eq!(auto_groups_keeping(16_100, None), 6);
        // 10 % either side of 16,100 rules gets 5 to 7 groups.
        assert_eq!(auto_groups_keeping(16_100, Some(5)), 5);
        assert_eq!(auto_groups_keeping(16_100, Some(7)), 7);
        assert_eq!(auto_groups_keeping(16_100, Some(4)), 6);
        assert_eq!(auto_groups_keeping(16_100, Some(1)), 6);
        // Just under the threshold: a node that had groups keeps them, one
        // that had one table keeps it; far under, groups go.
        assert_eq!(auto_groups_keeping(9_800, Some(4)), 4);
        assert_eq!(auto_groups_keeping(9_800, Some(1)), 1);
        assert_eq!(auto_groups_keeping(10_500, Some(1)), 1);
        assert_eq!(auto_groups_keeping(5_000, Some(4)), 1);
    }

    #[test]
    fn running_groups_reads_the_table_names() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(running_groups(&names(&["nftpolicy"])), Some(1));
        assert_eq!(
            running_groups(&names(&["nftpolicy-g0", "nftpolicy-g1", "nftpolicy-g2"])),
            Some(3)
        );
        assert_eq!(running_groups(&names(&[])), None);
        assert_eq!(running_groups(&names(&["nftpolicy", "nftpolicy-g0"])), None);
        assert_eq!(
            running_groups(&names(&["nftpolicy-g0", "nftpolicy-g2"])),
            None
        );
        assert_eq!(
            running_groups(&names(&["nftpolicy-g0", "nftpolicy-g0"])),
            None
        );
        assert_eq!(running_groups(&names(&["nftpolicy-gx"])), None);
    }

    #[test]
    fn auto_resolves_from_the_largest_table() {
        let empty = Ruleset::default();
        assert_eq!(TableGroups::Auto.resolve(&empty), 1);
        assert_eq!(TableGroups::Fixed(3).resolve(&empty), 3);
        assert_eq!(largest_table_rules(&empty), 0);
    }
}
