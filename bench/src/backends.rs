//! The three dataplanes measured side by side, behind one interface: apply
//! a cluster state (compile included) and count what the kernel holds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use compiler::nft::{ElementDelta, Ruleset, SetElement, Table};
use compiler::render_iptables::IptablesRulesets;
use compiler::{CompileOptions, IncrementalCompiler, Outcome};
use model::calico::{Resource, ResourceKey};
use model::state::ClusterState;
use programmer::iptables::{Backend as IptBackend, IptablesProgrammer};
use programmer::NftProgrammer;
use serde::{Deserialize, Serialize};

pub const KINDS: [&str; 3] = ["nft-netlink", "nft-cli", "iptables"];

/// Dataplane size, counted from what was applied.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Size {
    pub rules: usize,
    pub chains: usize,
    pub sets: usize,
    pub set_elements: usize,
}

/// Resources changed since the last apply, with their values before.
pub type Changes = BTreeMap<ResourceKey, Option<Resource>>;

pub trait Dataplane {
    /// Compiles `state` (incrementally: `changes` says what changed since
    /// the last apply) and makes the kernel hold it; returns after the
    /// kernel's ack (netlink) or the tool's exit (command lines). All three
    /// use the same incremental compiler, so they differ only in how the
    /// result reaches the kernel.
    fn apply(&mut self, state: &ClusterState, changes: &Changes) -> anyhow::Result<()>;
    fn size(&self) -> Size;
}

pub fn open(kind: &str, node: &str) -> anyhow::Result<Box<dyn Dataplane>> {
    let opts = CompileOptions::new(node);
    Ok(match kind {
        "nft-netlink" => Box::new(NftNetlink {
            programmer: NftProgrammer::new()?,
            compiler: IncrementalCompiler::new(opts),
        }),
        "nft-cli" => Box::new(NftCli {
            compiler: IncrementalCompiler::new(opts),
            last: None,
        }),
        "iptables" => Box::new(Iptables {
            programmer: IptablesProgrammer::new(IptBackend::Legacy),
            compiler: IncrementalCompiler::new(opts),
            last: None,
        }),
        other => bail!("unknown backend {other:?}"),
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

struct NftNetlink {
    programmer: NftProgrammer,
    compiler: IncrementalCompiler,
}

impl Dataplane for NftNetlink {
    fn apply(&mut self, state: &ClusterState, changes: &Changes) -> anyhow::Result<()> {
        match self.compiler.update(state, changes)? {
            Outcome::Elements(delta) => self.programmer.apply_elements(&delta)?,
            Outcome::Patch(patch) => self.programmer.apply_patch(&patch)?,
            Outcome::Rebuilt => self.programmer.apply(self.compiler.ruleset())?,
        };
        Ok(())
    }
    fn size(&self) -> Size {
        nft_size(self.compiler.ruleset())
    }
}

/// `nft -f` the way felix's and kube-proxy's nftables modes drive it: the
/// whole file once, then per transaction flush and re-add changed chains
/// and add/delete set elements, one `nft` process each.
struct NftCli {
    compiler: IncrementalCompiler,
    /// What the kernel holds (nft's own cache, as knftables keeps one).
    last: Option<Ruleset>,
}

impl Dataplane for NftCli {
    fn apply(&mut self, state: &ClusterState, changes: &Changes) -> anyhow::Result<()> {
        let outcome = self.compiler.update(state, changes)?;
        let new = self.compiler.ruleset();
        let script = match (&mut self.last, &outcome) {
            (Some(last), Outcome::Elements(delta)) => {
                delta.apply_to(last);
                delta_script(delta)
            }
            // The whole-ruleset diff nft scripts are written from.
            (Some(old), Outcome::Rebuilt | Outcome::Patch(_)) => diff_script(old, new),
            (None, _) => compiler::render_nft::render(new),
        };
        if !script.trim().is_empty() {
            run_nft(&script)?;
        }
        if matches!(outcome, Outcome::Rebuilt | Outcome::Patch(_)) || self.last.is_none() {
            self.last = Some(new.clone());
        }
        Ok(())
    }
    fn size(&self) -> Size {
        nft_size(self.compiler.ruleset())
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
        let list = |v: &[SetElement]| v.iter().map(element_text).collect::<Vec<_>>().join(", ");
        if !d.remove.is_empty() {
            let _ = writeln!(
                out,
                "delete element {fam} {table} {} {{ {} }}",
                d.set,
                list(&d.remove)
            );
        }
        if !d.add.is_empty() {
            let _ = writeln!(
                adds,
                "add element {fam} {table} {} {{ {} }}",
                d.set,
                list(&d.add)
            );
        }
    }
    out + &adds
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

fn element_text(e: &SetElement) -> String {
    match e {
        SetElement::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
        SetElement::Net(n) => n.to_string(),
        SetElement::Ports { min, max } if min == max => min.to_string(),
        SetElement::Ports { min, max } => format!("{min}-{max}"),
        SetElement::NamedPort(ip, proto, port) => {
            let p = match proto {
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                132 => "sctp".to_owned(),
                n => n.to_string(),
            };
            format!("{ip} . {p} . {port}")
        }
    }
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
    for (cname, c) in &t.chains {
        match o.chains.get(cname) {
            Some(oc) if oc == c => {}
            Some(_) => {
                let _ = writeln!(out, "flush chain {fam} {name} {cname}");
                block.chains.insert(cname.clone(), c.clone());
            }
            None => {
                block.chains.insert(cname.clone(), c.clone());
            }
        }
    }
    for (mname, m) in &t.maps {
        match o.maps.get(mname) {
            Some(om) if om == m => {}
            Some(_) => {
                let _ = writeln!(out, "flush map {fam} {name} {mname}");
                block.maps.insert(mname.clone(), m.clone());
            }
            None => {
                block.maps.insert(mname.clone(), m.clone());
            }
        }
    }
    for (sname, s) in &t.sets {
        match o.sets.get(sname) {
            Some(os) if os.elements == s.elements => {}
            Some(os) => {
                let before: HashSet<&SetElement> = os.elements.iter().collect();
                let after: HashSet<&SetElement> = s.elements.iter().collect();
                let gone: BTreeSet<String> =
                    before.difference(&after).map(|e| element_text(e)).collect();
                let added: BTreeSet<String> =
                    after.difference(&before).map(|e| element_text(e)).collect();
                if !gone.is_empty() {
                    let list: Vec<String> = gone.into_iter().collect();
                    let _ = writeln!(
                        out,
                        "delete element {fam} {name} {sname} {{ {} }}",
                        list.join(", ")
                    );
                }
                if !added.is_empty() {
                    let list: Vec<String> = added.into_iter().collect();
                    let _ = writeln!(
                        adds,
                        "add element {fam} {name} {sname} {{ {} }}",
                        list.join(", ")
                    );
                }
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

struct Iptables {
    programmer: IptablesProgrammer,
    compiler: IncrementalCompiler,
    last: Option<IptablesRulesets>,
}

impl Dataplane for Iptables {
    /// Our iptables mode: render the (incrementally compiled) logical
    /// ruleset and let the programmer send only the changed chains and
    /// ipset members through iptables-restore / ipset restore.
    fn apply(&mut self, state: &ClusterState, changes: &Changes) -> anyhow::Result<()> {
        self.compiler.update(state, changes)?;
        let logical = self.compiler.logical().expect("updated");
        let rs = compiler::render_iptables::to_iptables(logical);
        self.programmer.apply(&rs)?;
        self.last = Some(rs);
        Ok(())
    }
    fn size(&self) -> Size {
        let mut s = Size::default();
        for r in self.last.iter().flat_map(|l| l.iter()) {
            s.chains += r.chains.len();
            s.rules += r.chains.values().map(Vec::len).sum::<usize>()
                + r.hooks.values().map(Vec::len).sum::<usize>()
                + r.appended.values().map(Vec::len).sum::<usize>();
            s.sets += r.ipsets.len();
            s.set_elements += r.ipsets.values().map(|x| x.members.len()).sum::<usize>();
        }
        s
    }
}
