//! What the iptables agent's table-size check (`--iptables-check-ms`)
//! costs: idle agents on the same cluster, each in its own lab node, side
//! by side for the same time (so they share the machine's load), with the
//! check off, at its default and at faster intervals, and — for
//! comparison — with no check but a full resync every second (what it
//! would take to get a window of about a second from the periodic resync
//! alone). Reports each agent's CPU time over the idle period: its own
//! (summed over its threads from /proc/<pid>/task/*/schedstat) and that of
//! the processes it ran and reaped (`iptables-save`, `ipset`: cutime +
//! cstime of /proc/<pid>/stat, in clock ticks of 10 ms).
//!
//! `cargo run -p lab --example iptables_check_cost -- [SECONDS]` (root;
//! default 60 s; the debug agent, or the one `NFTPOLICY_BIN` names).

use std::path::Path;
use std::time::Duration;

use lab::{nftpolicy_binary, write_state, Agents, Lab};

/// Nanoseconds on CPU of every thread of `pid` so far.
fn cpu_ns(pid: u32) -> u64 {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    std::fs::read_dir(&tasks)
        .unwrap_or_else(|e| panic!("{}: {e}", tasks.display()))
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Nanoseconds on CPU of the reaped children of `pid` so far.
fn children_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name in parentheses: state is field 3; cutime and
    // cstime are fields 16 and 17.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let ticks: u64 = fields[13].parse::<u64>().unwrap() + fields[14].parse::<u64>().unwrap();
    ticks * 1_000_000_000 / hz
}

fn cpu(agents: &Agents) -> (u64, u64) {
    let pid = agents.pid("node1").unwrap().expect("running");
    (cpu_ns(pid), children_ns(pid))
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .map_or(60, |s| s.parse().expect("SECONDS"));
    let nftpolicy = nftpolicy_binary();
    let scenario = model::scenario::Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/shop.yaml"),
    )
    .expect("the shop scenario");
    let state = scenario.states().expect("states").remove(0);
    let configs: [(&str, &[&str]); 4] = [
        (
            "no check (--iptables-check-ms 0)",
            &["--iptables-check-ms", "0"],
        ),
        ("check every 100 ms (default)", &[]),
        ("check every 20 ms", &["--iptables-check-ms", "20"]),
        (
            "no check, --resync-interval 1",
            &["--iptables-check-ms", "0", "--resync-interval", "1"],
        ),
    ];
    let mut runs = Vec::new();
    for (name, args) in configs {
        let lab = Lab::build(&state.pods(), &[], &["node1"]).expect("lab");
        let dir = lab.workdir().join("datastore");
        write_state(&dir, &state).expect("manifests");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut agents =
            Agents::start_file(&lab, &dir, &nftpolicy, "iptables", &args).expect("agent");
        agents
            .wait_applied(1, Duration::from_secs(60))
            .expect("applied");
        runs.push((name, lab, agents));
    }
    // Start-up work done; then idle side by side.
    std::thread::sleep(Duration::from_secs(3));
    let before: Vec<(u64, u64)> = runs.iter().map(|(_, _, a)| cpu(a)).collect();
    std::thread::sleep(Duration::from_secs(secs));
    println!(
        "idle for {secs} s, iptables backend (legacy), shop cluster (3 pods), agent {}\n\n\
         | agent | agent CPU | its child processes' CPU | total per second |\n\
         |---|---:|---:|---:|",
        nftpolicy.display()
    );
    let ms = |ns: u64| ns as f64 / 1e6;
    for ((name, _, a), (own0, children0)) in runs.iter().zip(before) {
        let (own, children) = cpu(a);
        let (own, children) = (own - own0, children - children0);
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.2} ms |",
            ms(own),
            ms(children),
            ms(own + children) / secs as f64
        );
    }
}
