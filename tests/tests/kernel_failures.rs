//! Repeated kernel failures end in a clear exit, not a retry loop: an
//! `nftpolicy run` agent (nftables backend, file datastore, inside a lab
//! node) has programmed its tables; then a "squatter" takes our ip table
//! for good. In one transaction it deletes `table ip nftpolicy` and
//! re-creates it empty with the `owner` flag (NFT_TABLE_F_OWNER), keeping
//! its netlink socket open: the kernel now refuses every change to that
//! table from any other socket (EPERM, even a DESTROYTABLE), so re-reading
//! the kernel cannot fix what the agent's next transactions hit.
//!
//! The agent's kernel watch sees the foreign change and repairs; every
//! repair fails. What an operator must see (issue 7): the agent retries a
//! bounded number of times with backoff, tries one atomic rebuild of our
//! tables, then exits non-zero with a message naming the kernel's
//! rejections and the errno — and nothing of ours is half-applied: the
//! squatter's table is still empty and our ip6 table untouched. Once the
//! squatter is gone (its socket closes, its table vanishes), a restarted
//! agent programs the desired ruleset again.
//!
//! Every wait is for a condition, bounded by a generous deadline; no
//! timing is asserted.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use compiler::nft::TABLE_NAME;
use lab::{nftpolicy_binary, write_state, Agents, Lab, LabError};

mod common;
use common::{desired, kernel, shop, wait_for, wait_kernel, Tables};

/// Bound on agent start-up (debug build) and on the squatter's takeover.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the agent giving up by itself (its backoff adds up to ~15 s).
const GIVE_UP_DEADLINE: Duration = Duration::from_secs(120);
/// `MAX_APPLY_FAILURES` of crates/agent/src/daemon.rs.
const MAX_APPLY_FAILURES: usize = 6;
/// What the agent logs when it tries its last-resort rebuild (tamper.rs).
const REBUILD_LINE: &str = "rebuilding our nftables tables from scratch in one transaction";

/// `nft list table ip nftpolicy` in the node's namespace (`None` when the
/// table does not exist).
fn nft_list_our_ip_table(node_ns: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", node_ns, "nft", "list", "table", "ip", TABLE_NAME,
        ])
        .output()
        .expect("running nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An `nft -i` session in the node's namespace holding our ip table with
/// the owner flag. The table lives as long as the session's netlink
/// socket: dropping the guard closes its stdin (nft exits on EOF) and
/// reaps it, and the kernel removes the table.
struct Squatter {
    child: Child,
}

impl Squatter {
    fn take_our_table(node_ns: &str) -> Squatter {
        let mut child = Command::new("ip")
            .args(["netns", "exec", node_ns, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nft -i");
        // One line is one transaction: our table is never absent in
        // between, it just becomes someone else's.
        writeln!(
            child.stdin.as_mut().expect("piped"),
            "delete table ip {TABLE_NAME}; add table ip {TABLE_NAME} {{ flags owner; }}"
        )
        .expect("writing to nft -i");
        let squatter = Squatter { child };
        wait_for("the squatter taking our ip table", TIMEOUT, || {
            nft_list_our_ip_table(node_ns).is_some_and(|t| t.contains("flags owner"))
        });
        squatter
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

#[test]
fn a_table_the_kernel_will_not_let_us_touch_ends_in_one_rebuild_and_a_clear_exit() {
    let (state, _probes) = shop();
    let lab = Lab::build(&state.pods(), &[], &["node1"]).unwrap();
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();
    let datastore = lab.workdir().join("datastore");
    write_state(&datastore, &state).unwrap();
    let want: Tables = desired(&datastore);
    assert!(want.0.is_some() && want.1.is_some(), "both tables desired");
    let log_path = lab.workdir().join("agent-node1.log");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Only the kernel watch (on by default) triggers the failing repairs.
    let extra = vec!["--resync-interval".to_owned(), "3600".to_owned()];
    let mut agents =
        Agents::start_file(&lab, &datastore, &nftpolicy_binary(), "nftables", &extra).unwrap();
    agents.wait_applied(1, TIMEOUT).unwrap();
    wait_kernel(&node_ns, &want, "first programming", TIMEOUT);

    let squatter = Squatter::take_our_table(&node_ns);
    let took_over = Instant::now();

    // 1. The agent exits by itself, non-zero. (`wait_applied` of a
    // revision never reached returns as soon as the agent exits.)
    let exit = match agents.wait_applied(i64::MAX, GIVE_UP_DEADLINE) {
        Err(LabError::Program { status, .. }) => status,
        other => panic!("waiting for the agent to give up: {other:?}"),
    };
    let gave_up_after = took_over.elapsed();
    let log = read_log();
    assert!(
        exit.starts_with("exited (") && !exit.contains("exit status: 0"),
        "the agent did not exit by itself with a failure status ({exit}); its log:\n{log}"
    );

    // 2. Bounded retries, one rebuild, a clear final message.
    let since_takeover = &log[log
        .find("changed by someone else")
        .unwrap_or_else(|| panic!("the agent never noticed the takeover; its log:\n{log}"))..];
    let apply_failed: Vec<&str> = since_takeover
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("apply failed"))
        .collect();
    let rebuilds = since_takeover.matches(REBUILD_LINE).count();
    let last_line = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    eprintln!(
        "agent exited ({exit}) {gave_up_after:?} after the takeover, after {} failed applies \
         and {rebuilds} rebuild(s); log since the takeover:\n{since_takeover}",
        apply_failed.len()
    );
    assert!(
        (2..=MAX_APPLY_FAILURES + 2).contains(&apply_failed.len()),
        "expected a bounded number of retries (2..={}), saw {} \"apply failed\" errors; log:\n{log}",
        MAX_APPLY_FAILURES + 2,
        apply_failed.len()
    );
    assert_eq!(
        rebuilds, 1,
        "expected exactly one rebuild attempt; log:\n{log}"
    );
    assert!(
        last_line.contains("the kernel rejected")
            && last_line.contains("consecutive transactions")
            && (last_line.contains("Operation not permitted") || last_line.contains("EPERM")),
        "the agent's last words do not name the kernel's rejections and the errno: \
         {last_line:?}; log:\n{log}"
    );

    // 3. Nothing of ours half-applied while the squatter holds the table.
    let (ip, ip6) = kernel(&node_ns);
    let ip = ip.expect("the squatter's ip table");
    assert!(
        ip.chains.is_empty() && ip.sets.is_empty(),
        "the squatter's table got some of our objects: {ip:?}"
    );
    assert!(
        nft_list_our_ip_table(&node_ns).is_some_and(|t| t.contains("flags owner")),
        "the ip table is no longer the squatter's"
    );
    assert_eq!(ip6, want.1, "our ip6 table changed");

    // The squatter leaves: its table goes with its socket; a new agent
    // programs everything again.
    drop(squatter);
    wait_for("the squatter's table vanishing", TIMEOUT, || {
        nft_list_our_ip_table(&node_ns).is_none()
    });
    agents.restart("node1").unwrap();
    agents.wait_applied(1, TIMEOUT).unwrap();
    wait_kernel(
        &node_ns,
        &want,
        "reprogramming after the squatter left",
        TIMEOUT,
    );
}
