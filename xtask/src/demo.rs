//! `cargo xtask demo`: nftpolicy at work, for a person seeing it for the
//! first time (and a smoke test: any verdict that does not hold makes it
//! exit non-zero).
//!
//! A two-node lab in network namespaces with the pods of the
//! `web-deny-all` scenario (`tests/scenarios/web-deny-all.yaml`); one `nftpolicy run` agent per node inside
//! the node's namespace, reading a file datastore; then the story: the
//! connectivity matrix without policy, with `web-deny-all` (and its chains
//! and drop counters in the kernel, and `nftpolicy explain`), and after the
//! policy is deleted — once per backend.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::Lab;
use model::scenario::{Family, Probe, ProbeEnd, ProbePort, ResolvedProbe, Scenario, StepState};
use model::semantics::Evaluator;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::BackendChoice;

/// The scenario whose pods and policy the demo shows.
const SCENARIO: &str = "tests/scenarios/web-deny-all.yaml";
const POLICY_CHAIN: &str = "cali-pi-default.web-deny-all";
/// The iptables policy chain with its counters, as the demo shows it.
const LIST_POLICY_CHAIN: [&str; 7] = [
    "iptables-legacy",
    "-w",
    "-L",
    POLICY_CHAIN,
    "-v",
    "-n",
    "-x",
];
const NODES: [&str; 2] = model::scenario::NODES;
/// How long agents may take to start, or to apply a change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Polling interval of the bounded waits: the agents offer no notification
/// of an applied change that this demo may rely on.
const POLL: Duration = Duration::from_millis(50);
/// Denied probes sent between the two counter readings.
const EXTRA_DENIED_PROBES: usize = 3;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Which dataplane backend(s) to show, one after the other.
    #[arg(long, value_enum, default_value_t = BackendChoice::Both)]
    backend: BackendChoice,
    /// Do not install missing tools with apt-get.
    #[arg(long)]
    no_install: bool,
    /// Milliseconds a probe may take before it counts as denied.
    #[arg(long, default_value_t = 1000)]
    probe_timeout_ms: u64,
}

/// Runs the demo; `Ok(false)` when some verdict did not hold.
pub fn run(args: &DemoArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask demo needs root: it creates network namespaces");
    }
    heading("Preparing");
    if args.no_install {
        let unusable = crate::tools::unusable_tools()?;
        if !unusable.is_empty() {
            bail!(
                "tools missing or not working (run without --no-install to install them): {}",
                unusable.join("; ")
            );
        }
    } else if !crate::tools::install_tools()? {
        return Ok(false);
    }
    let nftpolicy = crate::build_nftpolicy()?;
    let shown_from = Instant::now();
    let scenario_path = crate::root().join(SCENARIO);
    let scenario = Scenario::load(&scenario_path).map_err(anyhow::Error::msg)?;
    let states = scenario.states()?;
    let [before, with_policy, after] = &states[..] else {
        bail!(
            "{}: expected 3 steps (no policy, policy, deleted)",
            scenario_path.display()
        );
    };
    let pods = before.pods();
    let web = pods
        .iter()
        .find(|p| p.namespace == "default" && p.name == "web")
        .context("the scenario has no pod default/web")?
        .clone();

    let mut lab = Lab::build(&pods, &[], &NODES)?;
    lab.set_probe_timeout(Duration::from_millis(args.probe_timeout_ms));
    let datastore = lab.workdir().join("datastore");
    let mut demo = Demo {
        lab,
        nftpolicy,
        datastore,
        publications: 0,
        web_node: web.node.clone(),
        web_iface: web.interface.clone(),
        checked: 0,
        wrong: Vec::new(),
    };

    println!("\nA two-node cluster made of network namespaces:");
    for p in &pods {
        let ips: Vec<String> = p.ips.iter().map(|ip| ip.to_string()).collect();
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|s| format!("{}/{}", s.port, s.protocol))
            .collect();
        println!(
            "  pod {:16} on {}  {:32} serving {}  (interface {} on the node)",
            format!("{}/{}", p.namespace, p.name),
            p.node,
            ips.join(" "),
            ports.join(" "),
            p.interface
        );
    }
    println!(
        "Datastore: the directory {} (YAML files the agents re-read)",
        demo.datastore.display()
    );
    demo.publish(before)?;

    for backend in args.backend.backends() {
        demo.story(backend, before, with_policy, after)?;
    }

    heading("Done");
    let secs = format!(
        "{:.1}s, of which {:.1}s the lab and agents, the rest tools and build",
        started.elapsed().as_secs_f64(),
        shown_from.elapsed().as_secs_f64()
    );
    if demo.wrong.is_empty() {
        println!(
            "demo: showed {} backend(s) ({}) enforcing NetworkPolicy web-deny-all on a two-node namespace lab \
             with file-datastore agents: traffic allowed, denied (drop counters rising), explained, allowed again — \
             all {} verdicts as expected ({secs})",
            args.backend.backends().len(),
            args.backend.backends().join(", "),
            demo.checked
        );
        Ok(true)
    } else {
        for w in &demo.wrong {
            println!("  WRONG: {w}");
        }
        println!(
            "demo: FAILED — {} of {} verdicts did not hold ({secs})",
            demo.wrong.len(),
            demo.checked
        );
        Ok(false)
    }
}

struct Demo {
    // Declared before nothing that outlives it: agents are local to each
    // backend's story and drop before the lab.
    lab: Lab,
    nftpolicy: PathBuf,
    datastore: PathBuf,
    publications: usize,
    web_node: String,
    web_iface: String,
    checked: usize,
    wrong: Vec<String>,
}

impl Demo {
    fn story(
        &mut self,
        backend: &str,
        before: &StepState,
        with_policy: &StepState,
        after: &StepState,
    ) -> anyhow::Result<()> {
        heading(&format!("Backend {backend}"));
        let agents = Agents::start(&self.lab, &self.nftpolicy, backend, &self.datastore)?;
        println!(
            "Started one agent per node: {}",
            agents
                .agents
                .iter()
                .map(|a| a.command.as_str())
                .collect::<Vec<_>>()
                .join("\n                            ")
        );
        agents.wait_ready(APPLY_TIMEOUT)?;
        println!("Both agents report /readiness: they have programmed their node.");

        subheading(&format!(
            "[{backend}] 1. No policy: every pod reaches every port"
        ));
        self.matrix(before, backend)?;

        subheading(&format!(
            "[{backend}] 2. Apply NetworkPolicy default/web-deny-all"
        ));
        println!("  podSelector app=web, ingress: [] — web accepts no connections at all.");
        let took = "the agents picked the change up and programmed it in";
        self.change(&agents, backend, with_policy, true, took)?;
        println!("  client → web is denied on every port; web → client still works (the policy is ingress-only).");

        subheading(&format!(
            "[{backend}] 3. What the kernel holds on {} (web's node)",
            self.web_node
        ));
        self.ruleset(backend, with_policy)?;

        subheading(&format!("[{backend}] 4. nftpolicy explain"));
        self.explain()?;

        subheading(&format!("[{backend}] 5. Delete the policy"));
        let took = format!("chain {POLICY_CHAIN} removed after");
        self.change(&agents, backend, after, false, &took)?;
        println!("  Everything is allowed again.");
        drop(agents);
        Ok(())
    }

    /// Makes the datastore directory hold exactly `state`'s objects: written
    /// to a staging directory, renamed in file by file (so an agent never
    /// reads a half-written file), then the files no longer wanted removed.
    fn publish(&mut self, state: &StepState) -> anyhow::Result<()> {
        self.publications += 1;
        let staging = self
            .lab
            .workdir()
            .join(format!("staging-{}", self.publications));
        let files = lab::write_state(&staging, state)?;
        std::fs::create_dir_all(&self.datastore)?;
        let mut names = BTreeSet::new();
        for f in &files {
            let name = f.file_name().context("written file has a name")?.to_owned();
            std::fs::rename(f, self.datastore.join(&name))?;
            names.insert(name);
        }
        for entry in std::fs::read_dir(&self.datastore)? {
            let entry = entry?;
            if !names.contains(&entry.file_name()) {
                std::fs::remove_file(entry.path())?;
            }
        }
        let _ = std::fs::remove_dir(&staging);
        Ok(())
    }

    /// Waits until the policy chain exists (or is gone) on web's node.
    /// Publishes `state`, waits until the policy chain is there (or gone),
    /// says how long that `took`, and shows the matrix.
    fn change(
        &mut self,
        agents: &Agents,
        backend: &str,
        state: &StepState,
        present: bool,
        took: &str,
    ) -> anyhow::Result<()> {
        self.publish(state)?;
        let waited = self.wait_chain(agents, backend, present)?;
        println!("  ({took} {:.1}s)", waited.as_secs_f64());
        self.matrix(state, backend)
    }

    fn wait_chain(
        &self,
        agents: &Agents,
        backend: &str,
        present: bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + APPLY_TIMEOUT;
        loop {
            agents.check_running()?;
            if self.chain_exists(backend)? == present {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "chain {POLICY_CHAIN} still {} on {} after {APPLY_TIMEOUT:?}\n{}",
                    if present { "missing" } else { "present" },
                    self.web_node,
                    agents.log_tails()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn chain_exists(&self, backend: &str) -> anyhow::Result<bool> {
        let out = match backend {
            "iptables" => self.in_node(&["iptables-legacy", "-w", "-n", "-L", POLICY_CHAIN])?,
            _ => self.in_node(&["nft", "list", "chain", "ip", "nftpolicy", POLICY_CHAIN])?,
        };
        Ok(out.status.success())
    }

    /// Runs a command inside web's node namespace.
    fn in_node(&self, argv: &[&str]) -> anyhow::Result<std::process::Output> {
        let ns = self
            .lab
            .node_namespace(&self.web_node)
            .context("web's node is in the lab")?;
        Command::new(lab::netns::find_tool("ip").context("ip is installed")?)
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} in {ns}", argv.join(" ")))
    }

    fn in_node_text(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.in_node(argv)?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Probes every pod from every other pod on every port it serves and
    /// prints the matrix; each cell is checked against the reference
    /// semantics of `state`.
    fn matrix(&mut self, state: &StepState, backend: &str) -> anyhow::Result<()> {
        let pods = state.pods();
        let targets: Vec<(ProbeEnd, u16, model::calico::Protocol)> = pods
            .iter()
            .flat_map(|p| {
                p.ports.iter().map(|s| {
                    (
                        ProbeEnd::Pod {
                            namespace: p.namespace.clone(),
                            name: p.name.clone(),
                        },
                        s.port,
                        s.protocol,
                    )
                })
            })
            .collect();
        let sources: Vec<ProbeEnd> = pods
            .iter()
            .map(|p| ProbeEnd::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            })
            .collect();
        let eval = Evaluator::new(&state.cluster);
        let mut probes: Vec<(usize, usize, ResolvedProbe, bool)> = Vec::new();
        for (si, from) in sources.iter().enumerate() {
            for (ti, (to, port, protocol)) in targets.iter().enumerate() {
                if from == to {
                    continue;
                }
                let probe = Probe {
                    from: from.clone(),
                    to: to.clone(),
                    port: ProbePort::Number(*port),
                    protocol: *protocol,
                    expect_allow: true,
                    family: Family::V4,
                };
                let resolved = state
                    .resolve_probe(&probe, &[])
                    .map_err(anyhow::Error::msg)?;
                let expected = eval.evaluate(&resolved.packet()).allowed();
                probes.push((si, ti, resolved, expected));
            }
        }
        let resolved: Vec<ResolvedProbe> = probes.iter().map(|(_, _, r, _)| r.clone()).collect();
        let results = self.lab.probe_all(&resolved)?;

        let headers: Vec<String> = targets
            .iter()
            .map(|(to, port, proto)| format!("{to} {port}/{proto}"))
            .collect();
        let first = 16;
        let width = headers.iter().map(String::len).max().unwrap_or(0).max(12) + 2;
        println!();
        print!("  {:first$}", "from \\ to");
        for h in &headers {
            print!("{h:width$}");
        }
        println!();
        for (si, from) in sources.iter().enumerate() {
            print!("  {:first$}", from.to_string());
            for ti in 0..targets.len() {
                let cell = match probes.iter().position(|(s, t, _, _)| *s == si && *t == ti) {
                    None => "·".to_owned(),
                    Some(i) => {
                        let (_, _, r, expected) = &probes[i];
                        let got = results[i].allowed;
                        self.checked += 1;
                        match got {
                            Some(allowed) if allowed == *expected => verdict(allowed).to_owned(),
                            _ => {
                                self.wrong.push(format!(
                                    "[{backend}] {}: got {}, expected {} ({})",
                                    r.probe,
                                    got.map_or("skipped", verdict),
                                    verdict(*expected),
                                    results[i].detail
                                ));
                                format!("{} (WRONG)", got.map_or("skipped", verdict))
                            }
                        }
                    }
                };
                // Pad by characters: the check marks are several bytes.
                let pad = width.saturating_sub(cell.chars().count());
                print!("{cell}{}", " ".repeat(pad));
            }
            println!();
        }
        println!(
            "  (✔ a request/response round trip completed; ✘ no answer within {:?}; · same pod)",
            self.lab.probe_timeout()
        );
        Ok(())
    }

    /// The policy's chains on web's node, and its drop counter rising as
    /// more denied probes arrive.
    fn ruleset(&mut self, backend: &str, state: &StepState) -> anyhow::Result<()> {
        let tw_chain = format!("cali-tw-{}", self.web_iface);
        let read_counter = |demo: &Demo| -> anyhow::Result<u64> {
            match backend {
                "iptables" => {
                    let listing = demo.in_node_text(&LIST_POLICY_CHAIN)?;
                    iptables_first_rule_packets(&listing)
                        .context("no rule in the iptables policy chain")
                }
                _ => {
                    let table = demo.in_node_text(&["nft", "list", "table", "ip", "nftpolicy"])?;
                    let tw = chain_block(&table, &tw_chain).context("no cali-tw- chain for web")?;
                    tw.lines()
                        .find(|l| l.contains("End of tier") && l.contains("drop"))
                        .and_then(counter_packets)
                        .context("no end-of-tier drop counter in web's cali-tw- chain")
                }
            }
        };
        match backend {
            "iptables" => {
                println!(
                    "  iptables-legacy-save -c (the lines of {POLICY_CHAIN} and the jump to it):\n"
                );
                let save = self.in_node_text(&["iptables-legacy-save", "-c", "-t", "filter"])?;
                for line in save.lines().filter(|l| l.contains(POLICY_CHAIN)) {
                    println!("    {line}");
                }
                println!("\n  iptables-legacy -L {POLICY_CHAIN} -v -n -x:\n");
                let listing = self.in_node_text(&LIST_POLICY_CHAIN)?;
                indent(&listing);
                println!("  A packet to web walks {tw_chain} → {POLICY_CHAIN}; no rule there accepts it, so {tw_chain} drops it at the end of the tier.");
            }
            _ => {
                println!(
                    "  From `nft list table ip nftpolicy` on {}:\n",
                    self.web_node
                );
                let table = self.in_node_text(&["nft", "list", "table", "ip", "nftpolicy"])?;
                for chain in [POLICY_CHAIN, tw_chain.as_str()] {
                    let block = chain_block(&table, chain)
                        .with_context(|| format!("no chain {chain} in the table"))?;
                    indent(&block);
                }
                println!("  A packet to web enters {tw_chain}, jumps to {POLICY_CHAIN}, which accepts nothing;");
                println!("  back in {tw_chain} the \"End of tier\" rule drops it. That counter:");
            }
        }
        let first = read_counter(self)?;
        println!("\n  drop counter now: {first} packets");
        let probe = Probe {
            from: ProbeEnd::Pod {
                namespace: "default".into(),
                name: "client".into(),
            },
            to: ProbeEnd::Pod {
                namespace: "default".into(),
                name: "web".into(),
            },
            port: ProbePort::Number(80),
            protocol: model::calico::Protocol::Tcp,
            expect_allow: false,
            family: Family::V4,
        };
        let resolved = state
            .resolve_probe(&probe, &[])
            .map_err(anyhow::Error::msg)?;
        let results = self.lab.probe_all(&vec![resolved; EXTRA_DENIED_PROBES])?;
        let denied = results.iter().filter(|r| r.allowed == Some(false)).count();
        self.checked += EXTRA_DENIED_PROBES;
        if denied != EXTRA_DENIED_PROBES {
            self.wrong.push(format!(
                "[{backend}] {} of {EXTRA_DENIED_PROBES} extra probes default/client → default/web 80/TCP were allowed",
                EXTRA_DENIED_PROBES - denied
            ));
        }
        let second = read_counter(self)?;
        println!(
            "  sent {EXTRA_DENIED_PROBES} more connections client → web:80 ({denied} denied); drop counter now: {second} packets (+{})",
            second.saturating_sub(first)
        );
        self.checked += 1;
        // Each denied connection drops at least its SYN.
        if second < first + EXTRA_DENIED_PROBES as u64 {
            self.wrong.push(format!(
                "[{backend}] the drop counter rose by {} for {EXTRA_DENIED_PROBES} denied connections",
                second.saturating_sub(first)
            ));
        }
        Ok(())
    }

    fn explain(&mut self) -> anyhow::Result<()> {
        let datastore = format!("file:{}", self.datastore.display());
        let argv = [
            "explain",
            "--from",
            "default/client",
            "--to",
            "default/web",
            "--port",
            "80",
            "--datastore",
            &datastore,
        ];
        println!("  $ nftpolicy {}\n", argv.join(" "));
        let out = Command::new(&self.nftpolicy)
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .context("running nftpolicy explain")?;
        indent(&String::from_utf8_lossy(&out.stdout));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            indent(&stderr);
        }
        self.checked += 1;
        // explain exits 1 for a denied connection.
        if out.status.code() != Some(1) || !String::from_utf8_lossy(&out.stdout).contains("DENIED")
        {
            self.wrong.push(format!(
                "nftpolicy explain did not say DENIED ({})",
                out.status
            ));
        }
        Ok(())
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed {
        "✔ allow"
    } else {
        "✘ deny"
    }
}

fn heading(title: &str) {
    println!("\n{}\n{title}\n{}", "═".repeat(72), "═".repeat(72));
}

fn subheading(title: &str) {
    println!(
        "\n── {title} {}",
        "─".repeat(68usize.saturating_sub(title.chars().count()))
    );
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// `chain NAME { … }` out of `nft list table` output.
fn chain_block(table: &str, chain: &str) -> Option<String> {
    let start = format!("chain {chain} {{");
    let mut lines = table.lines().skip_while(|l| l.trim() != start);
    let first = lines.next()?;
    let mut block = vec![first.trim_start_matches('\t').to_owned()];
    for line in lines {
        block.push(line.strip_prefix('\t').unwrap_or(line).to_owned());
        if line.trim() == "}" {
            break;
        }
    }
    Some(block.join("\n"))
}

/// N of `counter packets N bytes M`.
fn counter_packets(line: &str) -> Option<u64> {
    let rest = line.split("counter packets ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The packet count of the first rule in `iptables -L -v -n -x` output.
fn iptables_first_rule_packets(listing: &str) -> Option<u64> {
    listing
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("pkts"))
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Agents

struct Agent {
    node: String,
    netns: String,
    health_port: u16,
    child: Option<Child>,
    log: PathBuf,
    command: String,
}

/// One `nftpolicy run` per node; SIGTERM (SIGKILL if it lingers) and reaped
/// on drop. Each also dies with this process (PR_SET_PDEATHSIG), which
/// covers the lab's Ctrl-C handler: it exits the process without unwinding.
struct Agents {
    agents: Vec<Agent>,
}

impl Agents {
    fn start(
        lab: &Lab,
        nftpolicy: &Path,
        backend: &str,
        datastore: &Path,
    ) -> anyhow::Result<Agents> {
        let ip = lab::netns::find_tool("ip").context("ip is installed")?;
        let mut agents = Agents { agents: Vec::new() };
        for node in NODES {
            let netns = lab
                .node_namespace(node)
                .context("node is in the lab")?
                .to_owned();
            let health_port = free_port(&netns)?;
            let metrics_port = free_port(&netns)?;
            let log = lab.workdir().join(format!("agent-{node}-{backend}.log"));
            let log_file = File::create(&log)?;
            let mut cmd = Command::new(&ip);
            cmd.args(["netns", "exec", &netns])
                .arg(nftpolicy)
                .args(["run", "--node", node, "--backend", backend])
                .arg("--datastore")
                .arg(format!("file:{}", datastore.display()))
                .args(["--file-poll-ms", "100"])
                .args(["--health-addr", &format!("127.0.0.1:{health_port}")])
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file);
            // SAFETY: prctl is async-signal-safe; nothing else runs between
            // fork and exec. `ip netns exec` execs the agent, which keeps it.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
            let command = format!("ip netns exec {netns} nftpolicy run --node {node} --backend {backend} --datastore file:… --health-addr 127.0.0.1:{health_port}");
            let child = cmd.spawn().with_context(|| format!("starting {command}"))?;
            agents.agents.push(Agent {
                node: node.to_owned(),
                netns,
                health_port,
                child: Some(child),
                log,
                command,
            });
        }
        Ok(agents)
    }

    /// Fails (with the logs) if an agent has exited.
    fn check_running(&self) -> anyhow::Result<()> {
        for a in &self.agents {
            let pid = a.child.as_ref().map(|c| c.id() as i32);
            // Signal 0: is it still there (and not a zombie we could reap)?
            let gone = match pid {
                None => true,
                Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        s.rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true),
            };
            if gone {
                bail!("the agent on {} exited\n{}", a.node, self.log_tails());
            }
        }
        Ok(())
    }

    /// Waits until every agent's /readiness says 200.
    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<&Agent> = self.agents.iter().collect();
        loop {
            self.check_running()?;
            pending
                .retain(|a| http_status(&a.netns, a.health_port, "/readiness").ok() != Some(200));
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let nodes: Vec<&str> = pending.iter().map(|a| a.node.as_str()).collect();
                bail!(
                    "agents not ready after {timeout:?}: {}\n{}",
                    nodes.join(" "),
                    self.log_tails()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn log_tails(&self) -> String {
        let mut s = String::new();
        for a in &self.agents {
            let text = std::fs::read_to_string(&a.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("--- {} ({}):\n", a.node, a.log.display()));
            for l in &lines[lines.len().saturating_sub(15)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(child) = &a.child {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for a in &mut self.agents {
            if let Some(child) = a.child.take() {
                lab::agents::reap(child, deadline);
            }
        }
    }
}

/// Runs `f` on a thread that entered the namespace `/run/netns/<netns>`.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    Ok(lab::netns::run_in(netns, f)?)
}

/// A TCP port free on the namespace's loopback (just now).
fn free_port(netns: &str) -> anyhow::Result<u16> {
    let port = in_netns(netns, || {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr())
    })??
    .port();
    Ok(port)
}

/// The status code of `GET path` on 127.0.0.1:`port` inside the namespace.
fn http_status(netns: &str, port: u16, path: &str) -> anyhow::Result<u16> {
    let response = in_netns(netns, || -> std::io::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })??;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response: {response:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nft_chains_and_counters() {
        let table = "table ip nftpolicy {\n\tchain a {\n\t\tcounter packets 1 bytes 60 drop comment \"x\"\n\t}\n\tchain b {\n\t\tmeta mark & 0x00020000 == 0x00000000 counter packets 7 bytes 420 drop comment \"End of tier default\"\n\t}\n}\n";
        let b = chain_block(table, "b").unwrap();
        assert!(b.starts_with("chain b {") && b.ends_with('}'));
        assert!(!b.contains("chain a"));
        assert_eq!(b.lines().find_map(counter_packets), Some(7));
        assert_eq!(chain_block(table, "c"), None);
    }

    #[test]
    fn reads_iptables_packet_counts() {
        let listing = "Chain cali-pi-default.web-deny-all (1 references)\n    pkts      bytes target     prot opt in     out     source               destination\n       5      300            all  --  *      *       0.0.0.0/0            0.0.0.0/0            /* x */\n";
        assert_eq!(iptables_first_rule_packets(listing), Some(5));
    }
}
