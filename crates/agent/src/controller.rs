//! `nftpolicy apply|delete|controller`: the policy controller, writing
//! Kubernetes objects into etcd as Calico resources.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use model::kube::{parse_manifests, Manifest};

use crate::daemon::DatastoreArgs;

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Manifests: a file, a directory, or `-` for standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// etcd endpoints: `etcd://HOST:2379[,…]`.
    #[arg(long, env = "NFTPOLICY_ETCD")]
    pub etcd: String,
    #[arg(long, env = "NFTPOLICY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, env = "NFTPOLICY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "NFTPOLICY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Print what would be written, write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Directory of Kubernetes manifests to mirror into etcd.
    #[arg(long)]
    pub from: PathBuf,
    #[arg(long, env = "NFTPOLICY_ETCD")]
    pub etcd: String,
    #[arg(long, env = "NFTPOLICY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, env = "NFTPOLICY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "NFTPOLICY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// How often the directory is checked for changes, in seconds.
    #[arg(long, default_value = "2")]
    pub interval: u64,
}

fn etcd_config(
    url: &str,
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> anyhow::Result<watcher::etcd::EtcdConfig> {
    DatastoreArgs {
        datastore: url.to_owned(),
        etcd_ca: ca.clone(),
        etcd_cert: cert.clone(),
        etcd_key: key.clone(),
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
    let cfg = etcd_config(&args.etcd, &args.etcd_ca, &args.etcd_cert, &args.etcd_key)?;
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
    let cfg = etcd_config(&args.etcd, &args.etcd_ca, &args.etcd_cert, &args.etcd_key)?;
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
