//! The nftables backend: [`programmer::NftProgrammer`] behind [`Dataplane`].

use programmer::NftProgrammer;
use tracing::{info, warn};

use crate::{Change, Dataplane, Desired, Error, Kind, Op, Stats};

/// nftables over netlink: every apply is one atomic transaction; element
/// deltas and patches are sent as they are, anything else is diffed
/// against the last committed state.
#[derive(Debug)]
pub struct NftDataplane {
    programmer: NftProgrammer,
    /// The tools whose leftovers [`Dataplane::remove_other`] removes.
    iptables_tools: iptables::Backend,
    port: u32,
    stats: Stats,
}

impl NftDataplane {
    /// Opens the netlink socket and adopts what the kernel holds of ours.
    pub fn open(iptables_tools: iptables::Backend) -> Result<NftDataplane, Error> {
        let mut programmer = NftProgrammer::new().map_err(Error::nftables(Op::Open))?;
        programmer.adopt().map_err(Error::nftables(Op::ReadBack))?;
        let port = programmer.port_id().map_err(Error::nftables(Op::Open))?;
        Ok(NftDataplane {
            programmer,
            iptables_tools,
            port,
            stats: Stats::default(),
        })
    }

    /// The programmer, for what only nftables has (read-back, counters).
    pub fn programmer(&mut self) -> &mut NftProgrammer {
        &mut self.programmer
    }

    fn program(&mut self, desired: &Desired<'_>) -> Result<(), programmer::Error> {
        let p = &mut self.programmer;
        let r = match desired.change {
            Change::Elements(delta) => p.apply_elements(delta),
            Change::Patch(patch) => p.apply_patch(patch),
            Change::Full => p.apply(desired.ruleset),
        };
        match r {
            // An object we never committed (adopted tables that differ,
            // say): the full diff handles it.
            Err(programmer::Error::NotCommitted { .. }) => p.apply(desired.ruleset),
            r => r,
        }
        .map(|_| ())
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
        self.programmer
            .adopt()
            .map_err(Error::nftables(Op::ReadBack))
    }

    fn rebuild(&mut self, desired: &Desired<'_>) -> Result<bool, Error> {
        warn!("diffs keep failing; rebuilding our nftables tables from scratch in one transaction");
        let report = self
            .programmer
            .rebuild(desired.ruleset)
            .map_err(Error::nftables(Op::Rebuild))?;
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
        self.stats
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
