//! Tampering (nftables backend).
//!
//! * **Tampering**: a thread listens to nf_tables change notifications
//!   ([`programmer::monitor::Monitor`]) and, when someone other than our
//!   programmer commits a change to our tables, asks the daemon loop for a
//!   resync (drift check + repair) at once, instead of leaving the node
//!   mis-enforcing until the next periodic resync. One `nft` command or
//!   `nft -f` file is one transaction, reported whole; a script of several
//!   becomes one resync: after a change the thread collects further ones
//!   until none came for [`QUIET`] (at most [`DEBOUNCE`]) before asking.
//!   (It used to wait the whole [`DEBOUNCE`] after every change, which was
//!   most of the time a deleted table stayed deleted.)
//! * **Tampering with legacy iptables**, which sends no notifications: a
//!   thread compares the `filter` table's entry count and size
//!   ([`dataplane::legacy_filter_marker`], one getsockopt per family) every
//!   `--iptables-check-ms` with what the programmer thread noted after its
//!   last write, and on a difference asks the daemon loop for a check
//!   there (which compares again, then resyncs).
//! * **Repeated kernel failures**: when diffs keep failing (our committed
//!   state and the kernel disagree in a way re-reading does not fix), the
//!   daemon has `dataplane::Pipeline::rebuild` replace our tables whole in
//!   one atomic transaction before it gives up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use programmer::monitor::{ForeignChange, Monitor};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// After a foreign change, further changes are gathered into the same
/// resync until none came for this long…
pub const QUIET: Duration = Duration::from_millis(20);
/// …or this long has passed since the first.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long one wait for notifications lasts; only bounds how late the
/// thread notices that the daemon is gone.
const WAIT_SLICE: Duration = Duration::from_secs(5);
/// Pause before re-opening the notification socket after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Listen to nf_tables notifications and repair changes others make to
    /// our tables at once (nftables backend). `--watch-kernel=false`
    /// leaves repairs to the periodic resync.
    #[arg(
        long,
        env = "NFTPOLICY_WATCH_KERNEL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub watch_kernel: bool,
}

/// Starts the watcher thread if `--watch-kernel` and the nftables backend
/// (`own_port` = the programmer socket's port id, whose commits are ours).
/// The receiver yields one `()` per debounced burst of foreign changes;
/// `None` when not watching.
pub fn spawn(
    args: &WatchArgs,
    own_port: Option<u32>,
) -> anyhow::Result<Option<mpsc::Receiver<()>>> {
    let Some(own_port) = own_port.filter(|_| args.watch_kernel) else {
        return Ok(None);
    };
    // Opened here, on the daemon's thread, so a failure stops start-up
    // rather than silently disabling the watch.
    let monitor = Monitor::open().context("subscribing to nf_tables notifications")?;
    // Capacity 1: a resync already asked for covers any later change.
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("kernel-watch".into())
        .spawn(move || watch(monitor, own_port, tx))?;
    info!("watching nf_tables for changes to our tables by others");
    Ok(Some(rx))
}

/// Starts the table-size check thread (iptables backend, legacy tools):
/// every `interval` it compares [`dataplane::legacy_filter_marker`] with
/// `marker` (what the programmer thread noted after its last write; 0:
/// nothing yet) and yields `()` when they differ.
pub fn spawn_table_size_check(
    interval: Duration,
    marker: Arc<AtomicU64>,
) -> anyhow::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("table-size-check".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            if tx.is_closed() {
                return;
            }
            let known = marker.load(Ordering::Relaxed);
            if known != 0 && ::dataplane::legacy_filter_marker().is_some_and(|m| m != known) {
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        })?;
    info!(
        ?interval,
        "checking the size of the iptables filter table for changes by others"
    );
    Ok(rx)
}

fn watch(mut monitor: Monitor, own_port: u32, tx: mpsc::Sender<()>) {
    loop {
        if tx.is_closed() {
            return;
        }
        match monitor.wait_foreign(own_port, WAIT_SLICE) {
            Ok(None) => continue,
            Ok(Some(change)) => {
                match &change {
                    ForeignChange::Unknown => {
                        warn!("lost nf_tables notifications; resyncing in case our tables changed")
                    }
                    ForeignChange::Transaction(t) => {
                        warn!(change = %t, "our nf_tables tables were changed by someone else; resyncing")
                    }
                }
                gather_more(&mut monitor, own_port);
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
            Err(e) => {
                error!("reading nf_tables notifications failed: {e}; re-subscribing");
                std::thread::sleep(REOPEN_DELAY);
                match Monitor::open() {
                    Ok(m) => {
                        monitor = m;
                        // Changes between the error and now were not seen.
                        let _ = tx.try_send(());
                    }
                    Err(e) => error!("re-subscribing to nf_tables notifications failed: {e}"),
                }
            }
        }
    }
}

/// Swallows further changes (they are covered by the same resync) until
/// none came for [`QUIET`], at most [`DEBOUNCE`] in all.
fn gather_more(monitor: &mut Monitor, own_port: u32) {
    let until = Instant::now() + DEBOUNCE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match monitor.wait_foreign(own_port, left.min(QUIET)) {
            Ok(Some(change)) => debug!(%change, "further foreign change"),
            Ok(None) => return,
            Err(e) => {
                debug!("reading notifications while debouncing: {e}");
                return;
            }
        }
    }
}
