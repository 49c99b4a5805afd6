//! The nftables backend: [`programmer::NftProgrammer`] behind [`Dataplane`].

use compiler::groups::{self, Split, TableGroups};
use compiler::nft::{Ruleset, TableFamily};
use programmer::NftProgrammer;
use tracing::{info, warn};

use crate::{Change, Dataplane, Desired, Error, Kind, Op, Stats};

/// nftables over netlink: every apply is one atomic transaction; element
/// deltas and patches are sent as they are, anything else is diffed
/// against the last committed state.
///
/// With table groups (`--table-groups N`, N > 1) the compiler's one table
/// per family is cut into one per group of namespaces
/// (`compiler::groups`), and every change is cut the same way before it
/// is sent: still one transaction, now touching only the groups' tables
/// it reaches. With `--table-groups auto` the count is chosen once, from
/// the first whole ruleset applied, and kept for the life of the process:
/// a count that changed under a running agent would replace every table.
/// The count the tables found at start have is kept too while the
/// ruleset is near a size that gets it ([`TableGroups::resolve_keeping`]),
/// so that restarts near a threshold do not replace them.
#[derive(Debug)]
pub struct NftDataplane {
    programmer: NftProgrammer,
    /// The tools whose leftovers [`Dataplane::remove_other`] removes.
    iptables_tools: iptables::Backend,
    port: u32,
    stats: Stats,
    /// How many table groups were asked for.
    asked: TableGroups,
    /// How many there are (1: the single table `nftpolicy`); `None` until
    /// `auto` has seen the first whole ruleset.
    groups: Option<usize>,
    /// With `auto`: how many groups the tables found at start (a previous
    /// run's) were cut into, which `auto` keeps while it still fits.
    running: Option<usize>,
    /// The cut as last committed; `None` until a whole ruleset was cut
    /// and committed (and after any failure), so the next change is cut
    /// whole.
    split: Option<Split>,
}

impl NftDataplane {
    /// Opens the netlink socket and adopts what the kernel holds of ours.
    pub fn open(iptables_tools: iptables::Backend) -> Result<NftDataplane, Error> {
        NftDataplane::open_grouped(iptables_tools, TableGroups::Fixed(1))
    }

    /// [`open`](Self::open) with the tables cut into groups by namespace
    /// (`Fixed(1)`: not cut; `Auto`: as many as the first whole ruleset
    /// needs).
    pub fn open_grouped(
        iptables_tools: iptables::Backend,
        groups: TableGroups,
    ) -> Result<NftDataplane, Error> {
        let mut programmer = NftProgrammer::new().map_err(Error::nftables(Op::Open))?;
        programmer.adopt().map_err(Error::nftables(Op::ReadBack))?;
        let port = programmer.port_id().map_err(Error::nftables(Op::Open))?;
        let running = match groups {
            TableGroups::Auto => groups::running_groups(
                &programmer
                    .our_table_names(TableFamily::Ip)
                    .map_err(Error::nftables(Op::ReadBack))?,
            ),
            TableGroups::Fixed(_) => None,
        };
        Ok(NftDataplane {
            programmer,
            iptables_tools,
            port,
            stats: Stats::default(),
            asked: groups,
            groups: match groups {
                TableGroups::Fixed(n) => Some(n.max(1)),
                TableGroups::Auto => None,
            },
            running,
            split: None,
        })
    }

    /// How many table groups the tables are cut into; `None` while `auto`
    /// has not yet seen a whole ruleset.
    pub fn table_groups(&self) -> Option<usize> {
        self.groups
    }

    /// The group count, chosen now from `ruleset` if `auto` has not yet.
    fn groups_for(&mut self, ruleset: &Ruleset) -> usize {
        if let Some(n) = self.groups {
            return n;
        }
        let n = self.asked.resolve_keeping(ruleset, self.running);
        let rules = groups::largest_table_rules(ruleset);
        let fresh = groups::auto_groups(rules);
        info!(
            table_groups = n,
            rules,
            "--table-groups auto chose {} for {rules} rules in the largest table{} (kept until the agent restarts)",
            if n == 1 {
                "one table per family".to_owned()
            } else {
                format!("{n} tables per family, one per namespace group")
            },
            if n == fresh {
                String::new()
            } else {
                format!(
                    ", as the tables it found were cut (a fresh start would choose {fresh}; within {}% of this size either fits)",
                    groups::AUTO_KEEP_PERCENT
                )
            }
        );
        self.groups = Some(n);
        n
    }

    /// The compiler's whole ruleset as the kernel gets it: cut into the
    /// groups' tables (remembering the cut), or as it is.
    fn whole(&mut self, desired: &Desired<'_>) -> Option<Ruleset> {
        let count = self.groups_for(desired.ruleset);
        if count == 1 {
            return None;
        }
        let (split, cut) = groups::cut_by_namespace(desired.logical, desired.ruleset, count);
        self.split = Some(split);
        Some(cut)
    }

    /// The programmer, for what only nftables has (read-back, counters).
    pub fn programmer(&mut self) -> &mut NftProgrammer {
        &mut self.programmer
    }

    fn program(&mut self, desired: &Desired<'_>) -> Result<(), programmer::Error> {
        let r = self.program_change(desired);
        let r = match r {
            // An object we never committed (adopted tables that differ,
            // say): the full diff handles it.
            Err(programmer::Error::NotCommitted { .. }) => self.program_whole(desired),
            r => r,
        };
        if r.is_err() {
            // Cut whole again next time, against the committed tables.
            self.split = None;
        }
        r
    }

    fn program_whole(&mut self, desired: &Desired<'_>) -> Result<(), programmer::Error> {
        match self.whole(desired) {
            Some(cut) => self.programmer.apply_owned(cut),
            None => self.programmer.apply(desired.ruleset),
        }
        .map(|_| ())
    }

    fn program_change(&mut self, desired: &Desired<'_>) -> Result<(), programmer::Error> {
        let count = match self.groups {
            // `auto` has not chosen yet: only a whole ruleset can tell.
            None => return self.program_whole(desired),
            Some(n) => n,
        };
        let p = &mut self.programmer;
        let r = match (desired.change, &mut self.split) {
            (Change::Full, _) => return self.program_whole(desired),
            // Groups, but no committed cut to patch: cut whole.
            (_, None) if count > 1 => return self.program_whole(desired),
            (Change::Elements(delta), None) => p.apply_elements(delta),
            (Change::Patch(patch), None) => p.apply_patch(patch),
            (Change::Elements(delta), Some(split)) => {
                p.apply_elements(&groups::merge_elements(split.elements(delta)))
            }
            (Change::Patch(patch), Some(split)) => {
                let group_of = groups::by_namespace(desired.logical, count);
                let per_group = split.patch(desired.ruleset, patch, &group_of);
                p.apply_patch(&groups::merge_patches(per_group))
            }
        };
        r.map(|_| ())
    }
}

impl Dataplane for NftDataplane {
    fn kind(&self) -> Kind {
        Kind::Nftables
    }

    fn apply(&mut self, desired: &Desired<'_>) -> Result<(), Error> {
        self.stats.nft_transactions += 1;
        self.program(desired).map_err(|e| {
            self.stats.nft_errors += 1;
            Error::nftables(Op::Program)(e)
        })
    }

    fn has_drift(&mut self, _desired: &Desired<'_>) -> Result<bool, Error> {
        self.programmer
            .has_drift()
            .map_err(Error::nftables(Op::ReadBack))
    }

    fn invalidate(&mut self) -> Result<(), Error> {
        self.split = None;
        self.programmer
            .adopt()
            .map_err(Error::nftables(Op::ReadBack))
    }

    fn rebuild(&mut self, desired: &Desired<'_>) -> Result<bool, Error> {
        warn!("diffs keep failing; rebuilding our nftables tables from scratch in one transaction");
        let cut = self.whole(desired);
        let report = self
            .programmer
            .rebuild(cut.as_ref().unwrap_or(desired.ruleset))
            .map_err(|e| {
                self.split = None;
                Error::nftables(Op::Rebuild)(e)
            })?;
        info!(
            messages = report.messages,
            ms = report.kernel_time.as_millis() as u64,
            "rebuilt our nftables tables; the desired ruleset is in force"
        );
        Ok(true)
    }

    fn remove_other(&mut self) -> Result<(), Error> {
        crate::remove_iptables_state(self.iptables_tools)
    }

    fn own_port(&self) -> Option<u32> {
        Some(self.port)
    }

    fn stats(&self) -> Stats {
        Stats {
            table_groups: self.groups.map_or(0, |n| n as u64),
            ..self.stats
        }
    }
}

/// Removes our nftables tables (both families), if any: what an iptables
/// backend leaves behind of an earlier nftables run.
pub fn remove_nftables_state() -> Result<(), Error> {
    NftProgrammer::new()
        .map_err(Error::nftables(Op::Open))?
        .remove_all()
        .map_err(Error::nftables(Op::Remove))
}
