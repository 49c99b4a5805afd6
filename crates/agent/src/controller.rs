//! `nftpolicy apply|delete|controller`: the policy controller, writing
//! Kubernetes objects into etcd as Calico resources.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use model::kube::{parse_manifests, Manifest};

use crate::daemon::DatastoreArgs;
use crate::dataplane::EtcdTlsArgs;

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Manifests: a file, a directory, or `-` for standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// etcd endpoints: `etcd://HOST:2379[,…]` (also `etcds://`, `https://`),
    /// as the agent's `--datastore`.
    #[arg(long, visible_alias = "etcd", env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// Print what would be written, write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Directory of Kubernetes manifests to mirror into etcd.
    #[arg(long)]
    pub from: PathBuf,
    /// etcd endpoints: `etcd://HOST:2379[,…]` (also `etcds://`, `https://`),
    /// as the agent's `--datastore`.
    #[arg(long, visible_alias = "etcd", env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// How often the directory is checked for changes, in seconds.
    #[arg(long, default_value = "2")]
    pub interval: u64,
}

fn etcd_config(url: &str, tls: &EtcdTlsArgs) -> anyhow::Result<watcher::etcd::EtcdConfig> {
    DatastoreArgs {
        datastore: url.to_owned(),
        tls: tls.clone(),
        file_poll_ms: 0,
    }
    .etcd()
}

fn read_manifests(files: &[String]) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            out.extend(parse_manifests("<stdin>", &text)?);
            continue;
        }
        for path in watcher::files::manifest_files(&[PathBuf::from(f)])? {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.extend(parse_manifests(&path.display().to_string(), &text)?);
        }
    }
    Ok(out)
}

pub fn apply(args: &ApplyArgs, delete: bool) -> anyhow::Result<bool> {
    let manifests = read_manifests(&args.files)?;
    let cfg = etcd_config(&args.datastore, &args.tls)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let changes = rt.block_on(async {
        let client = cfg
            .connect(&watcher::etcd::EtcdOptions::default())
            .await
            .context("connecting to etcd")?;
        let changes = if delete {
            watcher::controller::delete(&client, &manifests, args.dry_run).await?
        } else {
            watcher::controller::apply(&client, &manifests, args.dry_run).await?
        };
        anyhow::Ok(changes)
    })?;
    for c in &changes {
        if args.dry_run {
            println!("{c} (dry run)");
            if let Some(v) = &c.value {
                println!("  {}", v.to_json());
            }
        } else {
            println!("{c}");
        }
    }
    Ok(true)
}

pub fn controller(args: &ControllerArgs) -> anyhow::Result<bool> {
    let cfg = etcd_config(&args.datastore, &args.tls)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(watcher::controller::run_controller(
        &args.from,
        &cfg,
        Duration::from_secs(args.interval.max(1)),
    ))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{ApplyArgs, ControllerArgs};

    #[derive(Parser)]
    struct Apply {
        #[command(flatten)]
        args: ApplyArgs,
    }

    #[derive(Parser)]
    struct Controller {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn datastore_flag_as_the_agent_names_it_and_etcd_as_an_alias() {
        for flag in ["--datastore", "--etcd"] {
            let a = Apply::try_parse_from(["apply", "-f", "x.yaml", flag, "etcd://127.0.0.1:2379"])
                .unwrap();
            assert_eq!(a.args.datastore, "etcd://127.0.0.1:2379");
            let c =
                Controller::try_parse_from(["controller", "--from", "d", flag, "etcd://h:2379"])
                    .unwrap();
            assert_eq!(c.args.datastore, "etcd://h:2379");
        }
    }
}
