//! Logical ruleset → felix's iptables mode: per family (IPv4, IPv6) the
//! `filter` table chains as `iptables-restore` rule arguments, the hook rules
//! in the built-in `FORWARD`/`INPUT` chains (jumps at the top, `FORWARD`'s
//! accept at the end, as felix places them), and the IP sets for
//! `ipset restore` — first as plain data ([`IptablesRuleset`]), then as text
//! ([`render_restore`], [`render_ipset_restore`], [`render`]).
//!
//! Felix's formats are kept where they exist:
//!
//! - chain names capped at 28 characters with felix's hashing rule
//!   ([`length_limited_id`]);
//! - rules written the way felix writes them (`--jump`, `--goto`,
//!   `--in-interface`, `-m mark --mark 0/0x…`, `--jump MARK --set-mark …`),
//!   each led by felix's rule-hash comment `cali:<16 chars>` (a SHA-224 chain
//!   over the chain name and the rules so far), then our human comment;
//! - workload dispatch as felix's shallow prefix tree of chains;
//! - Allow / Pass as two rules (set the mark; return if the mark is set):
//!   iptables cannot set a mark and return in one rule;
//! - more than one CIDR or more than 15 multiport slots (or numeric and named
//!   ports together) as felix's scratch-mark "match blocks";
//! - selectors and named ports as ipset `hash:net` / `hash:ip,port` sets
//!   named `cali40s:…`, `cali60n:…` (felix's ids, with ipset's `:`).
//!
//! Semantics follow [`crate::lower_nft`] rule for rule: a rule whose CIDRs are
//! all of the other family, or whose IP version is the other one, is skipped
//! in that family; ICMPv6 neighbour-discovery rules exist only in IPv6.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use base64::Engine;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha224, Sha256};

use crate::logical::{
    coalesce, Cond, EntityMatch, LAction, LRule, LogicalRuleset, MarkBits, PolicyMatch,
    CHAIN_FORWARD, CHAIN_INPUT, WORKLOAD_IFACE_PREFIX,
};

/// iptables' limit on chain names (felix's `MaxChainNameLength`).
pub const MAX_CHAIN_NAME_LEN: usize = 28;
/// ipset's limit on set names.
pub const MAX_IPSET_NAME_LEN: usize = 31;
/// Characters of the base64 rule hash in the `cali:` comment.
pub const RULE_HASH_LEN: usize = 16;
/// The xt_comment limit felix truncates comments to.
pub const MAX_COMMENT_LEN: usize = 256;
/// felix's `maxelem` for every IP set.
pub const IPSET_MAXELEM: u32 = 1_048_576;
/// Every rule we write starts with `-m comment --comment "cali:<hash>"`.
pub const HASH_COMMENT_PREFIX: &str = "cali:";
/// Chains we own start with this.
pub const OWNED_CHAIN_PREFIX: &str = "cali-";
/// The table everything lives in.
pub const TABLE: &str = "filter";
/// Built-in chains that get our hook rules, and the chain each jumps to.
pub const HOOKS: [(&str, &str); 2] = [("FORWARD", CHAIN_FORWARD), ("INPUT", CHAIN_INPUT)];
/// felix's `--log-level` for Log rules.
pub const LOG_LEVEL: u8 = 5;
/// xt_NFLOG's prefix buffer is 64 bytes with the NUL.
const NFLOG_PREFIX_MAX: usize = 63;

/// Chain-name prefixes felix shortens with [`length_limited_id`] (the part
/// after the prefix is an id that may be long).
const HASHED_PREFIXES: [&str; 6] = [
    "cali-pri-",
    "cali-pro-",
    "cali-pi-",
    "cali-po-",
    "cali-tw-",
    "cali-fw-",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn version(self) -> u8 {
        match self {
            IpFamily::V4 => 4,
            IpFamily::V6 => 6,
        }
    }

    pub fn is_v6(self) -> bool {
        self == IpFamily::V6
    }

    /// ipset's `family` keyword.
    pub fn ipset_family(self) -> &'static str {
        match self {
            IpFamily::V4 => "inet",
            IpFamily::V6 => "inet6",
        }
    }

    /// Prefix of our main IP sets in this family (felix's `cali40` / `cali60`).
    pub fn set_prefix(self) -> &'static str {
        match self {
            IpFamily::V4 => "cali40",
            IpFamily::V6 => "cali60",
        }
    }

    /// Prefix of felix's temporary sets (used to swap in a rewritten set).
    pub fn temp_set_prefix(self) -> &'static str {
        match self {
            IpFamily::V4 => "cali4t",
            IpFamily::V6 => "cali6t",
        }
    }

    /// The family of one of our set names, if it is ours.
    pub fn of_set_name(name: &str) -> Option<IpFamily> {
        IpFamily::ALL
            .into_iter()
            .find(|f| name.starts_with(f.set_prefix()) || name.starts_with(f.temp_set_prefix()))
    }

    fn icmp_protocol(self) -> u8 {
        match self {
            IpFamily::V4 => 1,
            IpFamily::V6 => 58,
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IPv{}", self.version())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpSetType {
    /// Addresses and CIDRs (selectors).
    HashNet,
    /// (address, protocol:port) (named ports).
    HashIpPort,
}

impl IpSetType {
    pub fn as_str(self) -> &'static str {
        match self {
            IpSetType::HashNet => "hash:net",
            IpSetType::HashIpPort => "hash:ip,port",
        }
    }

    pub fn parse(s: &str) -> Option<IpSetType> {
        match s {
            "hash:net" => Some(IpSetType::HashNet),
            "hash:ip,port" => Some(IpSetType::HashIpPort),
            _ => None,
        }
    }
}

/// One ipset: its type, family, size limit and members, the members written
/// exactly as `ipset save` prints them (so read-back compares as strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSetSpec {
    pub kind: IpSetType,
    pub family: IpFamily,
    pub maxelem: u32,
    pub members: BTreeSet<String>,
}

impl IpSetSpec {
    /// The `create` line (without `-exist`).
    pub fn create_line(&self, name: &str) -> String {
        format!(
            "create {name} {} family {} maxelem {}",
            self.kind.as_str(),
            self.family.ipset_family(),
            self.maxelem
        )
    }

    /// Same type, family and size: members can be changed in place.
    pub fn same_metadata(&self, other: &IpSetSpec) -> bool {
        self.kind == other.kind && self.family == other.family && self.maxelem == other.maxelem
    }
}

/// The iptables rendering for one family: what `iptables-restore` (or
/// `ip6tables-restore`) and `ipset restore` should make the kernel hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesRuleset {
    pub family: IpFamily,
    /// Our rules at the top of built-in chains (`FORWARD`, `INPUT`), in
    /// order; each is the rule's arguments after `-I <chain> <n>`.
    pub hooks: BTreeMap<String, Vec<String>>,
    /// Our rules at the end of built-in chains, in order (arguments after
    /// `-A <chain>`): `FORWARD`'s accept of what policy allowed, appended
    /// as felix does, so that other software's `FORWARD` rules (kube-proxy's,
    /// docker's) still see the packets policy accepted.
    pub appended: BTreeMap<String, Vec<String>>,
    /// Our chains (all `cali-…`), each rule as the arguments after
    /// `-A <chain>`, starting with the `cali:<hash>` comment.
    pub chains: BTreeMap<String, Vec<String>>,
    /// IP sets used by the rules of this family.
    pub ipsets: BTreeMap<String, IpSetSpec>,
}

impl IptablesRuleset {
    /// The `cali:` hashes of a chain's rules, in order.
    pub fn chain_hashes(&self, chain: &str) -> Option<Vec<String>> {
        self.chains.get(chain).map(|rules| {
            rules
                .iter()
                .map(|r| rule_hash(r).unwrap_or_default().to_owned())
                .collect()
        })
    }
}

/// Both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesRulesets {
    pub v4: IptablesRuleset,
    pub v6: IptablesRuleset,
}

impl IptablesRulesets {
    pub fn get(&self, family: IpFamily) -> &IptablesRuleset {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    pub fn get_mut(&mut self, family: IpFamily) -> &mut IptablesRuleset {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &IptablesRuleset> {
        [&self.v4, &self.v6].into_iter()
    }
}

/// felix's `hashutils.GetLengthLimitedID`: `prefix + suffix` when that fits
/// in `max_len` (and, at exactly `max_len`, the suffix does not start with
/// `_`); otherwise `prefix + "_" + base64url_nopad(sha256(suffix))`
/// truncated to `max_len`.
pub fn length_limited_id(prefix: &str, suffix: &str, max_len: usize) -> String {
    let total = prefix.len() + suffix.len();
    if total > max_len || (total == max_len && suffix.starts_with('_')) {
        let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(suffix.as_bytes()));
        let keep = max_len.saturating_sub(prefix.len() + 1);
        format!("{prefix}_{}", &hash[..keep.min(hash.len())])
    } else {
        format!("{prefix}{suffix}")
    }
}

/// The iptables name of a logical chain: felix's prefixes (`cali-pi-`,
/// `cali-po-`, `cali-pri-`, `cali-pro-`, `cali-tw-`, `cali-fw-`) keep their
/// prefix and hash a suffix that does not fit in 28 characters.
pub fn chain_name(logical: &str) -> String {
    for prefix in HASHED_PREFIXES {
        if let Some(suffix) = logical.strip_prefix(prefix) {
            return length_limited_id(prefix, suffix, MAX_CHAIN_NAME_LEN);
        }
    }
    match logical.strip_prefix(OWNED_CHAIN_PREFIX) {
        Some(suffix) if logical.len() > MAX_CHAIN_NAME_LEN => {
            length_limited_id(OWNED_CHAIN_PREFIX, suffix, MAX_CHAIN_NAME_LEN)
        }
        _ => logical.to_owned(),
    }
}

/// The ipset name for a logical set id (`s:<hash>` → `cali40s:<hash>`).
pub fn ipset_name(id: &str, family: IpFamily) -> String {
    let mut name = format!("{}{id}", family.set_prefix());
    name.truncate(MAX_IPSET_NAME_LEN);
    name
}

/// felix's `escapeComment`: anything but `[A-Za-z0-9_ @%+=:,./-]` becomes
/// `_` (one per character), then truncation to 256 bytes.
pub fn escape_comment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " _@%+=:,./-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(MAX_COMMENT_LEN);
    out
}

/// The `cali:` hash of a rule (its first `--comment`), from our rendering or
/// from `iptables-save` output.
pub fn rule_hash(args: &str) -> Option<&str> {
    let at = args.find("--comment ")? + "--comment ".len();
    let rest = args[at..].strip_prefix('"').unwrap_or(&args[at..]);
    let rest = rest.strip_prefix(HASH_COMMENT_PREFIX)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// felix's rule hashes: SHA-224 of the chain name, then for each rule
/// SHA-224(previous hash ‖ `-A <chain> HASH <rule without hash>`),
/// base64url without padding, first 16 characters.
fn rule_hashes(chain: &str, bodies: &[String]) -> Vec<String> {
    let mut hash = Sha224::digest(chain.as_bytes()).to_vec();
    bodies
        .iter()
        .map(|body| {
            let mut h = Sha224::new();
            h.update(&hash);
            h.update(format!("-A {chain} HASH {body}").as_bytes());
            hash = h.finalize().to_vec();
            let mut s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&hash);
            s.truncate(RULE_HASH_LEN);
            s
        })
        .collect()
}

/// A rule under construction: comments, match fragments, action fragment.
#[derive(Debug, Clone, Default)]
struct Rule {
    comment: Option<String>,
    matches: Vec<String>,
    action: Option<String>,
}

impl Rule {
    fn new(comment: &str, matches: Vec<String>, action: Option<String>) -> Rule {
        Rule {
            comment: Some(comment.to_owned()),
            matches,
            action,
        }
    }

    /// The rule's text without the hash comment (what felix hashes).
    fn body(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.comment {
            parts.push(format!("-m comment --comment \"{}\"", escape_comment(c)));
        }
        parts.extend(self.matches.iter().cloned());
        parts.extend(self.action.iter().cloned());
        parts.join(" ")
    }
}

/// Hashes and renders a chain's rules as `-A` arguments.
fn finish_chain(chain: &str, rules: &[Rule]) -> Vec<String> {
    let bodies: Vec<String> = rules.iter().map(Rule::body).collect();
    rule_hashes(chain, &bodies)
        .into_iter()
        .zip(bodies)
        .map(|(hash, body)| {
            let comment = format!("-m comment --comment \"{HASH_COMMENT_PREFIX}{hash}\"");
            if body.is_empty() {
                comment
            } else {
                format!("{comment} {body}")
            }
        })
        .collect()
}

fn mark_clear(bits: u32) -> String {
    format!("-m mark --mark 0/{bits:#x}")
}

fn mark_set(bits: u32) -> String {
    format!("-m mark --mark {bits:#x}/{bits:#x}")
}

fn set_mark(bits: u32) -> String {
    format!("--jump MARK --set-mark {bits:#x}/{bits:#x}")
}

fn clear_mark(bits: u32) -> String {
    format!("--jump MARK --set-mark 0/{bits:#x}")
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.trunc().to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Src,
    Dst,
}

impl Dir {
    fn net(self, negate: bool, n: &IpNet) -> String {
        let neg = if negate { "! " } else { "" };
        match self {
            Dir::Src => format!("{neg}--source {}", net_text(n)),
            Dir::Dst => format!("{neg}--destination {}", net_text(n)),
        }
    }

    fn set(self, negate: bool, name: &str) -> String {
        let neg = if negate { "! " } else { "" };
        let d = match self {
            Dir::Src => "src",
            Dir::Dst => "dst",
        };
        format!("-m set {neg}--match-set {name} {d}")
    }

    fn ip_port_set(self, negate: bool, name: &str) -> String {
        let neg = if negate { "! " } else { "" };
        let d = match self {
            Dir::Src => "src,src",
            Dir::Dst => "dst,dst",
        };
        format!("-m set {neg}--match-set {name} {d}")
    }

    fn ports(self, negate: bool, ports: &[(u16, u16)]) -> String {
        let neg = if negate { "! " } else { "" };
        let list: Vec<String> = ports
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}:{b}")
                }
            })
            .collect();
        let opt = match self {
            Dir::Src => "--source-ports",
            Dir::Dst => "--destination-ports",
        };
        format!("-m multiport {neg}{opt} {}", list.join(","))
    }
}

/// felix's `SplitPortList`: groups of at most 15 multiport slots, a range
/// taking two.
pub fn split_ports(ports: &[(u16, u16)]) -> Vec<Vec<(u16, u16)>> {
    let mut splits = Vec::new();
    let mut split = Vec::new();
    let mut free = 15;
    for &(a, b) in ports {
        let need = if a == b { 1 } else { 2 };
        if free < need {
            splits.push(std::mem::take(&mut split));
            free = 15;
        }
        split.push((a, b));
        free -= need;
    }
    if !split.is_empty() {
        splits.push(split);
    }
    splits
}

/// felix's `matchBlockBuilder`: rules that compute, in the scratch0 bit
/// ("all blocks pass"), an OR of matches iptables cannot express in one
/// rule, ANDed across blocks; scratch1 ("this block passes") holds the OR of
/// the second and later positive blocks.
struct MatchBlocks {
    all: u32,
    this: u32,
    positive_blocks: usize,
    rules: Vec<Rule>,
    comment: String,
}

impl MatchBlocks {
    fn using(&self) -> bool {
        !self.rules.is_empty()
    }

    fn initial(&mut self, set_bits: u32) {
        if self.using() {
            return;
        }
        let mask = self.all | self.this;
        self.rules.push(Rule::new(
            &self.comment,
            vec![],
            Some(format!("--jump MARK --set-mark {set_bits:#x}/{mask:#x}")),
        ));
    }

    /// Starts a positive block: returns the bit its rules set.
    fn begin_positive(&mut self) -> u32 {
        self.initial(0);
        if self.positive_blocks == 0 {
            return self.all;
        }
        if self.positive_blocks >= 2 {
            // Deviation from felix, which reuses scratch1 uncleared: a third
            // positive block must not inherit the second block's result.
            self.rules.push(Rule::new(
                &self.comment,
                vec![],
                Some(clear_mark(self.this)),
            ));
        }
        self.this
    }

    fn end_positive(&mut self) {
        if self.positive_blocks >= 1 {
            // all &&= this
            self.rules.push(Rule::new(
                &self.comment,
                vec![mark_clear(self.this)],
                Some(clear_mark(self.all)),
            ));
        }
        self.positive_blocks += 1;
    }

    fn positive(&mut self, alternatives: Vec<Vec<String>>) {
        let bit = self.begin_positive();
        for m in alternatives {
            self.rules
                .push(Rule::new(&self.comment, m, Some(set_mark(bit))));
        }
        self.end_positive();
    }

    fn negated_nets(&mut self, dir: Dir, nets: &[IpNet]) {
        self.initial(self.all);
        for n in nets {
            self.rules.push(Rule::new(
                &self.comment,
                vec![dir.net(false, n)],
                Some(clear_mark(self.all)),
            ));
        }
    }
}

struct Renderer<'a> {
    l: &'a LogicalRuleset,
    family: IpFamily,
    marks: MarkBits,
    ipsets: BTreeMap<String, IpSetSpec>,
    /// Extra chains (dispatch children), already finished.
    extra: BTreeMap<String, Vec<Rule>>,
}

/// Renders the logical ruleset for both families.
pub fn to_iptables(l: &LogicalRuleset) -> IptablesRulesets {
    IptablesRulesets {
        v4: to_iptables_family(l, IpFamily::V4),
        v6: to_iptables_family(l, IpFamily::V6),
    }
}

/// Renders the logical ruleset for one family.
pub fn to_iptables_family(l: &LogicalRuleset, family: IpFamily) -> IptablesRuleset {
    let mut r = Renderer {
        l,
        family,
        marks: l.marks,
        ipsets: BTreeMap::new(),
        extra: BTreeMap::new(),
    };
    let mut chains: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    for chain in l.chains.values() {
        let name = chain_name(&chain.name);
        let rules = r.chain_rules(&chain.rules);
        chains.insert(name, rules);
    }
    chains.append(&mut r.extra);

    let mut hooks = BTreeMap::new();
    let mut appended = BTreeMap::new();
    for (builtin, target) in HOOKS {
        let rules = vec![
            Rule {
                comment: None,
                matches: vec![],
                action: Some(format!("--jump {}", chain_name(target))),
            },
            Rule::new(
                "Policy explicitly accepted packet",
                vec![mark_set(r.marks.accept)],
                Some("--jump ACCEPT".into()),
            ),
        ];
        let mut rules = finish_chain(builtin, &rules);
        if builtin == "FORWARD" {
            appended.insert(builtin.to_owned(), rules.split_off(1));
        }
        hooks.insert(builtin.to_owned(), rules);
    }

    IptablesRuleset {
        family,
        hooks,
        appended,
        chains: chains
            .iter()
            .map(|(name, rules)| (name.clone(), finish_chain(name, rules)))
            .collect(),
        ipsets: r.ipsets,
    }
}

impl Renderer<'_> {
    fn chain_rules(&mut self, rules: &[LRule]) -> Vec<Rule> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match r.action {
                LAction::DispatchFromWorkload | LAction::DispatchToWorkload => {
                    // The rules after the dispatch are the "end rules": they
                    // also end every child chain of the prefix tree.
                    let end = self.chain_rules(&rules[i + 1..]);
                    let to = r.action == LAction::DispatchToWorkload;
                    out.extend(self.dispatch(to, &r.comment, &end));
                    out.extend(end);
                    return out;
                }
                _ => out.extend(self.rule(r)),
            }
        }
        out
    }

    /// felix's `buildSingleDispatchChains`: interface names sorted, grouped
    /// by the character after their common prefix; a group of one is a rule
    /// in the root chain, a larger group gets a child chain
    /// `<root>-<char>` (goto'd on `<prefix><char>+`) ending with the end rules.
    fn dispatch(&mut self, to: bool, comment: &str, end: &[Rule]) -> Vec<Rule> {
        let (root, iface_opt) = if to {
            (crate::logical::CHAIN_TO_WL_DISPATCH, "--out-interface")
        } else {
            (crate::logical::CHAIN_FROM_WL_DISPATCH, "--in-interface")
        };
        let mut names: Vec<(&str, &str)> = self
            .l
            .endpoints
            .values()
            .map(|e| {
                let chain = if to { &e.to_chain } else { &e.from_chain };
                (e.interface.as_str(), chain.as_str())
            })
            .collect();
        names.sort();
        names.dedup_by(|a, b| a.0 == b.0);
        let common = common_prefix(names.iter().map(|(n, _)| *n));
        let mut groups: Vec<(String, Vec<(&str, &str)>)> = Vec::new();
        for (name, chain) in names {
            let prefix = if name.len() > common.len() {
                name[..common.len() + 1].to_owned()
            } else {
                common.clone()
            };
            match groups.last_mut() {
                Some((p, members)) if *p == prefix => members.push((name, chain)),
                _ => groups.push((prefix, vec![(name, chain)])),
            }
        }
        let goto_ep = |name: &str, chain: &str| {
            Rule::new(
                comment,
                vec![format!("{iface_opt} {name}")],
                Some(format!("--goto {}", chain_name(chain))),
            )
        };
        let mut rules = Vec::new();
        for (prefix, members) in groups {
            if members.len() == 1 {
                rules.push(goto_ep(members[0].0, members[0].1));
                continue;
            }
            let child = format!("{root}-{}", &prefix[common.len()..]);
            let child = chain_name(&child);
            rules.push(Rule::new(
                comment,
                vec![format!("{iface_opt} {prefix}+")],
                Some(format!("--goto {child}")),
            ));
            let mut child_rules: Vec<Rule> = members.iter().map(|(n, c)| goto_ep(n, c)).collect();
            child_rules.extend(end.iter().cloned());
            self.extra.insert(child, child_rules);
        }
        rules
    }

    /// One logical rule → its iptables rules in this family (none when it
    /// can never match here).
    fn rule(&mut self, r: &LRule) -> Vec<Rule> {
        let mut conds = Vec::new();
        for c in &r.conditions {
            match c {
                Cond::FromWorkload => {
                    conds.push(format!("--in-interface {WORKLOAD_IFACE_PREFIX}+"))
                }
                Cond::ToWorkload => conds.push(format!("--out-interface {WORKLOAD_IFACE_PREFIX}+")),
                Cond::MarkClear(bits) => conds.push(mark_clear(*bits)),
                Cond::MarkSet(bits) => conds.push(mark_set(*bits)),
                Cond::CtEstablishedRelated => {
                    conds.push("-m conntrack --ctstate RELATED,ESTABLISHED".into())
                }
                Cond::CtInvalid => conds.push("-m conntrack --ctstate INVALID".into()),
                Cond::Icmpv6Type(t) => {
                    if !self.family.is_v6() {
                        return vec![];
                    }
                    conds.push("-p ipv6-icmp".into());
                    conds.push(format!("-m icmp6 --icmpv6-type {t}"));
                }
            }
        }
        let (blocks, main) = match &r.policy_match {
            None => (vec![], conds),
            Some(pm) => match self.policy_match(pm, &r.comment) {
                None => return vec![],
                Some((blocks, mut m)) => {
                    conds.append(&mut m);
                    (blocks, conds)
                }
            },
        };
        let mut out = blocks;
        out.extend(self.action(&r.action, main, &r.comment));
        out
    }

    fn action(&self, a: &LAction, m: Vec<String>, comment: &str) -> Vec<Rule> {
        let one = |action: Option<String>| vec![Rule::new(comment, m.clone(), action)];
        let mark_and_return = |bit: u32| {
            vec![
                Rule::new(comment, m.clone(), Some(set_mark(bit))),
                Rule::new(comment, vec![mark_set(bit)], Some("--jump RETURN".into())),
            ]
        };
        match a {
            LAction::Accept => one(Some("--jump ACCEPT".into())),
            LAction::Drop => one(Some("--jump DROP".into())),
            LAction::Return => one(Some("--jump RETURN".into())),
            LAction::Jump(c) => one(Some(format!("--jump {}", chain_name(c)))),
            LAction::Goto(c) => one(Some(format!("--goto {}", chain_name(c)))),
            LAction::SetMark(bits) => one(Some(set_mark(*bits))),
            LAction::ClearMark(bits) => one(Some(clear_mark(*bits))),
            LAction::AllowReturn => mark_and_return(self.marks.accept),
            LAction::PassReturn => mark_and_return(self.marks.pass),
            LAction::Log(prefix) => one(Some(format!(
                "--jump LOG --log-prefix \"{}\" --log-level {LOG_LEVEL}",
                prefix.replace('"', "'")
            ))),
            LAction::LogDenied {
                prefix,
                group,
                rate_per_second,
            } => {
                // `limit` is a match here too; xt_NFLOG keeps 63 bytes of prefix.
                let mut prefix = prefix.replace('"', "'");
                let mut end = prefix.len().min(NFLOG_PREFIX_MAX);
                while !prefix.is_char_boundary(end) {
                    end -= 1;
                }
                prefix.truncate(end);
                let mut limited = m.clone();
                limited.push(format!("-m limit --limit {rate_per_second}/sec"));
                vec![Rule::new(
                    comment,
                    limited,
                    Some(format!(
                        "--jump NFLOG --nflog-group {group} --nflog-prefix \"{prefix}\""
                    )),
                )]
            }
            LAction::Count => one(None),
            LAction::DispatchFromWorkload | LAction::DispatchToWorkload => {
                unreachable!("dispatch rules are expanded by chain_rules")
            }
        }
    }

    /// A Calico rule's match in this family: the match-block rules (if
    /// any) and the main rule's match fragments. `None` when it can never
    /// match in this family.
    fn policy_match(
        &mut self,
        pm: &PolicyMatch,
        comment: &str,
    ) -> Option<(Vec<Rule>, Vec<String>)> {
        let fam = self.family;
        if !pm.in_family(fam.is_v6()) {
            return None;
        }
        let mut src = self.entity_nets(&pm.src)?;
        let mut dst = self.entity_nets(&pm.dst)?;

        // Protocol: iptables takes one `-p`; ICMP matches need it.
        let mut protocol = pm.protocol;
        let mut not_protocol = pm.not_protocol;
        if pm.icmp.is_some() || pm.not_icmp.is_some() {
            match protocol {
                None => protocol = Some(fam.icmp_protocol()),
                Some(p) if p != fam.icmp_protocol() => return None,
                Some(_) => {}
            }
        }
        if let (Some(p), Some(np)) = (protocol, not_protocol) {
            if p == np {
                return None;
            }
            not_protocol = None; // implied by the positive match
        }
        let proto_frag = protocol.map(|p| format!("-p {}", proto_name(p)));

        let mut blocks = MatchBlocks {
            all: self.marks.scratch0,
            this: self.marks.scratch1,
            positive_blocks: 0,
            rules: vec![],
            comment: comment.to_owned(),
        };
        // Port blocks: more than one multiport split, or numeric and named
        // ports together, are ORed by a block.
        let (src_ports, src_named) = self.ports(&pm.src, Dir::Src, &proto_frag, &mut blocks);
        let (dst_ports, dst_named) = self.ports(&pm.dst, Dir::Dst, &proto_frag, &mut blocks);
        for (nets, dir) in [(&mut src.nets, Dir::Src), (&mut dst.nets, Dir::Dst)] {
            if nets.len() > 1 {
                blocks.positive(nets.iter().map(|n| vec![dir.net(false, n)]).collect());
                nets.clear();
            }
        }
        for (e, dir) in [(&mut src, Dir::Src), (&mut dst, Dir::Dst)] {
            if e.nets.len() + e.not_nets.len() > 1 {
                blocks.negated_nets(dir, &e.not_nets);
                e.not_nets.clear();
            }
        }

        // The main rule, in felix's CalculateRuleMatch order.
        let mut m: Vec<String> = proto_frag.iter().cloned().collect();
        for (e, lm, ports, named, dir) in [
            (&src, &pm.src, &src_ports, &src_named, Dir::Src),
            (&dst, &pm.dst, &dst_ports, &dst_named, Dir::Dst),
        ] {
            if let Some(n) = e.nets.first() {
                m.push(dir.net(false, n));
            }
            if let Some(id) = &lm.selector_set {
                let name = self.ip_set(id);
                m.push(dir.set(false, &name));
            }
            if let Some(p) = ports.first() {
                m.push(dir.ports(false, p));
            }
            if let Some(n) = named {
                m.push(dir.ip_port_set(false, n));
            }
        }
        if let Some((t, code)) = pm.icmp {
            m.push(icmp_match(fam, false, t, code));
        }
        if let Some(np) = not_protocol {
            m.push(format!("! -p {}", proto_name(np)));
        }
        for (e, lm, dir) in [(&src, &pm.src, Dir::Src), (&dst, &pm.dst, Dir::Dst)] {
            if let Some(n) = e.not_nets.first() {
                m.push(dir.net(true, n));
            }
            if let Some(id) = &lm.not_selector_set {
                let name = self.ip_set(id);
                m.push(dir.set(true, &name));
            }
            for split in split_ports(&lm.not_ports) {
                m.push(dir.ports(true, &split));
            }
            if let Some(id) = &lm.not_named_port_set {
                let name = self.ip_set(id);
                m.push(dir.ip_port_set(true, &name));
            }
        }
        if let Some((t, code)) = pm.not_icmp {
            m.push(icmp_match(fam, true, t, code));
        }
        if blocks.using() {
            m.push(mark_set(blocks.all));
        }
        Some((blocks.rules, m))
    }

    /// The entity's port matches: rendered as a match block (returning
    /// nothing for the main rule) when they need more than one rule.
    fn ports(
        &mut self,
        e: &EntityMatch,
        dir: Dir,
        proto_frag: &Option<String>,
        blocks: &mut MatchBlocks,
    ) -> (Vec<Vec<(u16, u16)>>, Option<String>) {
        let splits = split_ports(&e.ports);
        let named = e.named_port_set.as_ref().map(|id| self.ip_set(id));
        if splits.len() + usize::from(named.is_some()) <= 1 {
            return (splits, named);
        }
        let mut alts: Vec<Vec<String>> = splits
            .iter()
            .map(|s| {
                let mut m: Vec<String> = proto_frag.iter().cloned().collect();
                m.push(dir.ports(false, s));
                m
            })
            .collect();
        if let Some(n) = &named {
            alts.push(vec![dir.ip_port_set(false, n)]);
        }
        blocks.positive(alts);
        (vec![], None)
    }

    /// The entity's CIDRs of this family (coalesced); `None` when the rule
    /// can never match here (only other-family CIDRs, or a negated
    /// catch-all, which felix drops the rule for too).
    fn entity_nets(&self, e: &EntityMatch) -> Option<Nets> {
        let v6 = self.family.is_v6();
        let of_family = |nets: &[IpNet]| -> Vec<IpNet> {
            coalesce(
                nets.iter()
                    .copied()
                    .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                    .collect(),
            )
        };
        let nets = of_family(&e.nets);
        if !e.nets.is_empty() && nets.is_empty() {
            return None;
        }
        let not_nets = of_family(&e.not_nets);
        if not_nets.iter().any(|n| n.prefix_len() == 0) {
            return None;
        }
        Some(Nets { nets, not_nets })
    }

    /// The ipset for a logical set id in this family, created on first use.
    fn ip_set(&mut self, id: &str) -> String {
        let name = ipset_name(id, self.family);
        if !self.ipsets.contains_key(&name) {
            let set = &self.l.ip_sets[id];
            let v6 = self.family.is_v6();
            let (kind, members) = if id.starts_with("n:") {
                (
                    IpSetType::HashIpPort,
                    set.members_named
                        .iter()
                        .filter(|(ip, _, _)| ip.is_ipv6() == v6)
                        .map(|(ip, p, port)| format!("{ip},{}:{port}", proto_name(*p)))
                        .collect(),
                )
            } else {
                let nets = if v6 { &set.nets_v6 } else { &set.nets_v4 };
                (
                    IpSetType::HashNet,
                    nets.iter().flat_map(hash_net_members).collect(),
                )
            };
            self.ipsets.insert(
                name.clone(),
                IpSetSpec {
                    kind,
                    family: self.family,
                    maxelem: IPSET_MAXELEM,
                    members,
                },
            );
        }
        name
    }
}

struct Nets {
    nets: Vec<IpNet>,
    not_nets: Vec<IpNet>,
}

/// A CIDR as `hash:net` members: ipset rejects `/0`, so (like felix) it
/// becomes the two `/1` halves.
fn hash_net_members(n: &IpNet) -> Vec<String> {
    if n.prefix_len() == 0 {
        match n {
            IpNet::V4(_) => ["0.0.0.0/1", "128.0.0.0/1"]
                .iter()
                .map(|s| s.parse::<Ipv4Net>().expect("valid").to_string())
                .collect(),
            IpNet::V6(_) => ["::/1", "8000::/1"]
                .iter()
                .map(|s| s.parse::<Ipv6Net>().expect("valid").to_string())
                .collect(),
        }
    } else {
        vec![net_text(n)]
    }
}

fn icmp_match(fam: IpFamily, negate: bool, t: u8, code: Option<u8>) -> String {
    let neg = if negate { "! " } else { "" };
    let tc = match code {
        Some(c) => format!("{t}/{c}"),
        None => t.to_string(),
    };
    match fam {
        IpFamily::V4 => format!("-m icmp {neg}--icmp-type {tc}"),
        IpFamily::V6 => format!("-m icmp6 {neg}--icmpv6-type {tc}"),
    }
}

fn common_prefix<'a>(mut names: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = names.next() else {
        return String::new();
    };
    let mut len = first.len();
    for n in names {
        len = first
            .bytes()
            .zip(n.bytes())
            .take(len)
            .take_while(|(a, b)| a == b)
            .count();
    }
    first[..len].to_owned()
}

/// The `iptables-restore --noflush` input that writes the whole ruleset
/// into a table holding none of it: forward references (`:chain - -`, which
/// also flush a chain that exists) for every chain, the chains' rules, and
/// the hook rules inserted at the top of `FORWARD`/`INPUT` (and appended to
/// `FORWARD`).
pub fn render_restore(rs: &IptablesRuleset) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "*{TABLE}");
    for name in rs.chains.keys() {
        let _ = writeln!(out, ":{name} - -");
    }
    for (name, rules) in &rs.chains {
        for r in rules {
            let _ = writeln!(out, "-A {name} {r}");
        }
    }
    for (builtin, rules) in &rs.hooks {
        // Each insert goes to the top: insert in reverse to keep the order.
        for r in rules.iter().rev() {
            let _ = writeln!(out, "-I {builtin} 1 {r}");
        }
    }
    for (builtin, rules) in &rs.appended {
        for r in rules {
            let _ = writeln!(out, "-A {builtin} {r}");
        }
    }
    let _ = writeln!(out, "COMMIT");
    out
}

/// The `ipset restore` input that creates this family's sets with their
/// members (idempotent: `-exist` everywhere).
pub fn render_ipset_restore(rs: &IptablesRuleset) -> String {
    let mut out = String::new();
    for (name, set) in &rs.ipsets {
        let _ = writeln!(out, "{} -exist", set.create_line(name));
        for m in &set.members {
            let _ = writeln!(out, "add {name} {m} -exist");
        }
    }
    out
}

/// Both families as one text, as `nftpolicy render --backend iptables`
/// would print it: per family the `ipset restore` input, then the
/// `iptables-restore` / `ip6tables-restore` input.
pub fn render(rss: &IptablesRulesets) -> String {
    let mut out = String::new();
    for rs in rss.iter() {
        let (ipt, v) = match rs.family {
            IpFamily::V4 => ("iptables-restore", "IPv4"),
            IpFamily::V6 => ("ip6tables-restore", "IPv6"),
        };
        let _ = writeln!(out, "# {v}: ipset restore");
        out.push_str(&render_ipset_restore(rs));
        let _ = writeln!(out, "# {v}: {ipt} --noflush");
        out.push_str(&render_restore(rs));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_limited_ids_follow_felix() {
        // Exactly 28 and not starting with '_': kept.
        assert_eq!(
            chain_name("cali-pi-default.web-deny-all"),
            "cali-pi-default.web-deny-all"
        );
        // Exactly 28 but starting with '_': hashed.
        let n = chain_name("cali-pi-_efault.web-deny-all");
        assert_eq!(n.len(), 28);
        assert!(n.starts_with("cali-pi-_"), "{n}");
        // Too long: prefix + '_' + 19 hash characters.
        let n = chain_name("cali-pi-default.web-deny-all-x");
        assert_eq!(n.len(), 28);
        assert!(n.starts_with("cali-pi-_"));
        assert_ne!(n, chain_name("cali-pi-default.web-deny-all-y"));
        // sha256("default.web-deny-all-x"), base64url: computed independently.
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(b"default.web-deny-all-x"));
        assert_eq!(n, format!("cali-pi-_{}", &h[..19]));
        // Static names untouched.
        assert_eq!(chain_name("cali-from-wl-dispatch"), "cali-from-wl-dispatch");
    }

    #[test]
    fn port_splits_count_ranges_as_two_slots() {
        let ports: Vec<(u16, u16)> = (1..=14).map(|p| (p, p)).chain([(100, 200)]).collect();
        let s = split_ports(&ports);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].len(), 14);
        assert_eq!(s[1], vec![(100, 200)]);
        assert_eq!(split_ports(&[]).len(), 0);
        let fifteen: Vec<(u16, u16)> = (1..=15).map(|p| (p, p)).collect();
        assert_eq!(split_ports(&fifteen).len(), 1);
    }

    #[test]
    fn comments_are_escaped_like_felix() {
        assert_eq!(
            escape_comment("Clear Calico's mark bits → \"x\""),
            "Clear Calico_s mark bits _ _x_"
        );
        assert_eq!(escape_comment(&"a".repeat(300)).len(), 256);
    }

    #[test]
    fn rule_hash_is_found_in_ours_and_in_save_output() {
        assert_eq!(
            rule_hash(
                r#"-m comment --comment "cali:abcDEF-_12" -m comment --comment "x" -j ACCEPT"#
            ),
            Some("abcDEF-_12")
        );
        assert_eq!(
            rule_hash("-A FORWARD -m comment --comment cali:xyz -j cali-FORWARD"),
            Some("xyz")
        );
        assert_eq!(rule_hash(r#"-m comment --comment "other" -j ACCEPT"#), None);
        assert_eq!(rule_hash("-j ACCEPT"), None);
    }

    #[test]
    fn rule_hashes_chain_through_the_chain() {
        let a = rule_hashes("c", &["x".into(), "y".into()]);
        let b = rule_hashes("c", &["z".into(), "y".into()]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].len(), RULE_HASH_LEN);
        assert_ne!(a[1], b[1], "a rule's hash depends on the rules before it");
        assert_ne!(rule_hashes("d", &["x".into()])[0], a[0], "and on the chain");
    }

    #[test]
    fn common_prefix_of_names() {
        assert_eq!(
            common_prefix(["cali12", "cali13", "cali2"].into_iter()),
            "cali"
        );
        assert_eq!(common_prefix(["cali1"].into_iter()), "cali1");
        assert_eq!(common_prefix(std::iter::empty()), "");
    }
}
