//! A scenario end to end: build the lab, then per step sync the pods, write
//! the step's objects, program every node with `nftpolicy sync --once`, and
//! probe.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use model::scenario::{ProbeOutcome, Scenario, NODES};

use crate::lab::DEFAULT_PROBE_TIMEOUT;
use crate::netns::ip_tool;
use crate::{Lab, LabError};

/// How a scenario runs.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// The `nftpolicy` binary run inside each node namespace.
    pub nftpolicy: PathBuf,
    /// `--backend` for `nftpolicy sync`: `nftables` or `iptables`.
    pub backend: String,
    /// `false`: leave the nodes unprogrammed (everything is allowed); for
    /// testing the lab itself.
    pub program: bool,
    /// How long a probe may take before it counts as denied.
    pub probe_timeout: Duration,
    /// How long one `nftpolicy sync --once` may take (with etcd: how long
    /// the agents may take to apply a step).
    pub sync_timeout: Duration,
    /// Where the nodes read the steps from.
    pub datastore: Datastore,
    /// Extra arguments for `nftpolicy sync` (or `run`), e.g. `--mark-mask`.
    pub extra_args: Vec<String>,
    /// With an API-server datastore: how steps are written to it.
    pub api_client: crate::ApiClient,
}

/// How the nodes get each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datastore {
    /// Files, and `nftpolicy sync --once` per node and step.
    File,
    /// A real etcd written with `nftpolicy apply|delete`, and one
    /// `nftpolicy run` agent per node (see [`crate::agents`]).
    Etcd,
    /// The fake Kubernetes API server (a test double) written as a user
    /// would, and one `nftpolicy run --datastore kubernetes:…` agent per
    /// node (KDD mode; see [`crate::apiserver`]).
    Kubernetes,
    /// The fake API server, `nftpolicy controller` mirroring it into a real
    /// etcd, and one agent per node on etcd.
    KubernetesViaEtcd,
}

impl E2eOptions {
    /// Programs nodes with `nftpolicy` using the nftables backend.
    pub fn new(nftpolicy: impl Into<PathBuf>) -> E2eOptions {
        E2eOptions {
            nftpolicy: nftpolicy.into(),
            backend: "nftables".into(),
            program: true,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            sync_timeout: Duration::from_secs(30),
            datastore: Datastore::File,
            extra_args: Vec::new(),
            api_client: crate::ApiClient::Http,
        }
    }
}

/// Runs every step of `scenario` in a lab of its own and returns one outcome
/// per probe, in order. The lab is removed before this returns, also on
/// error.
pub fn run_scenario(scenario: &Scenario, opts: &E2eOptions) -> Result<Vec<ProbeOutcome>, LabError> {
    let states = scenario.states()?;
    // The standard nodes, plus any a pod names itself, in order of first
    // appearance.
    let mut nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    for st in &states {
        for pod in st.pods() {
            if !pod.node.is_empty() && !nodes.contains(&pod.node) {
                nodes.push(pod.node);
            }
        }
    }
    let node_names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let first_pods = states.first().map(|s| s.pods()).unwrap_or_default();
    // Calico resources live in Calico's own CRDs on a KDD cluster, which
    // the Kubernetes source does not watch (README: Supported and
    // rejected). Such a scenario cannot be written to the API server:
    // each of its probes is reported as skipped, with the reason, instead
    // of being run against a cluster that lacks half of its objects.
    if opts.program
        && matches!(
            opts.datastore,
            Datastore::Kubernetes | Datastore::KubernetesViaEtcd
        )
    {
        let calico: std::collections::BTreeSet<String> = states
            .iter()
            .flat_map(|st| st.native.keys().map(ToString::to_string))
            .collect();
        if !calico.is_empty() {
            let detail = format!(
                "Calico resources ({}) are not carried by the Kubernetes API datastore",
                calico.into_iter().collect::<Vec<_>>().join(", ")
            );
            return Ok(scenario
                .steps
                .iter()
                .enumerate()
                .flat_map(|(i, step)| step.probes.iter().map(move |probe| (i + 1, probe)))
                .map(|(step, probe)| ProbeOutcome {
                    step,
                    probe: probe.clone(),
                    got: None,
                    detail: Some(detail.clone()),
                })
                .collect());
        }
    }
    // Dropped in reverse: agents, controller, the lab, etcd, API server.
    let api = match (opts.program, opts.datastore) {
        (true, Datastore::Kubernetes | Datastore::KubernetesViaEtcd) => {
            Some(crate::LabApi::start()?)
        }
        _ => None,
    };
    let etcd = match (opts.program, opts.datastore) {
        (true, Datastore::Etcd | Datastore::KubernetesViaEtcd) => Some(crate::EtcdServer::start()?),
        _ => None,
    };
    let mut lab = Lab::build(&first_pods, &scenario.externals, &node_names)?;
    lab.set_probe_timeout(opts.probe_timeout);
    lab.set_rejections_expected(!scenario.rejected.is_empty());
    // The scenario's node configuration, as agent flags.
    let mut agent_args = opts.extra_args.clone();
    agent_args.extend(scenario.config.agent_args());
    let mut controller = match (&api, &etcd, opts.datastore) {
        (Some(api), Some(etcd), Datastore::KubernetesViaEtcd) => {
            Some(crate::apiserver::Controller::start(
                &opts.nftpolicy,
                api,
                etcd,
                lab.workdir().join("controller.log"),
            )?)
        }
        _ => None,
    };
    let served: Option<&dyn crate::AgentDatastore> = match (&api, &etcd) {
        (Some(api), None) => Some(api),
        (_, Some(etcd)) => Some(etcd),
        (None, None) => None,
    };
    let mut agents = served
        .map(|d| crate::Agents::start(&lab, d, &opts.nftpolicy, &opts.backend, &agent_args))
        .transpose()?;

    let mut outcomes = Vec::new();
    for (i, (state, step)) in states.iter().zip(&scenario.steps).enumerate() {
        let step_no = i + 1;
        lab.sync_pods(&state.pods())?;
        let dir = lab.workdir().join(format!("step-{step_no}"));
        let previous = i.checked_sub(1).map(|p| &states[p]);
        match (&api, &etcd, agents.as_mut()) {
            (Some(api), etcd, Some(agents)) => {
                let revision = api.write_step(&opts.api_client, &dir, previous, state)?;
                let revision = match (etcd, controller.as_mut()) {
                    (Some(etcd), Some(c)) => c.wait_etcd(etcd, state, opts.sync_timeout)?,
                    _ => revision as i64,
                };
                agents.wait_applied(revision, opts.sync_timeout)?;
            }
            (None, Some(etcd), Some(agents)) => {
                let revision =
                    crate::agents::write_step(&opts.nftpolicy, etcd, &dir, previous, state)?;
                agents.wait_applied(revision, opts.sync_timeout)?;
            }
            _ if opts.program => {
                crate::write_state(&dir, state)?;
                lab.program_nodes_with(
                    &dir,
                    &opts.nftpolicy,
                    &opts.backend,
                    &agent_args,
                    opts.sync_timeout,
                )?;
            }
            _ => {}
        }
        let resolved = step
            .probes
            .iter()
            .map(|p| {
                state
                    .resolve_probe(p, &scenario.externals)
                    .map_err(|reason| LabError::Probe {
                        probe: p.to_string(),
                        reason,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = lab.probe_all(&resolved)?;
        for (probe, result) in step.probes.iter().zip(results) {
            outcomes.push(ProbeOutcome {
                step: step_no,
                probe: probe.clone(),
                got: result.allowed,
                detail: Some(result.detail),
            });
        }
    }
    Ok(outcomes)
}

impl Lab {
    /// Runs `ip netns exec <node-ns> <nftpolicy> sync --once --node <node>
    /// --datastore file:<datastore> --backend <backend>` for every node, all
    /// at once, and fails with the output of any that fails or outlives
    /// `timeout`.
    pub fn program_nodes(
        &self,
        datastore: &Path,
        nftpolicy: &Path,
        backend: &str,
        timeout: Duration,
    ) -> Result<(), LabError> {
        self.program_nodes_with(datastore, nftpolicy, backend, &[], timeout)
    }

    /// [`Lab::program_nodes`] with extra `nftpolicy sync` arguments.
    pub fn program_nodes_with(
        &self,
        datastore: &Path,
        nftpolicy: &Path,
        backend: &str,
        extra_args: &[String],
        timeout: Duration,
    ) -> Result<(), LabError> {
        let ip = ip_tool()?;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut running = Vec::new();
        for node in &self.nodes {
            let mut cmd = Command::new(&ip);
            cmd.args(["netns", "exec", node.netns.name()])
                .arg(nftpolicy)
                .args(["sync", "--once", "--node", &node.name])
                .arg("--datastore")
                .arg(format!("file:{}", datastore.display()))
                .args(["--backend", backend])
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let shown = format!("{cmd:?}").replace('"', "");
            let child = cmd
                .spawn()
                .map_err(|e| LabError::io(format!("running {shown}"), e))?;
            running.push((node.name.clone(), shown, spawn_waiter(child)));
        }
        // Wait for all before reporting, so no child outlives this call.
        let mut first_error = None;
        for (node, command, waiter) in running {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let failure = match waiter.finish(remaining) {
                Ok(Finished { status, .. }) if status.success() => None,
                // Programmed, with rejected objects enforced as drops.
                Ok(Finished { status, output })
                    if self.rejections_expected()
                        && status.code() == Some(1)
                        && only_rejections(&output) =>
                {
                    None
                }
                Ok(Finished { status, output }) => Some((status.to_string(), output)),
                Err(output) => Some((format!("still running after {timeout:?}, killed"), output)),
            };
            if let (Some((status, output)), None) = (failure, &first_error) {
                first_error = Some(LabError::Program {
                    node,
                    command,
                    status,
                    output,
                });
            }
        }
        crate::trace(|| {
            format!(
                "{}: programmed {} node(s) in {:?}",
                self.prefix(),
                self.nodes.len(),
                started.elapsed()
            )
        });
        first_error.map_or(Ok(()), Err)
    }
}

/// `nftpolicy sync` output whose only errors name rejected objects.
fn only_rejections(output: &str) -> bool {
    let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    !errors.is_empty() && errors.iter().all(|l| l.starts_with("error: rejected "))
}

struct Finished {
    status: std::process::ExitStatus,
    /// stderr, then stdout.
    output: String,
}

/// A child whose exit is awaited by a thread, so the caller can wait with a
/// deadline and kill it (by its own pid) when the deadline passes.
struct Waiter {
    pid: i32,
    done: mpsc::Receiver<std::io::Result<Finished>>,
}

fn spawn_waiter(mut child: std::process::Child) -> Waiter {
    let pid = child.id() as i32;
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        // Read both pipes to the end before waiting, so a chatty child never
        // blocks on a full pipe.
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        let out = out_reader.join().unwrap_or_default();
        let result = child.wait().map(|status| Finished {
            status,
            output: format!("{}{}", err, out).trim_end().to_owned(),
        });
        let _ = tx.send(result);
    });
    Waiter { pid, done }
}

impl Waiter {
    /// The child's exit, or `Err(output so far)` after killing it.
    fn finish(self, timeout: Duration) -> Result<Finished, String> {
        match self.done.recv_timeout(timeout) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(format!("waiting for it: {e}")),
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // The waiter thread now reaps it and hands over the output
                // (unless a grandchild still holds the pipes open).
                match self.done.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(f)) => Err(f.output),
                    _ => Err(String::new()),
                }
            }
        }
    }
}
