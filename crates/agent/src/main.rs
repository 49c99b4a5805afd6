//! The `nftpolicy` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod dataplane;
mod render;

#[derive(Parser)]
#[command(
    name = "nftpolicy",
    version,
    about = "Kubernetes NetworkPolicy enforcement with nftables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate scenario files against the reference semantics (no kernel).
    Check {
        /// Scenario files or directories (searched for *.yaml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print a node's ruleset (nft -f input) without touching the kernel.
    Render {
        #[command(flatten)]
        dataplane: dataplane::DataplaneArgs,
        /// Kubernetes and/or Calico manifests (files or directories).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.command {
        Command::Check { paths } => check::run(&paths),
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
