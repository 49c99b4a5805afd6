//! The dataplane layer: how a compile result reaches the kernel, written
//! once for every caller (the agent's `run` loop, `sync --once`, `render`,
//! `explain --kernel`, the benchmark and its examples).
//!
//! * [`Dataplane`] is the one interface to a backend: apply what the
//!   compiler produced ([`Desired`], with the [`Change`] since the last
//!   apply), tell whether the kernel drifted from what was applied, forget
//!   what is believed to be there, rebuild from scratch, and remove the
//!   *other* backend's state. [`NftDataplane`] (nftables over netlink,
//!   `programmer`) and [`IptablesDataplane`] (iptables-restore + ipset,
//!   `iptables`) implement it; [`open`] picks one by [`Kind`].
//! * [`Pipeline`] is the compile-and-program step: the incremental
//!   compiler and a backend, brought up to a cluster state and the changes
//!   since the last apply. After a failure it makes the next apply a full
//!   one (the whole ruleset diffed against a fresh read of the kernel).
//! * [`Node`] adds the state itself: datastore updates fold into a
//!   [`watcher::Cache`] and the changes they make are remembered until the
//!   next apply (what the agent's programmer thread does).
//!
//! How later work fits: a new kind of incremental compile result is a new
//! [`Change`] variant, which each backend either applies as such or treats
//! as [`Change::Full`]. A datastore that cannot be read changes nothing
//! here: nothing is folded, nothing applied, and [`Pipeline::resync`]
//! keeps repairing the kernel towards the last ruleset that was compiled
//! (the compiler keeps it), so the last good dataplane stays in force.
//!
//! Invariant: nothing in this crate builds a ruleset; it only moves the
//! compiler's output to the kernel through `programmer` or `iptables`.

mod iptables_backend;
mod nft_backend;
mod pipeline;

use std::collections::BTreeMap;

use compiler::nft::{ElementDelta, Ruleset, RulesetPatch};
use compiler::LogicalRuleset;
use model::calico::{Resource, ResourceKey};

pub use compiler::groups::TableGroups;
pub use iptables_backend::{legacy_filter_marker, remove_iptables_state, IptablesDataplane};
pub use nft_backend::{remove_nftables_state, NftDataplane};
pub use pipeline::{Node, Pipeline};

/// Resources changed since the last apply, with their values before it
/// (`None`: the resource did not exist).
pub type Changes = BTreeMap<ResourceKey, Option<Resource>>;

/// Which backend programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nftables over netlink: one atomic transaction per apply.
    Nftables,
    /// iptables-restore and ipset restore.
    Iptables,
}

impl Kind {
    /// Whether `nftpolicy explain --kernel` can trace packets through this
    /// backend's rules (nftrace exists only in nf_tables).
    pub fn can_trace(self) -> bool {
        self == Kind::Nftables
    }
}

/// What the kernel must hold: the compiler's current result.
#[derive(Debug, Clone, Copy)]
pub struct Desired<'a> {
    pub logical: &'a LogicalRuleset,
    /// `logical` lowered to nftables objects.
    pub ruleset: &'a Ruleset,
    /// What changed since the previous apply.
    pub change: Change<'a>,
}

/// What changed since the previous apply, as the incremental compiler
/// found it. A backend may always treat a change as [`Change::Full`].
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Anything may have changed: make the kernel equal the whole ruleset
    /// (diffed against what is known to be there).
    Full,
    /// Only these set elements changed.
    Elements(&'a ElementDelta),
    /// These chains, sets and maps (and elements) changed.
    Patch(&'a RulesetPatch),
}

/// Running totals of a backend's work, for metrics (felix's
/// `felix_nft_*`, `felix_iptables_*`, `felix_ipset_*` counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub nft_transactions: u64,
    pub nft_errors: u64,
    pub iptables_restore_calls: u64,
    pub iptables_restore_errors: u64,
    pub iptables_save_calls: u64,
    pub ipset_calls: u64,
    pub ipset_errors: u64,
    /// Not a total: how many tables per family the nftables ruleset is cut
    /// into (`--table-groups`); 0 for iptables, and while `auto` has not
    /// chosen yet.
    pub table_groups: u64,
}

/// Errors, by the operation that failed. The previous ruleset stays in
/// force after any of them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("compiling the ruleset")]
    Compile(#[from] compiler::CompileError),
    #[error("{op} nftables")]
    Nftables {
        op: Op,
        #[source]
        source: programmer::Error,
    },
    #[error("{op} iptables{}", hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default())]
    Iptables {
        op: Op,
        /// What to do about it, when we know (a missing capability).
        hint: Option<String>,
        #[source]
        source: Box<iptables::Error>,
    },
    #[error("destroying the iptables backend's ipsets: {0}")]
    RemoveIpsets(String),
    /// A [`Dataplane`] implemented elsewhere (the benchmark's `nft -f`).
    #[error("the dataplane backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What a backend was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    ReadBack,
    Program,
    Rebuild,
    Remove,
}

impl Error {
    pub(crate) fn nftables(op: Op) -> impl FnOnce(programmer::Error) -> Error {
        move |source| Error::Nftables { op, source }
    }

    pub(crate) fn iptables(op: Op) -> impl FnOnce(iptables::Error) -> Error {
        move |source| Error::Iptables {
            op,
            hint: None,
            source: Box::new(source),
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Open => "opening",
            Op::ReadBack => "reading back the state of",
            Op::Program => "programming",
            Op::Rebuild => "rebuilding the state of",
            Op::Remove => "removing the state of",
        })
    }
}

/// One backend: the kernel side of a node's dataplane.
pub trait Dataplane: Send {
    fn kind(&self) -> Kind;

    /// Makes the kernel hold `desired`. On error the previous ruleset stays
    /// in force (nftables: nothing of the transaction applied; iptables:
    /// each family's table is old or new) and the next call should pass
    /// [`Change::Full`].
    fn apply(&mut self, desired: &Desired<'_>) -> Result<(), Error>;

    /// Whether the kernel differs from what the last apply wrote (or, for a
    /// backend that keeps no copy, from `desired`).
    fn has_drift(&mut self, desired: &Desired<'_>) -> Result<bool, Error>;

    /// Forgets what is believed to be in the kernel: the next apply reads
    /// it back first and repairs whatever differs.
    fn invalidate(&mut self) -> Result<(), Error>;

    /// The last resort when applies keep failing: replaces our state whole
    /// in one atomic transaction, whatever the kernel holds. `Ok(false)`
    /// (the default) when the backend has no such operation.
    fn rebuild(&mut self, desired: &Desired<'_>) -> Result<bool, Error> {
        let _ = desired;
        Ok(false)
    }

    /// Removes the *other* backend's state, once this one enforces
    /// (switching backends leaves nothing behind).
    fn remove_other(&mut self) -> Result<(), Error>;

    /// The netlink port whose nf_tables commits are this backend's own
    /// (so change notifications from it are not foreign); `None` (the
    /// default) when the backend does not commit over netlink.
    fn own_port(&self) -> Option<u32> {
        None
    }

    /// A cheap summary of the kernel tables this backend writes that
    /// changes when anyone changes them (compared before and after to find
    /// tampering without a full read-back); `None` (the default) when the
    /// backend has none.
    fn change_marker(&self) -> Option<u64> {
        None
    }

    /// Totals for metrics; none by default.
    fn stats(&self) -> Stats {
        Stats::default()
    }
}

/// A backend that programs nothing and never drifts: for measuring
/// everything but the kernel, and for dry runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl Dataplane for Discard {
    fn kind(&self) -> Kind {
        Kind::Nftables
    }

    fn apply(&mut self, _desired: &Desired<'_>) -> Result<(), Error> {
        Ok(())
    }

    fn has_drift(&mut self, _desired: &Desired<'_>) -> Result<bool, Error> {
        Ok(false)
    }

    fn invalidate(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn remove_other(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Opens the backend of `kind` in the current thread's network namespace.
/// `iptables_tools` are the iptables binaries the iptables backend
/// programs with, and the nftables backend removes leftovers with. The
/// nftables backend adopts what a previous run left (unchanged chains are
/// not rewritten and keep their counters).
pub fn open(kind: Kind, iptables_tools: iptables::Backend) -> Result<Box<dyn Dataplane>, Error> {
    open_grouped(kind, iptables_tools, TableGroups::Fixed(1))
}

/// [`open`], the nftables backend's tables cut into groups by namespace
/// (`--table-groups`; `Fixed(1)`: one table per family; `Auto`: as many
/// as the first whole ruleset applied needs, [`TableGroups::resolve`]).
/// The iptables backend has one set of chains whatever the count (the
/// agent refuses `--table-groups` above 1 with it).
pub fn open_grouped(
    kind: Kind,
    iptables_tools: iptables::Backend,
    table_groups: TableGroups,
) -> Result<Box<dyn Dataplane>, Error> {
    Ok(match kind {
        Kind::Nftables => Box::new(NftDataplane::open_grouped(iptables_tools, table_groups)?),
        Kind::Iptables => Box::new(IptablesDataplane::new(iptables_tools)),
    })
}

/// The ruleset as text, without touching the kernel: `nft -f` input, or
/// the `ipset restore` and `iptables-restore --noflush` input of each
/// address family.
pub fn render(kind: Kind, logical: &LogicalRuleset) -> String {
    match kind {
        Kind::Nftables => compiler::render_nft::render(&compiler::lower_nft::to_nftables(logical)),
        Kind::Iptables => {
            compiler::render_iptables::render(&compiler::render_iptables::to_iptables(logical))
        }
    }
}

/// `e` and its sources, `: `-joined (as anyhow's `{:#}` prints them).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
