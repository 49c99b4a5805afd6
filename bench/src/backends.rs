//! The three dataplanes measured side by side, each behind the agent's own
//! [`dataplane::Pipeline`] (the same incremental compiler, the same code
//! that moves its output to the kernel): nftables over netlink and iptables
//! mode are the agent's backends; `nft -f` is a [`dataplane::Dataplane`]
//! written here, the way felix's and kube-proxy's nftables modes drive nft.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use compiler::nft::{ElementDelta, Ruleset, SetElement, Table};
use compiler::CompileOptions;
use dataplane::{Change, Dataplane, Desired, Kind, Pipeline, TableGroups};
use model::state::ClusterState;
use serde::{Deserialize, Serialize};

pub use dataplane::Changes;

pub const KINDS: [&str; 3] = ["nft-netlink", "nft-cli", "iptables"];

/// The scale runs' backends: [`KINDS`] (`nft-netlink` is one table per
/// family, `--table-groups 1`) and the agent's nftables backend as it runs
/// by default, `--table-groups auto`: one table on a small ruleset, six
/// namespace groups' tables at 10,000 policies, the count that keeps a
/// policy add under 10× a pod relabel there (README, Table groups,
/// measured). Not in the per-packet sweep, which compares the chain walk
/// with the fused lookup in one table: a group adds one table's forward
/// chain to each packet's walk, measured apart (`bench --example
/// split_packet_cost`).
pub const SCALE_KINDS: [&str; 4] = ["nft-netlink", GROUPED_KIND, "nft-cli", "iptables"];

/// The agent's default nftables backend in [`SCALE_KINDS`].
pub const GROUPED_KIND: &str = "nft-netlink-auto";

/// Dataplane size, counted from what was applied.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Size {
    pub rules: usize,
    pub chains: usize,
    pub sets: usize,
    pub set_elements: usize,
}

/// One measured dataplane.
pub struct Measured {
    pipeline: Pipeline,
}

impl Measured {
    /// Compiles `state` (incrementally: `changes` says what changed since
    /// the last apply) and makes the kernel hold it; returns after the
    /// kernel's ack (netlink) or the tool's exit (command lines).
    pub fn apply(&mut self, state: &ClusterState, changes: &Changes) -> anyhow::Result<()> {
        Ok(self.pipeline.apply(state, changes)?)
    }

    /// Tables per family the nftables backend cut its ruleset into (0 for
    /// the others).
    pub fn table_groups(&self) -> usize {
        self.pipeline.dataplane().stats().table_groups as usize
    }

    pub fn size(&self) -> Size {
        let Some(logical) = self.pipeline.logical() else {
            return Size::default();
        };
        if self.pipeline.dataplane().kind() == Kind::Iptables {
            return iptables_size(&compiler::render_iptables::to_iptables(logical));
        }
        nft_size(self.pipeline.compiler().ruleset())
    }
}

/// Compile options a measured dataplane may vary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// `--fused-lookup` (nftables only).
    pub fused_lookup: bool,
}

pub fn open(kind: &str, node: &str) -> anyhow::Result<Measured> {
    open_with(kind, node, &Options::default())
}

pub fn open_with(kind: &str, node: &str, options: &Options) -> anyhow::Result<Measured> {
    if options.fused_lookup && kind == "iptables" {
        bail!("iptables mode has no fused form");
    }
    // `nft-netlink-g<N>`: the agent's `--table-groups N`;
    // `nft-netlink-auto`: its default, `--table-groups auto`.
    let groups = kind.strip_prefix("nft-netlink-g").map(str::parse::<usize>);
    let backend: Box<dyn Dataplane> = match (kind, groups) {
        (_, Some(Ok(n))) if n > 0 => dataplane::open_grouped(
            Kind::Nftables,
            iptables::Backend::Legacy,
            TableGroups::Fixed(n),
        )?,
        ("nft-netlink-auto", _) => {
            dataplane::open_grouped(Kind::Nftables, iptables::Backend::Legacy, TableGroups::Auto)?
        }
        ("nft-netlink", _) => dataplane::open(Kind::Nftables, iptables::Backend::Legacy)?,
        ("nft-cli", _) => Box::new(NftCli { last: None }),
        ("iptables", _) => dataplane::open(Kind::Iptables, iptables::Backend::Legacy)?,
        (other, _) => bail!("unknown backend {other:?}"),
    };
    let compile = CompileOptions {
        fused_lookup: options.fused_lookup,
        ..CompileOptions::new(node)
    };
    Ok(Measured {
        pipeline: Pipeline::new(compile, backend),
    })
}

fn nft_size(rs: &Ruleset) -> Size {
    let mut s = Size::default();
    for t in &rs.tables {
        s.chains += t.chains.len();
        s.rules += t.chains.values().map(|c| c.rules.len()).sum::<usize>();
        s.sets += t.sets.len() + t.maps.len();
        s.set_elements += t.sets.values().map(|x| x.elements.len()).sum::<usize>()
            + t.maps.values().map(|m| m.elements.len()).sum::<usize>();
    }
    s
}

fn iptables_size(rs: &compiler::render_iptables::IptablesRulesets) -> Size {
    let mut s = Size::default();
    for r in rs.iter() {
        s.chains += r.chains.len();
        s.rules += r.chains.values().map(Vec::len).sum::<usize>()
            + r.hooks.values().map(Vec::len).sum::<usize>()
            + r.appended.values().map(Vec::len).sum::<usize>();
        s.sets += r.ipsets.len();
        s.set_elements += r.ipsets.values().map(|x| x.members.len()).sum::<usize>();
    }
    s
}

/// `nft -f` the way felix's and kube-proxy's nftables modes drive it: the
/// whole file once, then per transaction flush and re-add changed chains
/// and add/delete set elements, one `nft` process each.
struct NftCli {
    /// What the kernel holds (nft's own cache, as knftables keeps one).
    last: Option<Ruleset>,
}

impl Dataplane for NftCli {
    fn kind(&self) -> Kind {
        Kind::Nftables
    }

    fn apply(&mut self, desired: &Desired<'_>) -> Result<(), dataplane::Error> {
        let new = desired.ruleset;
        let script = match (&mut self.last, desired.change) {
            (Some(last), Change::Elements(delta)) => {
                delta.apply_to(last);
                delta_script(delta)
            }
            // The whole-ruleset diff nft scripts are written from.
            (Some(old), Change::Full | Change::Patch(_)) => diff_script(old, new),
            (None, _) => compiler::render_nft::render(new),
        };
        if !script.trim().is_empty() {
            run_nft(&script).map_err(|e| dataplane::Error::Backend(e.into()))?;
        }
        if !matches!(desired.change, Change::Elements(_)) || self.last.is_none() {
            self.last = Some(new.clone());
        }
        Ok(())
    }

    /// nft's cache is all the bench keeps; it never looks for drift.
    fn has_drift(&mut self, _desired: &Desired<'_>) -> Result<bool, dataplane::Error> {
        Ok(false)
    }

    /// Keeps nft's cache: the whole-ruleset diff is written from it.
    fn invalidate(&mut self) -> Result<(), dataplane::Error> {
        Ok(())
    }

    fn remove_other(&mut self) -> Result<(), dataplane::Error> {
        Ok(())
    }
}

/// `delete element` / `add element` lines for a member-only change, the
/// way felix's nftables mode updates set members.
pub fn delta_script(delta: &ElementDelta) -> String {
    let mut out = String::new();
    let mut adds = String::new();
    for d in &delta.sets {
        let fam = d.family.keyword();
        let table = compiler::nft::TABLE_NAME;
        let set = (fam, table, d.set.as_str());
        element_line(&mut out, "delete", set, d.remove.iter().map(element_text));
        element_line(&mut adds, "add", set, d.add.iter().map(element_text));
    }
    out + &adds
}

/// `<verb> element <family> <table> <set> { … }` for `elements`; nothing
/// when there are none.
fn element_line(
    script: &mut String,
    verb: &str,
    (family, table, set): (&str, &str, &str),
    elements: impl IntoIterator<Item = String>,
) {
    let list: Vec<String> = elements.into_iter().collect();
    if !list.is_empty() {
        let list = list.join(", ");
        let _ = writeln!(script, "{verb} element {family} {table} {set} {{ {list} }}");
    }
}

fn run_nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let head: String = script.lines().take(40).collect::<Vec<_>>().join("\n");
        bail!(
            "nft -f failed: {}\nscript head:\n{head}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An element as nft writes it (the renderer's spelling).
fn element_text(e: &SetElement) -> String {
    compiler::render_nft::element(e)
}

/// The `nft -f` text turning `old` into `new` incrementally.
pub fn diff_script(old: &Ruleset, new: &Ruleset) -> String {
    let mut out = String::new();
    for t in &new.tables {
        match old
            .tables
            .iter()
            .find(|o| o.family == t.family && o.name == t.name)
        {
            None => compiler::render_nft::render_table(t, &mut out),
            Some(o) => diff_table(o, t, &mut out),
        }
    }
    for o in &old.tables {
        if !new
            .tables
            .iter()
            .any(|t| t.family == o.family && t.name == o.name)
        {
            let _ = writeln!(out, "delete table {} {}", o.family.keyword(), o.name);
        }
    }
    out
}

/// Copies into `block` what in `new` differs from `old` (to be re-added),
/// calling `flush` first for each that exists already.
fn changed_objects<T: Clone + PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    block: &mut BTreeMap<String, T>,
    mut flush: impl FnMut(&str),
) {
    for (name, obj) in new {
        match old.get(name) {
            Some(o) if o == obj => continue,
            Some(_) => flush(name),
            None => {}
        }
        block.insert(name.clone(), obj.clone());
    }
}

fn diff_table(o: &Table, t: &Table, out: &mut String) {
    let fam = t.family.keyword();
    let name = &t.name;
    let mut block = Table {
        family: t.family,
        name: t.name.clone(),
        sets: Default::default(),
        maps: Default::default(),
        chains: Default::default(),
    };
    let mut adds = String::new();
    changed_objects(&o.chains, &t.chains, &mut block.chains, |c| {
        let _ = writeln!(out, "flush chain {fam} {name} {c}");
    });
    changed_objects(&o.maps, &t.maps, &mut block.maps, |m| {
        let _ = writeln!(out, "flush map {fam} {name} {m}");
    });
    // A set whose type changed (hash ↔ interval) is deleted and created
    // again, under chains flushed and refilled (nft cannot retype a set,
    // nor delete one a rule uses).
    let retyped: BTreeSet<&str> = t
        .sets
        .iter()
        .filter(|(n, s)| o.sets.get(*n).is_some_and(|os| os.key != s.key))
        .map(|(n, _)| n.as_str())
        .collect();
    for (cname, c) in &t.chains {
        let unchanged = o.chains.get(cname) == Some(c);
        if unchanged && compiler::nft::referenced_sets(c).any(|s| retyped.contains(s)) {
            let _ = writeln!(out, "flush chain {fam} {name} {cname}");
            block.chains.insert(cname.clone(), c.clone());
        }
    }
    for sname in &retyped {
        let _ = writeln!(out, "delete set {fam} {name} {sname}");
        block
            .sets
            .insert((*sname).to_owned(), t.sets[*sname].clone());
    }
    for (sname, s) in &t.sets {
        match o.sets.get(sname) {
            _ if retyped.contains(sname.as_str()) => {}
            Some(os) if os.elements == s.elements => {}
            Some(os) => {
                let before: HashSet<&SetElement> = os.elements.iter().collect();
                let after: HashSet<&SetElement> = s.elements.iter().collect();
                let gone: BTreeSet<String> =
                    before.difference(&after).map(|e| element_text(e)).collect();
                let added: BTreeSet<String> =
                    after.difference(&before).map(|e| element_text(e)).collect();
                element_line(out, "delete", (fam, name, sname), gone);
                element_line(&mut adds, "add", (fam, name, sname), added);
            }
            None => {
                block.sets.insert(sname.clone(), s.clone());
            }
        }
    }
    if !(block.chains.is_empty() && block.maps.is_empty() && block.sets.is_empty()) {
        compiler::render_nft::render_table(&block, out);
    }
    out.push_str(&adds);
    for cname in o.chains.keys().filter(|c| !t.chains.contains_key(*c)) {
        let _ = writeln!(out, "delete chain {fam} {name} {cname}");
    }
    for mname in o.maps.keys().filter(|m| !t.maps.contains_key(*m)) {
        let _ = writeln!(out, "delete map {fam} {name} {mname}");
    }
    for sname in o.sets.keys().filter(|s| !t.sets.contains_key(*s)) {
        let _ = writeln!(out, "delete set {fam} {name} {sname}");
    }
}
