//! The iptables backend: programs [`compiler::render_iptables`] rulesets
//! with `iptables-restore` / `ip6tables-restore` and `ipset restore`,
//! incrementally, the way felix's iptables mode does:
//!
//! 1. `ipset restore`: create new sets, add and delete members of existing
//!    ones (a set whose type or size changed is rebuilt in a temporary set
//!    `cali4t<n>` and swapped in);
//! 2. per family, one `iptables-restore --noflush` transaction rewriting
//!    only the chains whose `cali:` rule hashes differ (a forward reference
//!    `:chain - -` creates or flushes the chain, then its rules are
//!    appended), creating new chains, fixing our hook rules — jumps at the
//!    top of `FORWARD` / `INPUT`, `FORWARD`'s accept appended at its end as
//!    felix does, so other software's rules still see accepted packets
//!    (recognised by their `cali:` comment, never duplicated) — and
//!    deleting chains no longer wanted (flushed, then `-X`
//!    once nothing refers to them);
//! 3. `ipset restore` destroying sets no longer wanted — only after the
//!    rules that used them are gone.
//!
//! Nothing is written when nothing changed. The programmer owns chains
//! named `cali-…`, rules with a `cali:` comment in other chains, and ipsets
//! named `cali40…`, `cali60…`, `cali4t…`, `cali6t…`; it never flushes a
//! built-in chain and never touches anything else.
//!
//! The kernel state is read back (`iptables-save -t filter`, `ipset save`)
//! on the first apply — adopting what a previous run left — after a failed
//! apply, and whenever [`IptablesProgrammer::invalidate`] is called (felix's
//! periodic refresh), so drift is found and repaired.
//!
//! Commands run in the current network namespace, or behind a command
//! prefix such as `ip netns exec NS` ([`IptablesProgrammer::with_command_prefix`]).

pub mod table_size;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::str::FromStr;

use compiler::render_iptables::{
    rule_hash, IpFamily, IpSetSpec, IptablesRuleset, IptablesRulesets, OWNED_CHAIN_PREFIX, TABLE,
};
use tracing::{debug, info, warn};

/// Which iptables binaries to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-legacy-restore` & co (x_tables).
    #[default]
    Legacy,
    /// `iptables-nft-restore` & co (x_tables rules over nf_tables).
    Nft,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "legacy" => Ok(Backend::Legacy),
            "nft" => Ok(Backend::Nft),
            _ => Err(format!("unknown iptables backend {s:?} (legacy or nft)")),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        })
    }
}

/// The binaries used, by family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub restore_v4: String,
    pub save_v4: String,
    pub restore_v6: String,
    pub save_v6: String,
    pub ipset: String,
}

impl Tools {
    pub fn for_backend(backend: Backend) -> Tools {
        let b = backend.to_string();
        Tools {
            restore_v4: format!("iptables-{b}-restore"),
            save_v4: format!("iptables-{b}-save"),
            restore_v6: format!("ip6tables-{b}-restore"),
            save_v6: format!("ip6tables-{b}-save"),
            ipset: "ipset".into(),
        }
    }

    fn restore(&self, f: IpFamily) -> &str {
        match f {
            IpFamily::V4 => &self.restore_v4,
            IpFamily::V6 => &self.restore_v6,
        }
    }

    fn save(&self, f: IpFamily) -> &str {
        match f {
            IpFamily::V4 => &self.save_v4,
            IpFamily::V6 => &self.save_v6,
        }
    }
}

/// Errors, by the operation that failed. `command` is the command line,
/// `status` its exit status (or why it could not start), `stderr` what it
/// printed; restore errors also carry the input line the tool reported.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{family} iptables-restore failed: `{command}` {status}: {stderr}{}", show_line(.failed_line))]
    IptablesRestore {
        family: IpFamily,
        command: String,
        status: String,
        stderr: String,
        /// (1-based line number, the line) of our input the tool rejected.
        failed_line: Option<(usize, String)>,
    },
    #[error("{family} iptables-save failed: `{command}` {status}: {stderr}")]
    IptablesSave {
        family: IpFamily,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("ipset restore failed: `{command}` {status}: {stderr}{}", show_line(.failed_line))]
    IpsetRestore {
        command: String,
        status: String,
        stderr: String,
        failed_line: Option<(usize, String)>,
    },
    #[error("ipset save failed: `{command}` {status}: {stderr}")]
    IpsetSave {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot parse the output of `{command}`, line {line}: {reason}")]
    Parse {
        command: String,
        line: usize,
        reason: String,
    },
}

fn show_line(l: &Option<(usize, String)>) -> String {
    match l {
        Some((n, text)) => format!(" (input line {n}: {text})"),
        None => String::new(),
    }
}

/// What one apply (or [`IptablesProgrammer::remove_all`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The kernel state was read back before deciding what to write.
    pub read_back: bool,
    pub iptables_save_calls: u32,
    pub ipset_save_calls: u32,
    pub iptables_restore_calls: u32,
    pub ipset_restore_calls: u32,
    /// Chains created or rewritten.
    pub chains_written: Vec<(IpFamily, String)>,
    pub chains_deleted: Vec<(IpFamily, String)>,
    /// Built-in chains whose hook rules were (re)inserted or removed.
    pub hooks_written: Vec<(IpFamily, String)>,
    pub sets_created: Vec<String>,
    /// Sets rebuilt because their type or size changed.
    pub sets_replaced: Vec<String>,
    pub sets_destroyed: Vec<String>,
    pub members_added: usize,
    pub members_removed: usize,
}

impl Report {
    /// Nothing needed changing.
    pub fn is_noop(&self) -> bool {
        self.chains_written.is_empty()
            && self.chains_deleted.is_empty()
            && self.hooks_written.is_empty()
            && self.sets_created.is_empty()
            && self.sets_replaced.is_empty()
            && self.sets_destroyed.is_empty()
            && self.members_added == 0
            && self.members_removed == 0
    }
}

/// Running totals, for metrics (felix's `felix_iptables_restore_calls`,
/// `…_errors`, and the same for save and ipset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub applies: u64,
    pub apply_errors: u64,
    pub iptables_restore_calls: u64,
    pub iptables_restore_errors: u64,
    pub iptables_save_calls: u64,
    pub iptables_save_errors: u64,
    pub ipset_calls: u64,
    pub ipset_errors: u64,
}

/// A rule in a chain we do not own, as `iptables-save` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherRule {
    /// Its `cali:` hash when it is one of ours.
    pub hash: Option<String>,
    /// The rule's arguments after `-A <chain>`.
    pub args: String,
}

/// One family's `filter` table as far as it concerns us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    /// Our chains → the `cali:` hash of each rule (`""` for a rule without).
    pub chains: BTreeMap<String, Vec<String>>,
    /// `FORWARD`, `INPUT` and any other chain we do not own that holds a
    /// rule of ours: all its rules, in order.
    pub others: BTreeMap<String, Vec<OtherRule>>,
}

/// One of our ipsets as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    /// `hash:net`, `hash:ip,port`, or whatever else someone made.
    pub kind: String,
    /// `inet` / `inet6`.
    pub family: String,
    pub maxelem: u32,
    pub members: BTreeSet<String>,
}

impl SetState {
    fn from_spec(s: &IpSetSpec) -> SetState {
        SetState {
            kind: s.kind.as_str().to_owned(),
            family: s.family.ipset_family().to_owned(),
            maxelem: s.maxelem,
            members: s.members.clone(),
        }
    }

    fn same_metadata(&self, s: &IpSetSpec) -> bool {
        self.kind == s.kind.as_str()
            && self.family == s.family.ipset_family()
            && self.maxelem == s.maxelem
    }
}

/// Everything of ours in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub v4: TableState,
    pub v6: TableState,
    pub ipsets: BTreeMap<String, SetState>,
}

impl KernelState {
    pub fn table(&self, f: IpFamily) -> &TableState {
        match f {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    fn table_mut(&mut self, f: IpFamily) -> &mut TableState {
        match f {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// Is this ipset name one of ours?
pub fn owns_set(name: &str) -> bool {
    IpFamily::of_set_name(name).is_some()
}

/// Is this chain one of ours?
pub fn owns_chain(name: &str) -> bool {
    name.starts_with(OWNED_CHAIN_PREFIX)
}

/// Built-in chains that always carry our hooks.
const HOOK_CHAINS: [&str; 2] = ["FORWARD", "INPUT"];

#[derive(Debug)]
pub struct IptablesProgrammer {
    backend: Backend,
    tools: Tools,
    prefix: Vec<String>,
    lock_wait_secs: u32,
    /// What we believe the kernel holds; `None` = read it back first.
    state: Option<KernelState>,
    stats: Stats,
}

/// Output of a command that ran.
struct Ran {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl IptablesProgrammer {
    pub fn new(backend: Backend) -> IptablesProgrammer {
        IptablesProgrammer {
            backend,
            tools: Tools::for_backend(backend),
            prefix: Vec::new(),
            lock_wait_secs: 10,
            state: None,
            stats: Stats::default(),
        }
    }

    /// Runs every command behind this prefix (e.g. `ip netns exec NS`).
    pub fn with_command_prefix<S: Into<String>>(
        mut self,
        prefix: impl IntoIterator<Item = S>,
    ) -> Self {
        self.prefix = prefix.into_iter().map(Into::into).collect();
        self
    }

    /// Overrides the binaries (tests, unusual installs).
    pub fn with_tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    /// Seconds iptables-restore waits for the xtables lock (`-w`).
    pub fn with_lock_wait(mut self, secs: u32) -> Self {
        self.lock_wait_secs = secs;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What we believe the kernel holds (after a successful apply: the
    /// desired state), `None` when it will be read back first.
    pub fn believed_state(&self) -> Option<&KernelState> {
        self.state.as_ref()
    }

    /// Forget what we believe the kernel holds: the next apply reads it back
    /// and repairs any drift (felix's periodic refresh).
    pub fn invalidate(&mut self) {
        self.state = None;
    }

    /// Makes the kernel hold `desired`, writing only what differs.
    pub fn apply(&mut self, desired: &IptablesRulesets) -> Result<Report, Error> {
        let mut report = Report::default();
        self.stats.applies += 1;
        let res = self.apply_inner(desired, &mut report);
        if let Err(e) = &res {
            self.stats.apply_errors += 1;
            warn!(error = %e, "iptables apply failed; the kernel state will be read back");
            self.state = None;
        } else if !report.is_noop() {
            info!(
                chains_written = report.chains_written.len(),
                chains_deleted = report.chains_deleted.len(),
                sets_created = report.sets_created.len(),
                members_added = report.members_added,
                members_removed = report.members_removed,
                "iptables dataplane updated"
            );
        }
        res.map(|()| report)
    }

    /// Reads the kernel back and tells what [`apply`](Self::apply) would
    /// change to reach `desired` (without changing anything). The state read
    /// is kept, so a following apply repairs exactly that.
    pub fn drift(&mut self, desired: &IptablesRulesets) -> Result<Report, Error> {
        let mut report = Report {
            read_back: true,
            ..Report::default()
        };
        let kernel = self.read_kernel(&mut report)?;
        let plan = plan(&kernel, desired, self.backend);
        self.state = Some(kernel);
        plan.describe(&mut report);
        Ok(report)
    }

    /// Removes everything of ours: hook rules, `cali-` chains, our ipsets
    /// (for switching to another backend). Reads the kernel first, so it
    /// also cleans up after another process or an older run.
    pub fn remove_all(&mut self) -> Result<Report, Error> {
        let mut report = Report {
            read_back: true,
            ..Report::default()
        };
        self.state = None;
        let kernel = self.read_kernel(&mut report)?;
        let empty = IptablesRulesets {
            v4: empty_ruleset(IpFamily::V4),
            v6: empty_ruleset(IpFamily::V6),
        };
        let plan = plan(&kernel, &empty, self.backend);
        self.execute(&plan, &mut report)?;
        self.state = None;
        Ok(report)
    }

    /// Reads what the kernel holds of ours (both families and the ipsets).
    pub fn read_kernel(&mut self, report: &mut Report) -> Result<KernelState, Error> {
        let mut state = KernelState::default();
        for f in IpFamily::ALL {
            let save = self.tools.save(f).to_owned();
            let args = ["-t", TABLE];
            report.iptables_save_calls += 1;
            self.stats.iptables_save_calls += 1;
            let ran = self.run(&save, &args, None);
            let command = self.command_line(&save, &args);
            let ran = match ran {
                Ok(r) if r.ok => r,
                Ok(r) if r.stderr.contains("does not exist") => Ran {
                    stdout: String::new(),
                    ..r
                },
                Ok(r) => {
                    self.stats.iptables_save_errors += 1;
                    return Err(Error::IptablesSave {
                        family: f,
                        command,
                        status: r.status,
                        stderr: r.stderr,
                    });
                }
                Err(status) => {
                    self.stats.iptables_save_errors += 1;
                    return Err(Error::IptablesSave {
                        family: f,
                        command,
                        status,
                        stderr: String::new(),
                    });
                }
            };
            *state.table_mut(f) = parse_iptables_save(&ran.stdout, &command)?;
        }
        let ipset = self.tools.ipset.clone();
        report.ipset_save_calls += 1;
        self.stats.ipset_calls += 1;
        let command = self.command_line(&ipset, &["save"]);
        match self.run(&ipset, &["save"], None) {
            Ok(r) if r.ok => state.ipsets = parse_ipset_save(&r.stdout, &command)?,
            Ok(r) => {
                self.stats.ipset_errors += 1;
                return Err(Error::IpsetSave {
                    command,
                    status: r.status,
                    stderr: r.stderr,
                });
            }
            Err(status) => {
                self.stats.ipset_errors += 1;
                return Err(Error::IpsetSave {
                    command,
                    status,
                    stderr: String::new(),
                });
            }
        }
        Ok(state)
    }

    fn apply_inner(
        &mut self,
        desired: &IptablesRulesets,
        report: &mut Report,
    ) -> Result<(), Error> {
        let kernel = match self.state.take() {
            Some(s) => s,
            None => {
                report.read_back = true;
                self.read_kernel(report)?
            }
        };
        let plan = plan(&kernel, desired, self.backend);
        // Keep the belief consistent step by step: if a later step fails,
        // the error path drops it anyway.
        self.state = Some(kernel);
        self.execute(&plan, report)?;
        self.state = Some(plan.after);
        Ok(())
    }

    fn execute(&mut self, plan: &Plan, report: &mut Report) -> Result<(), Error> {
        plan.describe(report);
        if !plan.ipset_pre.is_empty() {
            self.ipset_restore(&plan.ipset_pre, report)?;
        }
        for f in IpFamily::ALL {
            if let Some(script) = plan.tables.get(&f) {
                self.iptables_restore(f, script, report)?;
            }
        }
        if !plan.ipset_post.is_empty() {
            self.ipset_restore(&plan.ipset_post, report)?;
        }
        Ok(())
    }

    fn iptables_restore(
        &mut self,
        f: IpFamily,
        script: &str,
        report: &mut Report,
    ) -> Result<(), Error> {
        let bin = self.tools.restore(f).to_owned();
        let wait = self.lock_wait_secs.to_string();
        let args = ["--noflush", "-w", wait.as_str()];
        debug!(family = %f, "{bin} input:\n{script}");
        report.iptables_restore_calls += 1;
        self.stats.iptables_restore_calls += 1;
        let command = self.command_line(&bin, &args);
        let (status, stderr) = match self.run(&bin, &args, Some(script)) {
            Ok(r) if r.ok => return Ok(()),
            Ok(r) => (r.status, r.stderr),
            Err(status) => (status, String::new()),
        };
        self.stats.iptables_restore_errors += 1;
        let failed_line = failed_line(&stderr, script, &["Error occurred at line: ", "line "]);
        Err(Error::IptablesRestore {
            family: f,
            command,
            status,
            stderr: stderr.trim().to_owned(),
            failed_line,
        })
    }

    fn ipset_restore(&mut self, script: &str, report: &mut Report) -> Result<(), Error> {
        let bin = self.tools.ipset.clone();
        debug!("ipset restore input:\n{script}");
        report.ipset_restore_calls += 1;
        self.stats.ipset_calls += 1;
        let command = self.command_line(&bin, &["restore"]);
        let (status, stderr) = match self.run(&bin, &["restore"], Some(script)) {
            Ok(r) if r.ok => return Ok(()),
            Ok(r) => (r.status, r.stderr),
            Err(status) => (status, String::new()),
        };
        self.stats.ipset_errors += 1;
        let failed_line = failed_line(&stderr, script, &["Error in line "]);
        Err(Error::IpsetRestore {
            command,
            status,
            stderr: stderr.trim().to_owned(),
            failed_line,
        })
    }

    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut words: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        words.push(program);
        words.extend(args);
        words.join(" ")
    }

    /// Runs a command; `Err` only when it could not be started.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Ran, String> {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("could not be started: {e}"))?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            // A tool that fails early closes its stdin: its exit status and
            // stderr tell more than the broken pipe.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("could not be waited for: {e}"))?;
        Ok(Ran {
            ok: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn empty_ruleset(family: IpFamily) -> IptablesRuleset {
    IptablesRuleset {
        family,
        hooks: BTreeMap::new(),
        appended: BTreeMap::new(),
        chains: BTreeMap::new(),
        ipsets: BTreeMap::new(),
    }
}

/// Finds "<marker><N>" in a tool's stderr and returns line N of its input.
fn failed_line(stderr: &str, input: &str, markers: &[&str]) -> Option<(usize, String)> {
    for marker in markers {
        for (at, _) in stderr.match_indices(marker) {
            let digits: String = stderr[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                if let Some(line) = input.lines().nth(n.saturating_sub(1)) {
                    return Some((n, line.to_owned()));
                }
            }
        }
    }
    None
}

/// Parses `iptables-save -t filter` output.
pub fn parse_iptables_save(text: &str, command: &str) -> Result<TableState, Error> {
    let mut state = TableState::default();
    let mut others: BTreeMap<String, Vec<OtherRule>> = BTreeMap::new();
    let mut in_filter = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table == TABLE;
            continue;
        }
        if line == "COMMIT" || !in_filter {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if owns_chain(name) {
                state.chains.entry(name.to_owned()).or_default();
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            return Err(Error::Parse {
                command: command.to_owned(),
                line: i + 1,
                reason: format!("unexpected line {line:?}"),
            });
        };
        let (chain, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let hash = rule_hash(args).map(str::to_owned);
        if owns_chain(chain) {
            state
                .chains
                .entry(chain.to_owned())
                .or_default()
                .push(hash.unwrap_or_default());
        } else {
            others.entry(chain.to_owned()).or_default().push(OtherRule {
                hash,
                args: args.to_owned(),
            });
        }
    }
    state.others = others
        .into_iter()
        .filter(|(chain, rules)| {
            HOOK_CHAINS.contains(&chain.as_str()) || rules.iter().any(|r| r.hash.is_some())
        })
        .collect();
    Ok(state)
}

/// Parses `ipset save` output, keeping only our sets.
pub fn parse_ipset_save(text: &str, command: &str) -> Result<BTreeMap<String, SetState>, Error> {
    let mut sets: BTreeMap<String, SetState> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = |reason: &str| Error::Parse {
            command: command.to_owned(),
            line: i + 1,
            reason: format!("{reason}: {line:?}"),
        };
        match words.as_slice() {
            [] => {}
            ["create", name, kind, opts @ ..] => {
                if !owns_set(name) {
                    continue;
                }
                let opt = |key: &str| {
                    opts.windows(2)
                        .find(|w| w[0] == key)
                        .map(|w| w[1].to_owned())
                };
                sets.insert(
                    (*name).to_owned(),
                    SetState {
                        kind: (*kind).to_owned(),
                        family: opt("family").unwrap_or_default(),
                        maxelem: opt("maxelem")
                            .map(|m| m.parse().map_err(|_| bad("bad maxelem")))
                            .transpose()?
                            .unwrap_or(65536),
                        members: BTreeSet::new(),
                    },
                );
            }
            ["add", name, member, ..] => {
                if let Some(set) = sets.get_mut(*name) {
                    set.members.insert((*member).to_owned());
                } else if owns_set(name) {
                    return Err(bad("member of a set not created before"));
                }
            }
            _ => return Err(bad("unexpected line")),
        }
    }
    Ok(sets)
}

/// What to run to go from `kernel` to `desired`, and the state after.
#[derive(Debug, Default)]
struct Plan {
    ipset_pre: String,
    tables: BTreeMap<IpFamily, String>,
    ipset_post: String,
    chains_written: Vec<(IpFamily, String)>,
    chains_deleted: Vec<(IpFamily, String)>,
    hooks_written: Vec<(IpFamily, String)>,
    sets_created: Vec<String>,
    sets_replaced: Vec<String>,
    sets_destroyed: Vec<String>,
    members_added: usize,
    members_removed: usize,
    after: KernelState,
}

impl Plan {
    fn describe(&self, r: &mut Report) {
        r.chains_written.extend(self.chains_written.iter().cloned());
        r.chains_deleted.extend(self.chains_deleted.iter().cloned());
        r.hooks_written.extend(self.hooks_written.iter().cloned());
        r.sets_created.extend(self.sets_created.iter().cloned());
        r.sets_replaced.extend(self.sets_replaced.iter().cloned());
        r.sets_destroyed.extend(self.sets_destroyed.iter().cloned());
        r.members_added += self.members_added;
        r.members_removed += self.members_removed;
    }
}

fn plan(kernel: &KernelState, desired: &IptablesRulesets, backend: Backend) -> Plan {
    let mut p = Plan::default();
    plan_sets(kernel, desired, &mut p);
    for rs in desired.iter() {
        let f = rs.family;
        let (script, after) = plan_table(f, kernel.table(f), rs, backend, &mut p);
        if let Some(s) = script {
            p.tables.insert(f, s);
        }
        *p.after.table_mut(f) = after;
    }
    p
}

fn plan_sets(kernel: &KernelState, desired: &IptablesRulesets, p: &mut Plan) {
    let wanted: BTreeMap<&String, &IpSetSpec> =
        desired.iter().flat_map(|rs| rs.ipsets.iter()).collect();
    let mut pre = String::new();
    let mut temp_n = 0u32;
    for (name, spec) in &wanted {
        let fill = |out: &mut String, set: &str| {
            let _ = writeln!(out, "{} -exist", spec.create_line(set));
            for m in &spec.members {
                let _ = writeln!(out, "add {set} {m} -exist");
            }
        };
        match kernel.ipsets.get(*name) {
            None => {
                fill(&mut pre, name);
                p.sets_created.push((*name).clone());
                p.members_added += spec.members.len();
            }
            Some(cur) if cur.same_metadata(spec) => {
                for m in spec.members.difference(&cur.members) {
                    let _ = writeln!(pre, "add {name} {m} -exist");
                    p.members_added += 1;
                }
                for m in cur.members.difference(&spec.members) {
                    let _ = writeln!(pre, "del {name} {m} -exist");
                    p.members_removed += 1;
                }
            }
            Some(cur)
                if cur.kind == spec.kind.as_str() && cur.family == spec.family.ipset_family() =>
            {
                // Only the size differs: build a temporary set and swap it
                // in, so rules using the set never see it missing.
                let temp = loop {
                    let t = format!("{}{temp_n}", spec.family.temp_set_prefix());
                    temp_n += 1;
                    if !kernel.ipsets.contains_key(&t) {
                        break t;
                    }
                };
                fill(&mut pre, &temp);
                let _ = writeln!(pre, "swap {temp} {name}");
                let _ = writeln!(pre, "destroy {temp}");
                p.sets_replaced.push((*name).clone());
            }
            Some(_) => {
                // Another type or family cannot be swapped: recreate (which
                // ipset refuses, with an error, while a rule still uses it).
                let _ = writeln!(pre, "destroy {name}");
                fill(&mut pre, name);
                p.sets_replaced.push((*name).clone());
            }
        }
        p.after
            .ipsets
            .insert((*name).clone(), SetState::from_spec(spec));
    }
    let mut post = String::new();
    for name in kernel.ipsets.keys() {
        if !wanted.contains_key(name) {
            let _ = writeln!(post, "destroy {name}");
            p.sets_destroyed.push(name.clone());
        }
    }
    p.ipset_pre = pre;
    p.ipset_post = post;
}

/// The `iptables-restore --noflush` input for one family (`None` when the
/// table is already right) and the table state after it.
fn plan_table(
    f: IpFamily,
    cur: &TableState,
    want: &IptablesRuleset,
    backend: Backend,
    p: &mut Plan,
) -> (Option<String>, TableState) {
    let mut after = TableState::default();
    let mut changed: Vec<&String> = Vec::new();
    for name in want.chains.keys() {
        let hashes = want.chain_hashes(name).unwrap_or_default();
        if cur.chains.get(name) != Some(&hashes) {
            changed.push(name);
        }
        after.chains.insert(name.clone(), hashes);
    }
    let removed: Vec<&String> = cur
        .chains
        .keys()
        .filter(|c| !want.chains.contains_key(*c))
        .collect();

    // Hook rules: ours at the top, in order, then whatever else was there,
    // then ours to append (FORWARD's accept, as felix places it).
    let mut hook_lines = Vec::new();
    let builtins: BTreeSet<&String> = want
        .hooks
        .keys()
        .chain(want.appended.keys())
        .chain(cur.others.keys())
        .collect();
    for chain in builtins {
        let ours_of = |placed: &BTreeMap<String, Vec<String>>| -> Vec<OtherRule> {
            placed
                .get(chain)
                .map(|rules| {
                    rules
                        .iter()
                        .map(|r| OtherRule {
                            hash: rule_hash(r).map(str::to_owned),
                            args: r.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let ours = ours_of(&want.hooks);
        let ours_last = ours_of(&want.appended);
        let present = cur.others.get(chain).cloned().unwrap_or_default();
        let foreign: Vec<OtherRule> = present
            .iter()
            .filter(|r| r.hash.is_none())
            .cloned()
            .collect();
        let expected: Vec<Option<&String>> = ours
            .iter()
            .chain(&foreign)
            .chain(&ours_last)
            .map(|r| r.hash.as_ref())
            .collect();
        let actual: Vec<Option<&String>> = present.iter().map(|r| r.hash.as_ref()).collect();
        if expected != actual {
            for r in present.iter().filter(|r| r.hash.is_some()) {
                hook_lines.push(format!("-D {chain} {}", r.args));
            }
            for r in ours.iter().rev() {
                hook_lines.push(format!("-I {chain} 1 {}", r.args));
            }
            for r in &ours_last {
                hook_lines.push(format!("-A {chain} {}", r.args));
            }
            p.hooks_written.push((f, chain.clone()));
        }
        if !ours.is_empty() || !ours_last.is_empty() || HOOK_CHAINS.contains(&chain.as_str()) {
            after.others.insert(
                chain.clone(),
                ours.into_iter().chain(foreign).chain(ours_last).collect(),
            );
        }
    }

    if changed.is_empty() && removed.is_empty() && hook_lines.is_empty() {
        return (None, after);
    }
    let mut s = String::new();
    let _ = writeln!(s, "*{TABLE}");
    // A forward reference creates the chain, or flushes it if it exists:
    // chains to rewrite get their rules back below, chains to delete lose
    // their references to other chains.
    for name in changed.iter().chain(&removed) {
        let _ = writeln!(s, ":{name} - -");
    }
    for name in &changed {
        for r in &want.chains[*name] {
            let _ = writeln!(s, "-A {name} {r}");
        }
        p.chains_written.push((f, (*name).clone()));
    }
    for l in &hook_lines {
        let _ = writeln!(s, "{l}");
    }
    if !removed.is_empty() {
        if backend == Backend::Nft {
            // iptables-nft-restore counts references as of the start of a
            // transaction (felix does the same): delete in a second one.
            let _ = writeln!(s, "COMMIT\n*{TABLE}");
            for name in &removed {
                let _ = writeln!(s, ":{name} - -");
            }
        }
        for name in &removed {
            let _ = writeln!(s, "-X {name}");
            p.chains_deleted.push((f, (*name).clone()));
        }
    }
    let _ = writeln!(s, "COMMIT");
    (Some(s), after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_save_output() {
        let text = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:cali-a - [0:0]\n:cali-empty - [0:0]\n:KUBE-X - [0:0]\n-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD\n-A FORWARD -j KUBE-X\n-A cali-a -m comment --comment \"cali:abc\" -j ACCEPT\n-A cali-a -j DROP\n-A KUBE-X -j RETURN\nCOMMIT\n";
        let t = parse_iptables_save(text, "save").unwrap();
        assert_eq!(t.chains["cali-a"], vec!["abc".to_owned(), String::new()]);
        assert_eq!(t.chains["cali-empty"], Vec::<String>::new());
        assert_eq!(t.others.len(), 1, "KUBE-X holds nothing of ours: {t:?}");
        let fwd = &t.others["FORWARD"];
        assert_eq!(fwd[0].hash.as_deref(), Some("wUHhoiAYhphO9Mso"));
        assert_eq!(fwd[1].hash, None);
        assert_eq!(fwd[1].args, "-j KUBE-X");
    }

    #[test]
    fn parses_ipset_save_keeping_ours() {
        let text = "create cali40s:x hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1\nadd cali40s:x 198.18.0.1\ncreate other hash:ip family inet\nadd other 1.2.3.4\n";
        let s = parse_ipset_save(text, "ipset save").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s["cali40s:x"].maxelem, 1_048_576);
        assert!(s["cali40s:x"].members.contains("198.18.0.1"));
    }

    #[test]
    fn finds_the_failed_line() {
        let input = "*filter\n:a - -\n-A a -j NOPE\nCOMMIT\n";
        assert_eq!(
            failed_line(
                "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE'\n\nError occurred at line: 3\n",
                input,
                &["Error occurred at line: ", "line "]
            ),
            Some((3, "-A a -j NOPE".into()))
        );
        assert_eq!(
            failed_line(
                "iptables-restore: line 4 failed\n",
                input,
                &["Error occurred at line: ", "line "]
            ),
            Some((4, "COMMIT".into()))
        );
        assert_eq!(
            failed_line(
                "ipset v7.17: Error in line 2: The set with the given name does not exist",
                "a\nadd x 1\n",
                &["Error in line "]
            ),
            Some((2, "add x 1".into()))
        );
    }
}
