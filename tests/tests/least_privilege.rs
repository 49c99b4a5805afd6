//! Least privilege: `nftpolicy sync --once` and `nftpolicy run` (nftables
//! backend, file datastore) with every capability dropped but
//! CAP_NET_ADMIN (`setpriv`: bounding, inheritable and ambient sets reduced
//! to net_admin, no_new_privs) program a lab node correctly — the kernel
//! reads back as the desired ruleset and a denied probe is denied — and the
//! agent's health and metrics listeners bind 127.0.0.1 by default.
//!
//! Entering the node's namespace is `ip netns exec`'s job, done before the
//! privileges are dropped (setns needs CAP_SYS_ADMIN): the agent itself
//! never changes namespace, so CAP_NET_ADMIN is all it needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::agents::{http_get, in_namespace};
use lab::{nftpolicy_binary, write_state, Lab};
use model::scenario::ResolvedProbe;

mod common;
use common::{assert_probes, desired, kernel, Tables};

// The scenario: tests/tests/scenarios/least-privilege.yaml.

/// CAP_NET_ADMIN is capability 12.
const NET_ADMIN_ONLY: u64 = 1 << 12;
/// The agent's default listeners (felix's ports).
const HEALTH_PORT: u16 = 9099;
const METRICS_PORT: u16 = 9091;
const TIMEOUT: Duration = Duration::from_secs(60);

/// `ip netns exec <ns> setpriv <only caps> -- nftpolicy <args>`; `caps`
/// as setpriv spells them (`+net_admin,+net_raw`).
fn with_caps(caps: &str, node_ns: &str, nftpolicy: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node_ns, "setpriv"])
        .args(["--reuid", "0", "--regid", "0", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .args(["--no-new-privs", "--"])
        .arg(nftpolicy)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// With CAP_NET_ADMIN alone.
fn least_privileged(node_ns: &str, nftpolicy: &Path, args: &[&str]) -> Command {
    with_caps("+net_admin", node_ns, nftpolicy, args)
}

/// The nftables backend checks for (and removes) the iptables backend's
/// leftovers with the iptables tools of `--iptables-backend`. The nft
/// tools speak netlink (CAP_NET_ADMIN); the legacy ones (the default, as
/// felix's) read x_tables through a raw socket and need CAP_NET_RAW too,
/// but are run only where a legacy filter table exists. The first test
/// runs with each.
const NFT_TOOLS: [&str; 2] = ["--iptables-backend", "nft"];
const LEGACY_TOOLS: [&str; 2] = ["--iptables-backend", "legacy"];

/// A capability set (`CapEff`, `CapBnd`, …) of a process, from /proc.
fn capability_set(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// Kills the agent when the test ends, passing or failing.
struct AgentGuard(Child);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `node_ns`'s kernel holds `want`, failing early
/// with the agent's log if it exits.
fn wait_programmed(agent: &mut AgentGuard, log: &Path, node_ns: &str, want: &Tables) {
    let deadline = Instant::now() + TIMEOUT;
    while &kernel(node_ns) != want {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!(
                "the least-privileged agent exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the least-privileged agent did not program the node within {TIMEOUT:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        // Polling the kernel: the agent offers no notification of it.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sync_and_run_need_only_cap_net_admin_and_listen_on_loopback() {
    sync_and_run_with_only_cap_net_admin(&NFT_TOOLS);
}

/// With the default legacy iptables tools, on a node with no legacy filter
/// table (so no iptables-mode leftovers), CAP_NET_ADMIN is still enough.
#[test]
fn sync_and_run_with_legacy_iptables_tools_need_only_cap_net_admin_without_leftovers() {
    sync_and_run_with_only_cap_net_admin(&LEGACY_TOOLS);
}

/// The legacy (x_tables) tables of `node_ns`, IPv4 and IPv6.
fn legacy_tables(node_ns: &str) -> String {
    in_namespace(node_ns, || {
        [
            "/proc/thread-self/net/ip_tables_names",
            "/proc/thread-self/net/ip6_tables_names",
        ]
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .concat()
    })
    .unwrap()
}

fn sync_and_run_with_only_cap_net_admin(iptables_tools: &[&str]) {
    let scenario = common::scenario("least-privilege");
    let states = scenario.states().unwrap();
    let probes = |step: usize| -> Vec<ResolvedProbe> {
        scenario.steps[step]
            .probes
            .iter()
            .map(|p| states[step].resolve_probe(p, &[]).unwrap())
            .collect()
    };
    let nftpolicy = nftpolicy_binary();
    let mut lab = Lab::build(&states[0].pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();
    assert_eq!(
        legacy_tables(&node_ns),
        "",
        "a fresh node has no legacy tables"
    );

    // 1. sync --once.
    let step1: PathBuf = lab.workdir().join("step1");
    write_state(&step1, &states[0]).unwrap();
    let datastore = format!("file:{}", step1.display());
    let args = [
        &["sync", "--once", "--node", "node1", "--backend", "nftables"][..],
        iptables_tools,
        &["--datastore", &datastore],
    ]
    .concat();
    testkit::output_ok(
        &mut least_privileged(&node_ns, &nftpolicy, &args),
        "sync --once with only CAP_NET_ADMIN",
    );
    assert_eq!(kernel(&node_ns), desired(&step1), "after sync --once");
    assert_probes(&mut lab, &probes(0), "sync --once with only CAP_NET_ADMIN");

    // 2. run, with the default health and metrics addresses, on a state
    // that changes the kernel (a new policy isolates client).
    let step2: PathBuf = lab.workdir().join("step2");
    write_state(&step2, &states[1]).unwrap();
    let datastore = format!("file:{}", step2.display());
    let log = lab.workdir().join("least-privileged-agent.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = least_privileged(
        &node_ns,
        &nftpolicy,
        &[
            &["run", "--node", "node1", "--backend", "nftables"][..],
            iptables_tools,
            &["--datastore", &datastore],
        ]
        .concat(),
    )
    .stdout(log_file.try_clone().unwrap())
    .stderr(log_file)
    .spawn()
    .unwrap();
    let mut agent = AgentGuard(child);
    // `ip netns exec` and setpriv exec in place: the child's pid is the agent's.
    let pid = agent.0.id();
    let want = desired(&step2);
    wait_programmed(&mut agent, &log, &node_ns, &want);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("nftpolicy"), "pid {pid} is {}", exe.display());
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            capability_set(pid, set),
            NET_ADMIN_ONLY,
            "{set} of the agent is not CAP_NET_ADMIN alone"
        );
    }
    assert_probes(&mut lab, &probes(1), "run with only CAP_NET_ADMIN");

    // Health and metrics answer on 127.0.0.1 inside the node...
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match http_get(&node_ns, HEALTH_PORT, "/readiness") {
            Ok((200, _)) => break,
            other => assert!(
                Instant::now() < deadline,
                "/readiness on 127.0.0.1:{HEALTH_PORT}: {other:?}"
            ),
        }
        // Polling a listener that has no readiness signal but itself.
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, metrics) = http_get(&node_ns, METRICS_PORT, "/metrics").unwrap();
    assert_eq!(code, 200, "{metrics}");
    // ...and are bound to 127.0.0.1 only: that is the whole listening list.
    let out = Command::new("ip")
        .args(["netns", "exec", &node_ns, "ss", "-ltnH"])
        .output()
        .unwrap();
    let listening = String::from_utf8_lossy(&out.stdout);
    for port in [HEALTH_PORT, METRICS_PORT] {
        let locals: Vec<&str> = listening
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|local| local.ends_with(&format!(":{port}")))
            .collect();
        assert_eq!(
            locals,
            [format!("127.0.0.1:{port}")],
            "listeners on port {port}:\n{listening}"
        );
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("ERROR") && !log_text.contains("WARN"),
        "the least-privileged agent complained:\n{log_text}"
    );
    assert_eq!(
        legacy_tables(&node_ns),
        "",
        "looking for iptables leftovers loaded a legacy table"
    );
    drop(agent);
    drop(lab);
}

/// With felix's default legacy iptables tools, on a node that does have a
/// legacy filter table (where iptables-mode leftovers can be), `sync --once`
/// needs CAP_NET_RAW besides CAP_NET_ADMIN to read it, says so, and needs
/// nothing more.
#[test]
fn sync_with_legacy_iptables_tools_needs_net_admin_and_net_raw() {
    let scenario = common::scenario("least-privilege");
    let states = scenario.states().unwrap();
    let nftpolicy = nftpolicy_binary();
    let mut lab = Lab::build(&states[0].pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();
    let dir: PathBuf = lab.workdir().join("step1");
    write_state(&dir, &states[0]).unwrap();
    let datastore = format!("file:{}", dir.display());
    let args = [
        "sync",
        "--once",
        "--node",
        "node1",
        "--backend",
        "nftables",
        "--datastore",
        &datastore,
    ];

    // Any legacy filter table will do (loading one takes the privileges
    // the agent is denied); an empty one holds nothing to clean up.
    let loaded = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node_ns,
            "iptables-legacy",
            "-t",
            "filter",
            "-S",
        ])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{loaded:?}");

    let out = least_privileged(&node_ns, &nftpolicy, &args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "legacy iptables tools without CAP_NET_RAW: {stderr}"
    );
    assert!(
        stderr.contains("iptables-legacy-save") && stderr.contains("CAP_NET_RAW"),
        "the failure does not name the tool and the capability: {stderr}"
    );

    testkit::output_ok(
        &mut with_caps("+net_admin,+net_raw", &node_ns, &nftpolicy, &args),
        "sync --once with CAP_NET_ADMIN and CAP_NET_RAW",
    );
    assert_eq!(kernel(&node_ns), desired(&dir));
    let probes: Vec<ResolvedProbe> = scenario.steps[0]
        .probes
        .iter()
        .map(|p| states[0].resolve_probe(p, &[]).unwrap())
        .collect();
    assert_probes(
        &mut lab,
        &probes,
        "legacy tools, CAP_NET_ADMIN and CAP_NET_RAW",
    );
}
