//! Node agents over etcd or the Kubernetes API (the test double): one
//! `nftpolicy run` daemon per lab node, inside the node's namespace, and
//! the step writer that puts a scenario step into etcd with `nftpolicy
//! apply|delete` and waits until every agent has programmed it (for the
//! API server, see [`crate::apiserver`]).
//!
//! A node namespace has a loopback of its own, so the etcd on the host's
//! 127.0.0.1 is out of its reach. Each node therefore gets a small TCP relay:
//! a listener made inside the node namespace on 127.0.0.1 at etcd's own
//! port, whose connections the lab carries to the real etcd. The agent sees
//! `etcd://127.0.0.1:<port>` as it would on a real node, and the host's
//! network is left alone. The agents' health and metrics endpoints listen on
//! the node's loopback too; the lab reaches them from a thread that entered
//! the namespace.
//!
//! Agents get SIGTERM (then SIGKILL after [`STOP_TIMEOUT`]) and are reaped
//! when the [`Agents`] guard drops, also on a failing test; they die with the
//! thread that started them (PR_SET_PDEATHSIG) if the lab process itself is
//! killed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use model::kube::KubeObject;
use model::scenario::StepState;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::etcd::{json_number, set_parent_death_signal, EtcdServer, HTTP_TIMEOUT};
use crate::netns::ip_tool;
use crate::{Lab, LabError};

/// Where each agent serves `/liveness`, `/readiness`, `/status` (inside its
/// node namespace, whose loopback is its own).
pub const HEALTH_ADDR: &str = "127.0.0.1:9099";
/// Where each agent serves `/metrics` (inside its node namespace).
pub const METRICS_ADDR: &str = "127.0.0.1:9091";
/// How long an agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling interval of the bounded waits below: the agents offer no
/// notification of an applied revision but their status endpoint.
const POLL: Duration = Duration::from_millis(20);

/// A datastore agents can be started on.
pub trait AgentDatastore {
    /// The agents' `--datastore`.
    fn datastore_arg(&self) -> String;
    /// The port of the server on the host's 127.0.0.1, relayed into every
    /// node namespace; `None` where no server is involved.
    fn relayed_port(&self) -> Option<u16>;
}

impl AgentDatastore for EtcdServer {
    fn datastore_arg(&self) -> String {
        self.url()
    }
    fn relayed_port(&self) -> Option<u16> {
        Some(self.client_port())
    }
}

impl AgentDatastore for crate::LabApi {
    fn datastore_arg(&self) -> String {
        self.datastore()
    }
    fn relayed_port(&self) -> Option<u16> {
        Some(self.port())
    }
}

/// The file datastore: the lab's files are on the shared filesystem, so
/// no relay is needed.
impl AgentDatastore for Path {
    fn datastore_arg(&self) -> String {
        format!("file:{}", self.display())
    }
    fn relayed_port(&self) -> Option<u16> {
        None
    }
}

/// What an agent's `/status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStatus {
    /// The datastore revision its kernel reflects.
    pub applied_revision: i64,
    /// In sync with the datastore and the last apply succeeded.
    pub ready: bool,
}

struct Agent {
    node: String,
    netns_path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

/// The agents of a lab; stopped on drop.
pub struct Agents {
    agents: Vec<Agent>,
    nftpolicy: PathBuf,
    backend: String,
    extra_args: Vec<String>,
    /// Their `--datastore`.
    etcd_url: String,
    /// Runs the etcd relays; dropping it closes them.
    relays: Option<tokio::runtime::Runtime>,
    /// Whether the relays carry connections (see [`Agents::cut_datastore`]).
    relay_open: tokio::sync::watch::Sender<bool>,
}

impl Agents {
    /// Starts one `nftpolicy run --backend <backend> [extra_args]` per node
    /// of `lab`, on `datastore`: etcd, the Kubernetes API server (the test
    /// double; `--datastore kubernetes:<kubeconfig>`, KDD mode, and
    /// `applied_revision` is then its resource version), or a directory of
    /// files. Returns once every agent runs (not necessarily ready: see
    /// [`Agents::wait_applied`]). Logs go to
    /// `<lab workdir>/agent-<node>.log`.
    pub fn start(
        lab: &Lab,
        datastore: &(impl AgentDatastore + ?Sized),
        nftpolicy: &Path,
        backend: &str,
        extra_args: &[String],
    ) -> Result<Agents, LabError> {
        let port = datastore.relayed_port();
        let relays = match port {
            Some(_) => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("nplab-relay")
                    .enable_all()
                    .build()
                    .map_err(|e| LabError::io("starting the relay runtime", e))?,
            ),
            None => None,
        };
        let mut agents = Agents {
            agents: Vec::new(),
            nftpolicy: nftpolicy.to_owned(),
            backend: backend.to_owned(),
            extra_args: extra_args.to_vec(),
            etcd_url: datastore.datastore_arg(),
            relays,
            relay_open: tokio::sync::watch::Sender::new(true),
        };
        for node in &lab.nodes {
            let netns_path = node.netns.path();
            if let Some(port) = port {
                agents.relay(&netns_path, port)?;
            }
            agents.agents.push(Agent {
                node: node.name.clone(),
                netns_path,
                child: None,
                log: lab.workdir().join(format!("agent-{}.log", node.name)),
            });
        }
        for i in 0..agents.agents.len() {
            agents.spawn(i)?;
        }
        Ok(agents)
    }

    /// [`Agents::start`] on the file datastore `--datastore file:<dir>`.
    /// Their `applied_revision` counts the datastore's re-reads since each
    /// agent started.
    pub fn start_file(
        lab: &Lab,
        dir: &Path,
        nftpolicy: &Path,
        backend: &str,
        extra_args: &[String],
    ) -> Result<Agents, LabError> {
        Agents::start(lab, dir, nftpolicy, backend, extra_args)
    }

    /// Listens on 127.0.0.1:`port` inside the namespace at `netns_path` and
    /// carries every connection to the host's 127.0.0.1:`port`.
    fn relay(&self, netns_path: &Path, port: u16) -> Result<(), LabError> {
        let listener = in_netns(netns_path, move || {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
        })?
        .map_err(|e| LabError::io(format!("relay listener on 127.0.0.1:{port}"), e))?;
        let rt = self.relays.as_ref().expect("lives until drop");
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| LabError::io("relay listener", e))?;
        let open = self.relay_open.subscribe();
        // The runtime's threads were started on the host's namespace, so
        // their connects reach the real etcd.
        rt.spawn(async move {
            while let Ok((mut inside, _)) = listener.accept().await {
                if !*open.borrow() {
                    continue; // cut off: the connection is closed at once
                }
                let mut open = open.clone();
                tokio::spawn(async move {
                    if let Ok(mut etcd) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inside, &mut etcd) => {}
                            _ = open.wait_for(|open| !*open) => {}
                        }
                    }
                });
            }
        });
        Ok(())
    }

    /// Cuts the nodes off from the datastore's server: every relayed
    /// connection is closed, new ones are closed as they come, until
    /// [`Agents::restore_datastore`] (a network partition of the nodes).
    pub fn cut_datastore(&self) {
        self.relay_open.send_replace(false);
    }

    /// Ends [`Agents::cut_datastore`].
    pub fn restore_datastore(&self) {
        self.relay_open.send_replace(true);
    }

    fn index(&self, node: &str) -> Result<usize, LabError> {
        self.agents
            .iter()
            .position(|a| a.node == node)
            .ok_or_else(|| LabError::Setup(format!("no agent for node {node:?}")))
    }

    fn spawn(&mut self, i: usize) -> Result<(), LabError> {
        let ip = ip_tool()?;
        let agent = &self.agents[i];
        let netns = agent
            .netns_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Appending: a restarted agent's log follows its predecessor's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log)
            .map_err(|e| LabError::io(agent.log.display().to_string(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::io(agent.log.display().to_string(), e))?;
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &netns])
            .arg(&self.nftpolicy)
            .env_remove("KUBECONFIG")
            .args(["run", "--node", &agent.node])
            .args(["--datastore", &self.etcd_url])
            .args(["--backend", &self.backend])
            .args(["--health-addr", HEALTH_ADDR, "--metrics-addr", METRICS_ADDR])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        set_parent_death_signal(&mut cmd);
        let shown = format!("{cmd:?}").replace('"', "");
        crate::trace(|| format!("starting {shown}"));
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("running {shown}"), e))?;
        self.agents[i].child = Some(child);
        Ok(())
    }

    /// Sends `signal` to `node`'s agent and reaps it (SIGKILL after
    /// [`STOP_TIMEOUT`] if it will not go).
    pub fn stop(&mut self, node: &str, signal: Signal) -> Result<(), LabError> {
        let i = self.index(node)?;
        stop_child(&mut self.agents[i], signal);
        Ok(())
    }

    /// Starts `node`'s agent again (after [`Agents::stop`]).
    pub fn restart(&mut self, node: &str) -> Result<(), LabError> {
        let i = self.index(node)?;
        if self.agents[i].child.is_some() {
            return Err(LabError::Setup(format!("the agent of {node} still runs")));
        }
        self.spawn(i)
    }

    /// The process id of `node`'s agent (`ip netns exec` execs it), if it
    /// runs.
    pub fn pid(&self, node: &str) -> Result<Option<u32>, LabError> {
        Ok(self.agents[self.index(node)?]
            .child
            .as_ref()
            .map(|c| c.id()))
    }

    /// What `node`'s agents (this one and those before a restart) logged.
    pub fn log(&self, node: &str) -> Result<String, LabError> {
        let agent = &self.agents[self.index(node)?];
        std::fs::read_to_string(&agent.log)
            .map_err(|e| LabError::io(agent.log.display().to_string(), e))
    }

    /// `node`'s agent's `/status`.
    pub fn status(&self, node: &str) -> Result<AgentStatus, LabError> {
        let agent = &self.agents[self.index(node)?];
        let (code, body) = get(&agent.netns_path, HEALTH_ADDR, "/status")?;
        let applied = json_number(&body, "applied_revision");
        match (code, applied) {
            (200, Some(applied_revision)) => Ok(AgentStatus {
                applied_revision,
                ready: body.contains("\"ready\":true"),
            }),
            _ => Err(LabError::command(
                format!("GET /status of the agent on {node}"),
                format!("HTTP {code}: {body}"),
            )),
        }
    }

    /// `node`'s agent's `/metrics` (Prometheus text).
    pub fn metrics(&self, node: &str) -> Result<String, LabError> {
        let agent = &self.agents[self.index(node)?];
        let (code, body) = get(&agent.netns_path, METRICS_ADDR, "/metrics")?;
        if code != 200 {
            return Err(LabError::command(
                format!("GET /metrics of the agent on {node}"),
                format!("HTTP {code}: {body}"),
            ));
        }
        Ok(body)
    }

    /// Waits until every agent is ready with `applied_revision >= revision`.
    /// Fails with the agents' states and log tails when one exits or the
    /// time runs out.
    pub fn wait_applied(&mut self, revision: i64, timeout: Duration) -> Result<(), LabError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut pending: Vec<usize> = (0..self.agents.len()).collect();
        let mut last: Vec<String> = Vec::new();
        loop {
            last.clear();
            let mut still = Vec::new();
            for i in pending {
                let agent = &mut self.agents[i];
                if let Some(child) = agent.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        agent.child = None;
                        return Err(LabError::Program {
                            node: agent.node.clone(),
                            command: "nftpolicy run".into(),
                            status: format!("exited ({status})"),
                            output: log_tail(&agent.log),
                        });
                    }
                }
                let node = self.agents[i].node.clone();
                match self.status(&node) {
                    Ok(s) if s.ready && s.applied_revision >= revision => {}
                    Ok(s) => {
                        last.push(format!("{node}: {s:?}"));
                        still.push(i);
                    }
                    Err(e) => {
                        last.push(format!("{node}: {e}"));
                        still.push(i);
                    }
                }
            }
            if still.is_empty() {
                crate::trace(|| {
                    format!(
                        "agents applied revision {revision} after {:?}",
                        started.elapsed()
                    )
                });
                return Ok(());
            }
            if Instant::now() >= deadline {
                let first = &self.agents[still[0]];
                return Err(LabError::Program {
                    node: first.node.clone(),
                    command: "nftpolicy run".into(),
                    status: format!(
                        "revision {revision} not applied after {timeout:?}: {}",
                        last.join("; ")
                    ),
                    output: log_tail(&first.log),
                });
            }
            pending = still;
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        // SIGTERM to all first, then reap each: they exit in parallel.
        for a in &self.agents {
            if let Some(c) = &a.child {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            }
        }
        for a in &mut self.agents {
            stop_child(a, Signal::SIGTERM);
        }
        if let Some(rt) = self.relays.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn stop_child(agent: &mut Agent, signal: Signal) {
    let Some(child) = agent.child.take() else {
        return;
    };
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, signal);
    reap(child, Instant::now() + STOP_TIMEOUT);
}

/// Waits for `child` to exit until `deadline`, then kills it; either way
/// it is reaped.
pub fn reap(mut child: Child, deadline: Instant) {
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}

/// The last lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `f` on a fresh thread inside the lab namespace `name` (as
/// [`Lab::node_namespace`] names it), e.g. to read a node's nftables.
pub fn in_namespace<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    crate::netns::run_in(name, f)
}

/// Runs `f` on a fresh thread inside the namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    crate::netns::run_in_path(path, f)
}

/// `GET path` from 127.0.0.1:`port` inside the network namespace named
/// `netns`: the status code and the body.
pub fn http_get(netns: &str, port: u16, path: &str) -> Result<(u16, String), LabError> {
    let netns_path = Path::new(crate::netns::NETNS_DIR).join(netns);
    get(&netns_path, &format!("127.0.0.1:{port}"), path)
}

/// `GET path` from `addr` inside the namespace at `netns_path`.
fn get(netns_path: &Path, addr: &str, path: &str) -> Result<(u16, String), LabError> {
    let addr: SocketAddr = addr.parse().expect("a literal address");
    let stream = in_netns(netns_path, move || {
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
    })?
    .map_err(|e| LabError::io(format!("connecting to {addr}"), e))?;
    http(stream, "GET", path, None).map_err(|e| LabError::io(format!("GET {path} from {addr}"), e))
}

/// One HTTP/1.1 request on `stream` (closed after it); the status code and
/// the body.
pub(crate) fn http(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------
// Writing steps into etcd

/// Writes `state` into etcd as `nftpolicy apply` would from its manifests,
/// and deletes with `nftpolicy delete` what `previous` had and `state` has
/// not (and the endpoint of a pod that moved to another node). Returns
/// etcd's revision after the writes.
pub fn write_step(
    nftpolicy: &Path,
    etcd: &EtcdServer,
    dir: &Path,
    previous: Option<&StepState>,
    state: &StepState,
) -> Result<i64, LabError> {
    let apply_dir = dir.join("apply");
    let written = crate::write_state(&apply_dir, state)?;
    if !written.is_empty() {
        nftpolicy_etcd(nftpolicy, etcd, "apply", &[apply_dir])?;
    }
    if let Some(prev) = previous {
        let gone = StepState {
            kube: prev
                .kube
                .iter()
                .filter(|(k, o)| match (state.kube.get(k), o) {
                    (None, _) => true,
                    (Some(KubeObject::Pod(new)), KubeObject::Pod(old)) => {
                        node_of(new) != node_of(old)
                    }
                    _ => false,
                })
                .map(|(k, o)| (k.clone(), o.clone()))
                .collect(),
            native: prev
                .native
                .iter()
                .filter(|(k, _)| !state.native.contains_key(k))
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
            ..StepState::default()
        };
        let delete_dir = dir.join("delete");
        let files = crate::write_state(&delete_dir, &gone)?;
        if !files.is_empty() {
            nftpolicy_etcd(nftpolicy, etcd, "delete", &files)?;
        }
    }
    etcd.revision()
}

fn node_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// `nftpolicy <verb> -f <paths…> --etcd <url>`, failing with its output.
pub fn nftpolicy_etcd(
    nftpolicy: &Path,
    etcd: &EtcdServer,
    verb: &str,
    paths: &[PathBuf],
) -> Result<(), LabError> {
    let mut cmd = Command::new(nftpolicy);
    cmd.arg(verb);
    for p in paths {
        cmd.arg("-f").arg(p);
    }
    cmd.args(["--etcd", &etcd.url()]).stdin(Stdio::null());
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(|e| LabError::io(format!("running {shown}"), e))?;
    if !out.status.success() {
        return Err(LabError::command(
            shown,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
