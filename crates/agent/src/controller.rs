//! `nftpolicy apply|delete|controller`: the policy controller, writing
//! Kubernetes objects into etcd as Calico resources — from files
//! (`apply`, `delete`, `controller --from DIR`) or by watching the API
//! server (`controller`, see `watcher::kubernetes::mirror`).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use model::kube::{parse_manifests, Manifest};
use watcher::kubernetes::lease::LeaseConfig;
use watcher::kubernetes::ClusterAccess;

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
    /// Mirror this directory of Kubernetes manifests into etcd instead of
    /// watching the API server.
    #[arg(long, conflicts_with_all = ["kubeconfig", "leader_elect", "lease", "leader_identity"])]
    pub from: Option<PathBuf>,
    /// The API server to watch, as a kubeconfig (default: KUBECONFIG when
    /// set, else the pod's service account).
    #[arg(long, env = "NFTPOLICY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// etcd endpoints: `etcd://HOST:2379[,…]` (also `etcds://`, `https://`),
    /// as the agent's `--datastore`.
    #[arg(long, visible_alias = "etcd", env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// With --from: how often the directory is checked for changes, in seconds.
    #[arg(long, default_value = "2")]
    pub interval: u64,
    /// Watching the API server: write only while holding the Lease (leader
    /// election), so that replicas can stand by. `false` is for a single
    /// replica that is never run twice.
    #[arg(long, env = "NFTPOLICY_LEADER_ELECT", default_value = "true", action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The Lease of the leader election, NAMESPACE/NAME.
    #[arg(
        long,
        env = "NFTPOLICY_LEASE",
        default_value = "kube-system/nftpolicy-controller"
    )]
    pub lease: String,
    /// This replica's name in the Lease (default: the host name, which in a
    /// pod is the pod's name).
    #[arg(long, env = "NFTPOLICY_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
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
    if ClusterAccess::from_datastore(&args.datastore).is_some() {
        anyhow::bail!(
            "--datastore {:?}: the controller writes etcd (etcd mode); set the datastore \
             (nftpolicy-config's `datastore`) to etcd://HOST:2379[,…]. With the datastore \
             `kubernetes` the agents watch the API server themselves and no controller is needed",
            args.datastore
        );
    }
    let cfg = etcd_config(&args.datastore, &args.tls)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    if let Some(dir) = &args.from {
        rt.block_on(watcher::controller::run_controller(
            dir,
            &cfg,
            Duration::from_secs(args.interval.max(1)),
        ))?;
        return Ok(true);
    }
    let access = match &args.kubeconfig {
        Some(path) => ClusterAccess::Kubeconfig(path.clone()),
        None => ClusterAccess::from_datastore("kubernetes").expect("the Kubernetes datastore")?,
    };
    let election = if args.leader_elect {
        let (namespace, name) = args
            .lease
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
            .with_context(|| format!("--lease {:?}: expected NAMESPACE/NAME", args.lease))?;
        let identity = match &args.leader_identity {
            Some(id) => id.clone(),
            None => host_name()?,
        };
        Some(LeaseConfig::new(namespace, name, &identity))
    } else {
        None
    };
    rt.block_on(watcher::kubernetes::mirror::run(
        access, &cfg, election, None,
    ))?;
    Ok(true)
}

/// This machine's (in a pod: the pod's) name.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name for --leader-identity")?;
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty(),
        "the host name is empty: set --leader-identity"
    );
    Ok(name.to_owned())
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
