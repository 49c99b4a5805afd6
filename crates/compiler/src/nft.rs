//! nftables objects as plain data: what the compiler produces, the text
//! renderer prints as `nft -f` input, and the programmer encodes as netlink.
//!
//! The vocabulary is deliberately small — exactly the matches, statements
//! and verdicts felix's logic needs — and *semantic* (`Match::Addr`, not
//! "payload load + cmp"), so that the renderer and the netlink encoder lower
//! the same meaning independently and a test can compare them through the
//! kernel.
//!
//! Every collection is ordered (`BTreeMap`/`Vec`) so two rulesets compare
//! with `==` and diff deterministically; every type (de)serialises, so a
//! ruleset can be kept as a golden file.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The table name nftpolicy owns in each family. With namespace groups
/// (`groups.rs`) its tables are `nftpolicy-g<N>` instead; it touches no
/// other (see [`is_our_table`]).
pub const TABLE_NAME: &str = "nftpolicy";

/// Whether a table of that name is nftpolicy's: [`TABLE_NAME`] or a
/// group's `nftpolicy-g<N>` (N decimal digits).
pub fn is_our_table(name: &str) -> bool {
    name == TABLE_NAME
        || name
            .strip_prefix(TABLE_NAME)
            .and_then(|rest| rest.strip_prefix("-g"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A whole desired dataplane: one table per address family.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

/// nftables table families we use. nftpolicy keeps `ip` and `ip6` tables
/// apart (as iptables/ip6tables do) so that each Calico rule is one nft rule
/// per family; see ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TableFamily {
    Ip,
    Ip6,
}

impl TableFamily {
    /// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
    pub fn nfproto(self) -> u8 {
        match self {
            TableFamily::Ip => 2,
            TableFamily::Ip6 => 10,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            TableFamily::Ip => "ip",
            TableFamily::Ip6 => "ip6",
        }
    }

    pub fn is_v6(self) -> bool {
        self == TableFamily::Ip6
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub family: TableFamily,
    pub name: String,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, VerdictMap>,
    pub chains: BTreeMap<String, Chain>,
}

impl Table {
    pub fn new(family: TableFamily, name: &str) -> Table {
        Table {
            family,
            name: name.to_owned(),
            sets: BTreeMap::new(),
            maps: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub name: String,
    /// Set for base chains (attached to a netfilter hook).
    pub base: Option<BaseChain>,
    pub rules: Rules,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseChain {
    pub hook: Hook,
    /// Hook priority (filter = 0; lower runs first).
    pub priority: i32,
    pub policy: ChainPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Hook {
    Input,
    Forward,
    Output,
}

impl Hook {
    /// `NF_INET_*` hook number.
    pub fn number(self) -> u32 {
        match self {
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChainPolicy {
    Accept,
    Drop,
}

/// One nft rule: all matches must hold; then the statements run in order;
/// then the verdict (if any) is taken.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub stmts: Vec<Stmt>,
    pub verdict: Option<Verdict>,
    /// Shown by `nft list ruleset`: which policy and rule this comes from.
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Dir {
    Src,
    Dst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IfDir {
    /// `iifname`
    In,
    /// `oifname`
    Out,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Match {
    /// `iifname "cali1234"` or, with `wildcard`, `iifname "cali*"` (prefix).
    IfName {
        dir: IfDir,
        name: String,
        wildcard: bool,
        negate: bool,
    },
    /// `ct state established,related`: true if any of the bits is set.
    CtState(CtStates),
    /// `meta mark & mask == value` (or `!=`).
    Mark { mask: u32, value: u32, negate: bool },
    /// `meta l4proto N` (or `!=`).
    L4Proto { proto: u8, negate: bool },
    /// `ip saddr 198.18.0.0/16`, `ip saddr @set` (or `!=`); the address
    /// family is the table's.
    Addr {
        dir: Dir,
        target: AddrTarget,
        negate: bool,
    },
    /// `th dport 80`, `th dport 8000-8010`, `th dport @set` (or `!=`).
    /// Always preceded by an `L4Proto` match for a protocol with ports.
    Port {
        dir: Dir,
        target: PortTarget,
        negate: bool,
    },
    /// `ip daddr . meta l4proto . th dport @set` (or `!=`): a named port.
    NamedPort { dir: Dir, set: String, negate: bool },
    /// `ip saddr . meta l4proto . th dport @set` (or `!=`): the source
    /// address with the destination port, the key of an ingress chain's
    /// fused lookup (`compiler::fused`; its set is a `SetKey::NamedPort`).
    PeerPort { set: String, negate: bool },
    /// `meta mark & mask @set` ([`SetKey::Mark`]), or with `ports`
    /// `meta mark & mask . meta l4proto . th dport @set`
    /// ([`SetKey::MarkPort`]): what some mark bits hold, looked up (with
    /// the protocol and destination port). The compiler does not emit it:
    /// it is the second stage of the two-stage fused lookup that
    /// `bench::two_stage` measures, where the bits hold the peer's class.
    MarkLookup { mask: u32, ports: bool, set: String },
    /// ICMP (table family ip) or ICMPv6 (ip6) type, optionally with code;
    /// negated: not (type [and code]).
    Icmp {
        icmp_type: u8,
        code: Option<u8>,
        negate: bool,
    },
}

/// Conntrack state bits, as the kernel numbers them (`NF_CT_STATE_*_BIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CtStates(pub u32);

impl CtStates {
    pub const INVALID: CtStates = CtStates(1);
    pub const ESTABLISHED: CtStates = CtStates(2);
    pub const RELATED: CtStates = CtStates(4);
    pub const NEW: CtStates = CtStates(8);

    pub fn union(self, other: CtStates) -> CtStates {
        CtStates(self.0 | other.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrTarget {
    Net(IpNet),
    Set(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortTarget {
    /// Inclusive; a single port when `min == max`.
    Range {
        min: u16,
        max: u16,
    },
    Set(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stmt {
    Counter,
    /// `meta mark set meta mark & ~clear | set`.
    SetMark {
        clear: u32,
        set: u32,
    },
    /// `log prefix "…"` (kernel log) or, with a group, `log prefix "…" group N`
    /// (NFLOG), optionally rate limited per second.
    Log {
        prefix: String,
        group: Option<u16>,
        rate_per_second: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `iifname vmap @map` / `oifname vmap @map`: the interface name looks
    /// up a verdict in a verdict map; no element → the rule does not match.
    IfNameVmap {
        dir: IfDir,
        map: String,
    },
    /// `ip saddr vmap @map` / `ip daddr vmap @map` (the table's family): the
    /// address looks up a verdict in a verdict map keyed by addresses
    /// ([`MapKey::Addr`]); no element → the rule does not match.
    AddrVmap {
        dir: Dir,
        map: String,
    },
}

/// A named set. Address and port sets are interval sets whose elements never
/// overlap (the compiler coalesces them: the kernel rejects overlaps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    pub name: String,
    pub key: SetKey,
    pub elements: Elements,
    pub comment: Option<String>,
}

/// A list shared between copies of the object holding it until one of
/// them changes it (copy on write: [`DerefMut`](std::ops::DerefMut)
/// copies a shared list first). A set's elements ([`Elements`]) and a
/// chain's rules ([`Rules`]) are held this way.
///
/// Why: the same set or chain is held several times over — by the
/// compiler, by the programmer as committed state, and with table groups
/// once per group's table that reaches it. At 10,000 policies the few
/// namespace-wide sets of 8,000+ addresses are reached from every group;
/// unshared, the copies cost about 10 MiB of the agent's memory at four
/// groups (README, Performance). Read access never copies; code that may
/// leave a shared list as it is should check before taking it mutably.
#[derive(Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shared<T>(std::sync::Arc<Vec<T>>);

/// A set's elements.
pub type Elements = Shared<SetElement>;
/// A chain's rules.
pub type Rules = Shared<Rule>;

impl<T> Shared<T> {
    /// Whether `self` and `other` are one shared list (not merely equal).
    pub fn shares(&self, other: &Shared<T>) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

// Not derived: a derive would ask `T: Clone` / `T: Default`, which
// sharing does not need.
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared(Default::default())
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Clone> std::ops::DerefMut for Shared<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for Shared<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        *self.0 == *other
    }
}

impl<T> From<Vec<T>> for Shared<T> {
    fn from(v: Vec<T>) -> Shared<T> {
        Shared(std::sync::Arc::new(v))
    }
}

impl<T> FromIterator<T> for Shared<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Shared<T> {
        Shared::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a, T: Clone> IntoIterator for &'a mut Shared<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        std::sync::Arc::make_mut(&mut self.0).iter_mut()
    }
}

impl<'a, T> IntoIterator for &'a Shared<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SetKey {
    /// `ipv4_addr` / `ipv6_addr` (by table family), `flags interval`.
    Addr,
    /// `ipv4_addr` / `ipv6_addr` without flags: a hash set whose elements
    /// are single addresses (host nets). Selector sets whose members are
    /// all pods are these: the kernel adds one hash element in about half
    /// the time of an interval's start and end elements, and at scale set
    /// elements are most of the kernel's cold programming time.
    Host,
    /// `inet_service`, `flags interval`.
    Port,
    /// `ipv4_addr . inet_proto . inet_service` (or ipv6): named ports.
    NamedPort,
    /// `mark`: values of (some bits of) the packet mark.
    Mark,
    /// `mark . inet_proto . inet_service`.
    MarkPort,
}

impl SetKey {
    pub fn is_interval(self) -> bool {
        matches!(self, SetKey::Addr | SetKey::Port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SetElement {
    Net(IpNet),
    /// Inclusive port range.
    Ports {
        min: u16,
        max: u16,
    },
    /// (address, IP protocol, port).
    NamedPort(IpAddr, u8, u16),
    /// A mark value.
    Mark(u32),
    /// (mark value, IP protocol, port).
    MarkPort(u32, u8, u16),
}

/// A verdict map from interface name (`ifname`) or address to a verdict
/// (`goto <chain>`, `jump <chain>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictMap {
    pub name: String,
    /// What its keys are; the keys of `elements` are interface names, or
    /// addresses of the table's family written as `IpAddr` prints them
    /// (`198.18.0.1`, `fd00:198:18::1`: read-back writes them so, and the
    /// encoder refuses any other spelling, which would read back as drift).
    #[serde(default, skip_serializing_if = "MapKey::is_ifname")]
    pub key: MapKey,
    pub elements: BTreeMap<String, Verdict>,
    pub comment: Option<String>,
}

/// The keys of a verdict map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapKey {
    /// `ifname`.
    #[default]
    IfName,
    /// `ipv4_addr` / `ipv6_addr` (by table family), single addresses.
    Addr,
}

impl MapKey {
    pub fn is_ifname(&self) -> bool {
        *self == MapKey::IfName
    }
}

/// Element changes to sets that exist and stay: what an incremental compile
/// produces when only set members changed (a pod came, went or changed its
/// labels), so that neither the compiler nor the programmer has to look at
/// the rest of the ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElementDelta {
    pub sets: Vec<SetDelta>,
}

/// Elements leaving and joining one set. An element is never in both lists;
/// every removed element is in the set, no added one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDelta {
    pub family: TableFamily,
    /// The set's table.
    pub table: String,
    pub set: String,
    pub remove: Vec<SetElement>,
    pub add: Vec<SetElement>,
}

impl ElementDelta {
    pub fn is_empty(&self) -> bool {
        self.sets
            .iter()
            .all(|s| s.remove.is_empty() && s.add.is_empty())
    }

    /// Number of elements added plus removed.
    pub fn len(&self) -> usize {
        self.sets.iter().map(|s| s.remove.len() + s.add.len()).sum()
    }

    /// Applies the changes to `table` (those of other tables are
    /// skipped). Set elements stay sorted.
    pub fn apply_to_table(&self, table: &mut Table) {
        for d in self
            .sets
            .iter()
            .filter(|d| d.family == table.family && d.table == table.name)
        {
            if let Some(set) = table.sets.get_mut(&d.set) {
                d.apply_to_set(set);
            }
        }
    }

    pub fn apply_to(&self, ruleset: &mut Ruleset) {
        for t in &mut ruleset.tables {
            self.apply_to_table(t);
        }
    }
}

impl SetDelta {
    /// `set.elements` is sorted (as the compiler makes it); keeps it so.
    pub fn apply_to_set(&self, set: &mut Set) {
        self.apply_to_list(&mut set.elements);
    }

    /// [`apply_to_set`](Self::apply_to_set) on a set's element list (a
    /// shared list is copied first, once).
    pub fn apply_to_list(&self, elements: &mut Elements) {
        if self.add.is_empty() && self.remove.is_empty() {
            return;
        }
        let elements: &mut Vec<SetElement> = elements;
        for e in &self.remove {
            if let Ok(i) = elements.binary_search(e) {
                elements.remove(i);
            }
        }
        for e in &self.add {
            if let Err(i) = elements.binary_search(e) {
                elements.insert(i, e.clone());
            }
        }
    }

    /// The same change (elements added and removed), whatever the table.
    pub fn same_change(&self, other: &SetDelta) -> bool {
        self.family == other.family
            && self.set == other.set
            && self.add == other.add
            && self.remove == other.remove
    }
}

/// What an incremental compile changed beyond set elements (a local
/// endpoint came, went or was relabelled): chains, sets and maps of our
/// tables to create, replace or delete, plus element changes of sets that
/// stay. Applied to the previous ruleset it gives the new one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RulesetPatch {
    pub tables: Vec<TablePatch>,
    /// Element changes of sets that exist before and after (never of a set
    /// the table patches create or delete).
    pub elements: ElementDelta,
}

/// Objects of one table: `Some` = the object as it must be now (new or
/// changed), `None` = delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePatch {
    pub family: TableFamily,
    /// The table's name.
    pub table: String,
    pub chains: BTreeMap<String, Option<Chain>>,
    pub sets: BTreeMap<String, Option<Set>>,
    pub maps: BTreeMap<String, Option<VerdictMap>>,
}

impl TablePatch {
    pub fn new(family: TableFamily, table: &str) -> TablePatch {
        TablePatch {
            family,
            table: table.to_owned(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            maps: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.maps.is_empty()
    }

    /// Replaces and deletes the objects in `table` (the patch's).
    pub fn apply_to_table(&self, table: &mut Table) {
        fn patch<T: Clone>(
            objects: &mut BTreeMap<String, T>,
            changes: &BTreeMap<String, Option<T>>,
        ) {
            for (name, change) in changes {
                match change {
                    Some(o) => {
                        objects.insert(name.clone(), o.clone());
                    }
                    None => {
                        objects.remove(name);
                    }
                }
            }
        }
        patch(&mut table.chains, &self.chains);
        patch(&mut table.sets, &self.sets);
        patch(&mut table.maps, &self.maps);
    }
}

impl RulesetPatch {
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(TablePatch::is_empty) && self.elements.is_empty()
    }

    pub fn apply_to(&self, ruleset: &mut Ruleset) {
        for t in &mut ruleset.tables {
            let (family, name) = (t.family, t.name.clone());
            for p in self
                .tables
                .iter()
                .filter(|p| p.family == family && p.table == name)
            {
                p.apply_to_table(t);
            }
        }
        self.elements.apply_to(ruleset);
    }
}

/// Names of the sets and maps a chain's rules use.
pub fn referenced_sets(c: &Chain) -> impl Iterator<Item = &str> {
    c.rules.iter().flat_map(|r| {
        let from_matches = r.matches.iter().filter_map(|m| match m {
            Match::Addr {
                target: AddrTarget::Set(s),
                ..
            }
            | Match::Port {
                target: PortTarget::Set(s),
                ..
            }
            | Match::NamedPort { set: s, .. }
            | Match::PeerPort { set: s, .. }
            | Match::MarkLookup { set: s, .. } => Some(s.as_str()),
            _ => None,
        });
        let from_verdict = match &r.verdict {
            Some(Verdict::IfNameVmap { map, .. } | Verdict::AddrVmap { map, .. }) => {
                Some(map.as_str())
            }
            _ => None,
        };
        from_matches.chain(from_verdict)
    })
}
