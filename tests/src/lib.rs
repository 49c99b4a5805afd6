//! The kernel lab: a small cluster made of network namespaces on this
//! machine, for checking the real dataplane against scenario files.
//!
//! - one namespace per node, joined by a veth (a bridge namespace when there
//!   are more than two nodes), addresses from 198.18.0.0/24 and
//!   fd00:198:18::/64;
//! - one namespace per pod, hanging off its node by a veth whose node end has
//!   the pod's Calico interface name (`cali…`) and whose pod end is `eth0`,
//!   routed as Calico routes pods (host routes to `cali…` plus proxy ARP on
//!   the node, a fixed link-local next hop for IPv6);
//! - one namespace per external host, hanging off the first node by `ext<N>`;
//! - servers on every declared pod port and on every port a probe aims at an
//!   external host; probes that connect from the source namespace.
//!
//! The lab compiles no policy. [`run_scenario`] writes each step's objects
//! to a directory and runs `nftpolicy sync --once` inside every node
//! namespace, then probes.
//!
//! Everything the lab makes lives inside namespaces named `nplab<pid>-…`,
//! removed on drop, on Ctrl-C, and — after a crash — by the next run.

pub mod agents;
pub mod apiserver;
mod e2e;
pub mod etcd;
pub mod generate;
mod lab;
pub mod netns;
mod objects;
mod probe;
mod serve;

pub use agents::{AgentDatastore, Agents};
pub use apiserver::{ApiClient, LabApi};
pub use e2e::{run_scenario, Datastore, E2eOptions};
pub use etcd::EtcdServer;
pub use lab::{Lab, INFRA_V4, INFRA_V6};
pub use objects::write_state;
pub use probe::ProbeResult;

/// Why the lab could not do its work. Probe verdicts are not errors; these
/// are: the lab could not be built, a node could not be programmed, or the
/// lab itself misbehaved (an answer from the wrong host).
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An I/O error or a failed command, as the shared test support words
    /// them.
    #[error(transparent)]
    Support(testkit::TestkitError),
    #[error("lab setup: {0}")]
    Setup(String),
    #[error("programming {node} ({command}) failed: {status}\n{output}")]
    Program {
        node: String,
        command: String,
        status: String,
        output: String,
    },
    #[error("probe {probe}: {reason}")]
    Probe { probe: String, reason: String },
    #[error(transparent)]
    Scenario(#[from] model::scenario::ScenarioError),
}

/// The `nftpolicy` binary of this workspace, built (debug) if needed, for
/// tests that program nodes. `NFTPOLICY_BIN` overrides it.
pub fn nftpolicy_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("NFTPOLICY_BIN") {
        return p.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = testkit::cargo_command()
        .args(["build", "-q", "-p", "nftpolicy"])
        .current_dir(&root)
        .status()
        .expect("running cargo build -p nftpolicy");
    assert!(status.success(), "cargo build -p nftpolicy failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug/nftpolicy")
}

/// With `NPLAB_TRACE` set, the lab says on stderr what it does and how
/// long each part took.
pub(crate) fn trace(msg: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("NPLAB_TRACE").is_some_and(|v| !v.is_empty())) {
        eprintln!("nplab: {}", msg());
    }
}

impl LabError {
    pub(crate) fn command(what: impl Into<String>, detail: impl Into<String>) -> LabError {
        LabError::Support(testkit::TestkitError::Command {
            what: what.into(),
            detail: detail.into(),
        })
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Support(testkit::TestkitError::Io {
            what: what.into(),
            source,
        })
    }
}

/// Failures of the shared test support (etcd, namespaces) in the lab's terms.
impl From<testkit::TestkitError> for LabError {
    fn from(e: testkit::TestkitError) -> LabError {
        match e {
            testkit::TestkitError::Missing(what) => LabError::Setup(what),
            e => LabError::Support(e),
        }
    }
}
