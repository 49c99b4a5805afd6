//! The `nftpolicy` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod config;
mod controller;
mod daemon;
mod dataplane;
mod datastore;
mod explain;
mod explain_kernel;
mod http;
mod lanes;
mod metrics;
mod render;
mod sync;
mod tamper;

#[derive(Parser)]
#[command(
    name = "nftpolicy",
    version,
    about = "Kubernetes NetworkPolicy enforcement with nftables"
)]
struct Cli {
    /// A YAML file of flag values (`backend: nftables`, `resync-interval: 90`,
    /// …); flags and NFTPOLICY_* variables take precedence over it.
    #[arg(long, global = true, env = "NFTPOLICY_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "NFTPOLICY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax), e.g. `info`, `programmer=debug`.
    #[arg(long, global = true, env = "NFTPOLICY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate scenario files against the reference semantics (no kernel).
    Check {
        /// Scenario files or directories (searched for *.yaml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Which policy and rule decide a connection, and its path through the chains.
    Explain(explain::ExplainArgs),
    /// The node agent: watch the datastore, keep this node's kernel programmed.
    Run(daemon::RunArgs),
    /// Write Kubernetes objects into etcd as Calico resources (the policy controller).
    Apply(controller::ApplyArgs),
    /// Delete the Calico resources standing for Kubernetes objects from etcd.
    Delete(controller::ApplyArgs),
    /// Keep etcd in sync with the Kubernetes API server (or, with --from, a
    /// directory of manifests): the policy controller of etcd mode.
    Controller(controller::ControllerArgs),
    /// Program this node's kernel from a datastore (`--once`).
    Sync(sync::SyncArgs),
    /// Print a node's ruleset without touching the kernel: `nft -f` input, or
    /// with `--backend iptables` the `ipset restore` and `iptables-restore
    /// --noflush` input of each address family.
    Render {
        #[command(flatten)]
        dataplane: dataplane::DataplaneArgs,
        /// Kubernetes and/or Calico manifests (files or directories).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Large allocations (128 KiB and up: the state's tables, a compile's
/// vectors, the netlink batch) get their own mappings, returned to the
/// kernel when freed. glibc otherwise raises this threshold each time such
/// a block is freed, up to 32 MiB, and serves the next ones from the heap,
/// where the first list's freed decode buffers and a cold compile's
/// temporaries stay in the process: at 250,000 pods the agent's peak RSS
/// is 18 MiB lower this way (`cargo xtask agent-memory`, README).
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it runs at start,
    // before the agent starts its threads.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed; large blocks stay on the heap");
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply(&args) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    fix_mmap_threshold();
    let ok = match cli.command {
        Command::Check { paths } => check::run(&paths),
        Command::Explain(args) => explain::run(&args),
        Command::Sync(args) => sync::run(&args),
        Command::Run(args) => daemon::run(args),
        Command::Apply(args) => controller::apply(&args, false),
        Command::Delete(args) => controller::apply(&args, true),
        Command::Controller(args) => controller::controller(&args),
        Command::Render { dataplane, paths } => render::run(&dataplane, &paths),
    };
    match ok {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
