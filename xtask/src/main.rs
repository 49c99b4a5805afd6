//! Project tasks: `cargo xtask e2e` (scenarios against the kernel dataplane)
//! and `cargo xtask test` (everything CI runs).

mod apiserver;
mod bench;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use lab::{run_scenario, E2eOptions};
use model::scenario::{collect_files, Scenario, Tally};

mod demo;

mod fuzz;

mod latency;

mod cluster;

mod agent_memory;
mod soak;

mod fuzz_targets;

mod tools;

mod fresh_clone;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nftpolicy project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run scenarios against real packets in network namespaces, with the
    /// nodes programmed by `nftpolicy sync --once` (needs root).
    E2e(E2eArgs),
    /// Show nftpolicy working: a two-node namespace lab with agents, a
    /// policy applied and deleted, matrices, rulesets, counters (needs root;
    /// installs missing tools).
    Demo(demo::DemoArgs),
    /// The project's one test command (what CI runs): install missing
    /// tools, `cargo test --workspace`, the model check, the e2e runs, the
    /// fuzzers, the soak and the fresh-clone check.
    Test(TestArgs),
    /// Dataplane benchmark: nftables over netlink vs `nft -f` vs iptables
    /// mode (needs root); results in target/bench.
    Bench(bench::BenchArgs),
    /// Programming latency of an agent over etcd with 1,000 and 10,000
    /// pods: one pod's labels changed 20 times, p50/p99 from the agent's
    /// histogram (needs root).
    Latency(latency::LatencyArgs),
    /// Load test: one agent over etcd under a steady stream of pod changes
    /// for minutes; latency, memory and errors, pass/fail (needs root).
    Soak(soak::SoakArgs),
    /// The agent's own memory (the `nftpolicy run` binary over a real etcd)
    /// on the benchmark's cluster, 10,000 policies / 250,000 pods by
    /// default (needs root).
    AgentMemory(agent_memory::AgentMemoryArgs),
    /// cargo-fuzz targets in fuzz/ (selector parser, manifest decoding,
    /// compiler), N seconds each on stable via RUSTC_BOOTSTRAP=1; fails on
    /// a crash and prints the reproducer.
    FuzzTargets(fuzz_targets::FuzzTargetsArgs),
    /// Clone the committed tree into an empty temporary directory and run
    /// the demo and the model check there (what `cargo xtask test` does
    /// last): the repository must work with nothing beside it.
    FreshClone,
    /// Serve the fake Kubernetes API server (a test double, not a cluster)
    /// on loopback until Ctrl-C, and write a kubeconfig for kubectl and
    /// `nftpolicy --datastore kubernetes:FILE`.
    Apiserver(apiserver::ApiserverArgs),
}

#[derive(clap::Args)]
struct E2eArgs {
    /// Which dataplane backend(s) to program.
    #[arg(long, value_enum, default_value_t = BackendChoice::Nftables)]
    backend: BackendChoice,
    /// Leave the nodes unprogrammed (everything allowed): tests the lab
    /// itself.
    #[arg(long)]
    no_program: bool,
    /// Milliseconds a probe may take before it counts as denied.
    #[arg(long, default_value_t = 1500)]
    probe_timeout_ms: u64,
    /// `file`: `nftpolicy sync --once` per node and step. `etcd`: a real
    /// etcd written with `nftpolicy apply|delete`, one `nftpolicy run`
    /// agent per node. `kubernetes`: the fake API server (a test double)
    /// written as a user would, agents watching it (KDD mode).
    /// `kubernetes-etcd`: the fake API server, `nftpolicy controller`
    /// writing a real etcd, agents on etcd.
    #[arg(long, value_enum, default_value_t = DatastoreChoice::File)]
    datastore: DatastoreChoice,
    /// With an API-server datastore: write the steps with the real
    /// `kubectl` (create, replace, replace --subresource=status, delete)
    /// or with plain HTTP requests.
    #[arg(long, value_enum, default_value_t = ApiClientChoice::Kubectl)]
    api_client: ApiClientChoice,
    /// Instead of scenario files: N generated clusters, each checked model
    /// = nftables = iptables (failures shrunk into target/fuzz-failures).
    #[arg(long, value_name = "N", conflicts_with_all = ["paths", "no_program"])]
    fuzz: Option<u64>,
    /// Seed of the generated clusters (default: random, printed).
    #[arg(long, requires = "fuzz")]
    seed: Option<u64>,
    /// Program the nodes with `--fused-lookup` (nftables backend only):
    /// every probe must still get the model's verdict.
    /// With --fuzz: compare `nftables --fused-lookup` with the model too.
    #[arg(long, conflicts_with = "no_program")]
    fused_lookup: bool,
    /// Program the nodes with `--table-groups N` (nftables backend only):
    /// each node's tables cut into N, one per group of namespaces.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with_all = ["no_program", "fuzz"])]
    table_groups: u16,
    /// Scenario files or directories (default: tests/scenarios, and the
    /// paths in NFTPOLICY_EXTRA_SCENARIOS if set).
    paths: Vec<PathBuf>,
}

impl E2eArgs {
    /// A programmed run of scenario files with the default probe timeout,
    /// as `cargo xtask test` runs them.
    fn ci(
        backend: BackendChoice,
        datastore: DatastoreChoice,
        api_client: ApiClientChoice,
        paths: Vec<PathBuf>,
    ) -> E2eArgs {
        E2eArgs {
            backend,
            no_program: false,
            probe_timeout_ms: 1500,
            datastore,
            api_client,
            fuzz: None,
            seed: None,
            fused_lookup: false,
            table_groups: 1,
            paths,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DatastoreChoice {
    File,
    Etcd,
    Kubernetes,
    KubernetesEtcd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ApiClientChoice {
    Kubectl,
    Http,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Nftables,
    Iptables,
    Both,
}

impl BackendChoice {
    fn backends(self) -> &'static [&'static str] {
        match self {
            BackendChoice::Nftables => &["nftables"],
            BackendChoice::Iptables => &["iptables"],
            BackendChoice::Both => &["nftables", "iptables"],
        }
    }
}

/// Runs `task` after the tool check of `cargo xtask test`'s first phase:
/// every command that builds the agent (etcd-client's build needs `protoc`)
/// or uses the lab works on a clean machine too, instead of failing deep in
/// a build with another tool's error.
fn with_tools(task: impl FnOnce() -> anyhow::Result<bool>) -> anyhow::Result<bool> {
    tools::install_tools()?;
    task()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::E2e(args) => with_tools(|| e2e(&args)),
        Task::Test(args) => test(&args),
        Task::Bench(args) => with_tools(|| bench::bench(&args)),
        Task::Latency(args) => with_tools(|| latency::run(&args)),
        Task::Soak(args) => with_tools(|| soak::run(&args)),
        Task::AgentMemory(args) => with_tools(|| agent_memory::run(&args)),
        Task::FuzzTargets(args) => fuzz_targets::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::FreshClone => fresh_clone::run(),
        Task::Apiserver(args) => apiserver::run(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

/// The scenario paths used when none are given: the project's own, and
/// any named in `NFTPOLICY_EXTRA_SCENARIOS` (see testkit).
fn default_scenario_paths() -> Vec<PathBuf> {
    let mut paths = vec![root().join("tests/scenarios")];
    paths.extend(testkit::extra_scenario_paths());
    paths
}

fn cargo() -> Command {
    let mut cmd = testkit::cargo_command();
    cmd.current_dir(root());
    cmd
}

/// `cargo build -p nftpolicy`, returning the binary's path as cargo reports
/// it (whatever the target directory is).
fn build_nftpolicy() -> anyhow::Result<PathBuf> {
    build_nftpolicy_profile(false)
}

/// Builds the `nftpolicy` binary (`release` for measurements that mean
/// something) and returns its path.
fn build_nftpolicy_profile(release: bool) -> anyhow::Result<PathBuf> {
    let out = cargo()
        .arg("build")
        .args(release.then_some("--release"))
        .args([
            "-p",
            "nftpolicy",
            "--bin",
            "nftpolicy",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build -p nftpolicy")?;
    if !out.status.success() {
        bail!("cargo build -p nftpolicy failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "nftpolicy")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo build -p nftpolicy reported no nftpolicy executable")
}

fn e2e(args: &E2eArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask e2e needs root: it creates network namespaces");
    }
    if let Some(cases) = args.fuzz {
        let seed = args.seed.unwrap_or_else(fuzz::random_seed);
        let nftpolicy = fuzz::nftpolicy_binary(build_nftpolicy)?;
        return fuzz::run(
            cases,
            seed,
            &nftpolicy,
            &fuzz::failures_dir(&root()),
            args.fused_lookup,
        );
    }
    let paths = if args.paths.is_empty() {
        default_scenario_paths()
    } else {
        args.paths.clone()
    };
    let files = collect_files(&paths).map_err(anyhow::Error::msg)?;
    if files.is_empty() {
        bail!("no scenario files under the given paths");
    }
    // Unprogrammed nodes need no binary (and the lab stays testable while
    // nftpolicy does not build).
    let nftpolicy = if args.no_program {
        PathBuf::from("nftpolicy")
    } else {
        build_nftpolicy()?
    };
    let mut opts = E2eOptions::new(nftpolicy);
    opts.program = !args.no_program;
    if args.fused_lookup {
        if args.backend != BackendChoice::Nftables {
            bail!("--fused-lookup needs --backend nftables (iptables mode has no fused form)");
        }
        opts.extra_args.push("--fused-lookup".into());
    }
    if args.table_groups > 1 {
        if args.backend != BackendChoice::Nftables {
            bail!("--table-groups needs --backend nftables (iptables mode has one filter table)");
        }
        opts.extra_args
            .extend(["--table-groups".into(), args.table_groups.to_string()]);
    }
    opts.probe_timeout = Duration::from_millis(args.probe_timeout_ms);
    opts.datastore = match args.datastore {
        DatastoreChoice::File => lab::Datastore::File,
        DatastoreChoice::Etcd => lab::Datastore::Etcd,
        DatastoreChoice::Kubernetes => lab::Datastore::Kubernetes,
        DatastoreChoice::KubernetesEtcd => lab::Datastore::KubernetesViaEtcd,
    };
    let api = matches!(
        opts.datastore,
        lab::Datastore::Kubernetes | lab::Datastore::KubernetesViaEtcd
    );
    opts.api_client = match args.api_client {
        ApiClientChoice::Http => lab::ApiClient::Http,
        ApiClientChoice::Kubectl if api && opts.program => {
            lab::ApiClient::Kubectl(lab::netns::find_tool("kubectl").context(
                "kubectl not found (cargo xtask test installs it; or --api-client http)",
            )?)
        }
        ApiClientChoice::Kubectl => lab::ApiClient::Http,
    };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let backends = args.backend.backends();
    let mut total = Tally::default();
    for backend in backends {
        opts.backend = (*backend).to_owned();
        let writer = match &opts.api_client {
            lab::ApiClient::Http => "HTTP",
            lab::ApiClient::Kubectl(_) => "kubectl",
        };
        let mode = if opts.program && opts.datastore == lab::Datastore::Etcd {
            format!("nodes programmed by nftpolicy run agents over etcd, backend {backend}")
        } else if opts.program && opts.datastore == lab::Datastore::Kubernetes {
            format!(
                "steps written with {writer} to the fake API server (a test double), \
                 nodes programmed by nftpolicy run agents watching it (KDD), backend {backend}"
            )
        } else if opts.program && opts.datastore == lab::Datastore::KubernetesViaEtcd {
            format!(
                "steps written with {writer} to the fake API server (a test double), \
                 nftpolicy controller -> etcd -> nftpolicy run agents, backend {backend}"
            )
        } else if opts.program {
            format!("nodes programmed by nftpolicy sync, backend {backend}")
        } else {
            "nodes NOT programmed (--no-program): everything is allowed".to_owned()
        };
        writeln!(out, "== e2e: {} scenario(s), {mode}", files.len())?;
        let started = Instant::now();
        let mut tally = Tally::default();
        for file in &files {
            // A scenario that fails to load or run counts as one failure;
            // the rest still run.
            match Scenario::load(file) {
                Ok(scenario) => match run_scenario(&scenario, &opts) {
                    Ok(outcomes) => tally.report(&scenario, &outcomes, &mut out),
                    Err(e) => tally.error(&format!("{}: {e}", file.display()), &mut out),
                },
                Err(e) => tally.error(&e, &mut out),
            }
            out.flush()?;
        }
        if backends.len() > 1 {
            writeln!(
                out,
                "{backend}: {} ({:.1}s)",
                tally.closing_line(),
                started.elapsed().as_secs_f64()
            )?;
        } else {
            writeln!(out, "== e2e took {:.1}s", started.elapsed().as_secs_f64())?;
        }
        total.passed += tally.passed;
        total.failed += tally.failed;
        total.skipped += tally.skipped;
    }
    writeln!(out, "{}", total.closing_line())?;
    Ok(total.failed == 0)
}

// ---------------------------------------------------------------------------
// cargo xtask test

#[derive(clap::Args)]
struct TestArgs {
    /// Start at this phase (1-based; the tool check always runs), to go on
    /// after a failure has been fixed. CI runs every phase.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(usize))]
    from_phase: usize,
}

fn test(args: &TestArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let scenario_paths: Vec<String> = default_scenario_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let phases: &[(&str, &dyn Fn() -> anyhow::Result<bool>)] = &[
        (
            "install missing tools, check each works",
            &tools::install_tools,
        ),
        ("cargo test --workspace", &|| {
            run_status(cargo().args(["test", "--workspace"]))
        }),
        ("nftpolicy check (model)", &|| {
            run_status(
                cargo()
                    .args(["run", "--quiet", "-p", "nftpolicy", "--", "check"])
                    .args(&scenario_paths),
            )
        }),
        ("e2e, both backends", &|| {
            e2e(&E2eArgs::ci(
                BackendChoice::Both,
                DatastoreChoice::File,
                ApiClientChoice::Http,
                default_scenario_paths(),
            ))
        }),
        (
            "e2e over etcd with nftpolicy run agents, nftables backend, \
             tables cut into 3 namespace groups",
            &|| {
                e2e(&E2eArgs {
                    table_groups: 3,
                    ..E2eArgs::ci(
                        BackendChoice::Nftables,
                        DatastoreChoice::Etcd,
                        ApiClientChoice::Http,
                        default_scenario_paths(),
                    )
                })
            },
        ),
        (
            "e2e through the fake Kubernetes API server (a test double): KDD agents, \
             nftables, every scenario; iptables and controller -> etcd on the step scenarios, \
             written with kubectl",
            &kubernetes_e2e,
        ),
        ("cargo-fuzz targets, 15 s each", &|| {
            fuzz_targets::run(&fuzz_targets::FuzzTargetsArgs::ci())
        }),
        (
            "churn soak: 10,000 pods, 100 changes/s for 30 s through etcd",
            &|| soak::run(&soak::SoakArgs::ci()),
        ),
        ("fuzz: 200 cases, seed 1", &|| {
            e2e(&E2eArgs {
                fuzz: Some(200),
                seed: Some(1),
                ..E2eArgs::ci(
                    BackendChoice::Both,
                    DatastoreChoice::File,
                    ApiClientChoice::Http,
                    Vec::new(),
                )
            })
        }),
        (
            "fresh clone with nothing beside it: demo and model check",
            &fresh_clone::run,
        ),
    ];
    let mut done = Vec::new();
    for (i, (name, phase)) in phases.iter().enumerate() {
        if i > 0 && i + 1 < args.from_phase {
            println!(
                "\n==== [{}/{}] {name}: skipped (--from-phase)",
                i + 1,
                phases.len()
            );
            continue;
        }
        println!("\n==== [{}/{}] {name}", i + 1, phases.len());
        let phase_start = Instant::now();
        let ok = match phase() {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("error: {e:#}");
                false
            }
        };
        let took = phase_start.elapsed().as_secs_f64();
        if !ok {
            println!("\n==== summary");
            for (n, t) in &done {
                println!("ok      {n} ({t:.1}s)");
            }
            println!("FAILED  {name} ({took:.1}s)");
            println!(
                "cargo xtask test: FAILED at phase {}/{} ({name})",
                i + 1,
                phases.len()
            );
            return Ok(false);
        }
        done.push((name, took));
    }
    println!("\n==== summary");
    for (n, t) in &done {
        println!("ok      {n} ({t:.1}s)");
    }
    let skipped = args.from_phase.saturating_sub(2).min(phases.len() - 1);
    println!(
        "cargo xtask test: all {} phases passed in {:.1}s{}",
        phases.len() - skipped,
        started.elapsed().as_secs_f64(),
        if skipped > 0 {
            format!(" ({skipped} skipped with --from-phase)")
        } else {
            String::new()
        }
    );
    Ok(true)
}

/// The scenarios with several steps: what changes between steps must be
/// enforced by the running agents.
const STEP_SCENARIOS: &[&str] = &[
    "tests/scenarios/steps-pod-recreate.yaml",
    "tests/scenarios/steps-policy-delete.yaml",
    "tests/scenarios/steps-namespace-label-change.yaml",
    "tests/scenarios/steps-pod-label-change.yaml",
];

/// `cargo xtask test`'s Kubernetes API phase: every scenario through KDD
/// agents (nftables, steps written over HTTP); the step scenarios with the
/// iptables backend and through controller -> etcd, written with kubectl.
fn kubernetes_e2e() -> anyhow::Result<bool> {
    let steps: Vec<PathBuf> = STEP_SCENARIOS.iter().map(|p| root().join(p)).collect();
    let runs = [
        (
            BackendChoice::Nftables,
            DatastoreChoice::Kubernetes,
            ApiClientChoice::Http,
            default_scenario_paths(),
        ),
        (
            BackendChoice::Iptables,
            DatastoreChoice::Kubernetes,
            ApiClientChoice::Kubectl,
            steps.clone(),
        ),
        (
            BackendChoice::Nftables,
            DatastoreChoice::KubernetesEtcd,
            ApiClientChoice::Kubectl,
            steps,
        ),
    ];
    let mut ok = true;
    for (backend, datastore, api_client, paths) in runs {
        ok &= e2e(&E2eArgs::ci(backend, datastore, api_client, paths))?;
    }
    Ok(ok)
}

fn run_status(cmd: &mut Command) -> anyhow::Result<bool> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    Ok(status.success())
}
