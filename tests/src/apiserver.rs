//! The lab over the Kubernetes API — the fake API server of
//! `testkit::apiserver`, a test double — in two arrangements:
//!
//! - **KDD**: every node's agent watches the API server itself
//!   (`nftpolicy run --datastore kubernetes:<kubeconfig>`), through a relay
//!   into the node's namespace as for etcd;
//! - **controller → etcd**: `nftpolicy controller` watches the API server
//!   and writes a real etcd, which the agents watch.
//!
//! A step is written as a user and the kubelet would write it: objects
//! created (POST), changed (PUT), deleted (DELETE), and a pod's address and
//! phase written through its `status` subresource once it exists — either
//! over HTTP directly or with the real `kubectl` (`create -f`, `replace -f`,
//! `replace --subresource=status -f`, `delete -f`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use model::kube::{KubeKey, KubeKind, KubeObject};
use model::scenario::StepState;
use serde_json::Value;
use testkit::apiserver::FakeApiServer;

use crate::etcd::{set_parent_death_signal, EtcdServer};
use crate::LabError;

/// How the lab writes steps to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiClient {
    /// Plain HTTP requests (fast: the full scenario pass).
    Http,
    /// The real `kubectl` (this binary).
    Kubectl(PathBuf),
}

/// The user the agents authenticate as (the double's RBAC faults name it).
pub const AGENT_USER: &str = "system:serviceaccount:kube-system:nftpolicy-node";
/// The user the lab writes steps as.
pub const ADMIN_USER: &str = "kubernetes-admin";

/// A fake API server for one lab, with kubeconfigs for the agents and the
/// lab's own writes.
pub struct LabApi {
    pub server: FakeApiServer,
    pub agent_kubeconfig: PathBuf,
    pub admin_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl LabApi {
    /// Starts the double with frequent bookmarks (they tell the agents how
    /// far every kind is complete, which is what [`crate::Agents::wait_applied`]
    /// waits on).
    pub fn start() -> Result<LabApi, LabError> {
        let server = FakeApiServer::start_on(
            "127.0.0.1:0".parse().expect("literal"),
            testkit::apiserver::Options {
                bookmark_interval: Duration::from_millis(100),
                ..Default::default()
            },
        )
        .map_err(|e| LabError::Setup(format!("starting the fake API server: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("nplab-api-")
            .tempdir()
            .map_err(|e| LabError::io("a temporary directory for kubeconfigs", e))?;
        let agent_kubeconfig = dir.path().join("agent.kubeconfig");
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        let setup = |e: testkit::TestkitError| LabError::Setup(e.to_string());
        server
            .write_kubeconfig(&agent_kubeconfig, Some(AGENT_USER))
            .map_err(setup)?;
        server
            .write_kubeconfig(&admin_kubeconfig, Some(ADMIN_USER))
            .map_err(setup)?;
        Ok(LabApi {
            server,
            agent_kubeconfig,
            admin_kubeconfig,
            dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// `kubernetes:<agent kubeconfig>`, the agents' `--datastore`.
    pub fn datastore(&self) -> String {
        format!("kubernetes:{}", self.agent_kubeconfig.display())
    }

    /// Where kubectl keeps its discovery cache for this server.
    fn kubectl_cache(&self) -> PathBuf {
        self.dir.path().join("kubectl-cache")
    }

    /// Writes `state` as the change from `previous` (see the module doc);
    /// returns the API server's resource version after the writes.
    pub fn write_step(
        &self,
        client: &ApiClient,
        dir: &Path,
        previous: Option<&StepState>,
        state: &StepState,
    ) -> Result<u64, LabError> {
        if !state.native.is_empty() {
            return Err(LabError::Setup(format!(
                "the step has Calico resources ({}), which the Kubernetes API datastore does not carry",
                state
                    .native
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut plan = Plan::new(previous, state)?;
        if previous.is_none() {
            // The lab may have created some of them itself (kube-system,
            // for the controller's Lease): those are replaced, not created.
            let (existing, new): (Vec<Value>, Vec<Value>) =
                std::mem::take(&mut plan.create).into_iter().partition(|o| {
                    self.request("GET", &object_path(o, true), None, &[200])
                        .is_ok()
                });
            plan.create = new;
            plan.replace.extend(existing);
        }
        match client {
            ApiClient::Http => self.write_http(&plan)?,
            ApiClient::Kubectl(bin) => self.write_kubectl(bin, dir, &plan)?,
        }
        Ok(self.server.resource_version())
    }

    fn write_http(&self, plan: &Plan) -> Result<(), LabError> {
        for o in &plan.delete {
            self.request("DELETE", &object_path(o, true), None, &[200, 404])?;
        }
        for o in &plan.create {
            self.request("POST", &object_path(o, false), Some(o), &[201])?;
        }
        for o in &plan.replace {
            self.request("PUT", &object_path(o, true), Some(o), &[200])?;
        }
        for o in &plan.status {
            let path = format!("{}/status", object_path(o, true));
            self.request("PUT", &path, Some(o), &[200])?;
        }
        Ok(())
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<(), LabError> {
        let stream = TcpStream::connect(self.server.addr())
            .map_err(|e| LabError::io("connecting to the fake API server", e))?;
        let body = body.map(|b| b.to_string());
        let (code, text) = crate::agents::http(stream, method, path, body.as_deref())
            .map_err(|e| LabError::io(format!("{method} {path}"), e))?;
        if !ok.contains(&code) {
            return Err(LabError::command(
                format!("{method} {path} on the fake API server"),
                format!("HTTP {code}: {text}"),
            ));
        }
        Ok(())
    }

    fn write_kubectl(&self, bin: &Path, dir: &Path, plan: &Plan) -> Result<(), LabError> {
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir.display().to_string(), e))?;
        let steps: [(&str, &[Value], &[&str]); 4] = [
            (
                "delete",
                &plan.delete,
                &["delete", "--ignore-not-found", "-f"],
            ),
            ("create", &plan.create, &["create", "-f"]),
            ("replace", &plan.replace, &["replace", "-f"]),
            (
                "status",
                &plan.status,
                &["replace", "--subresource=status", "-f"],
            ),
        ];
        for (name, objects, args) in steps {
            if objects.is_empty() {
                continue;
            }
            // A stream of JSON objects rather than a v1 List: kubectl
            // validates a List's items client-side, against OpenAPI schemas
            // the double does not serve.
            let file = dir.join(format!("{name}.json"));
            let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
            std::fs::write(&file, docs.join("\n"))
                .map_err(|e| LabError::io(file.display().to_string(), e))?;
            let out = Command::new(bin)
                .arg("--kubeconfig")
                .arg(&self.admin_kubeconfig)
                .arg("--cache-dir")
                .arg(self.kubectl_cache())
                .args(args)
                .arg(&file)
                .env_remove("KUBECONFIG")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| LabError::io(format!("running {}", bin.display()), e))?;
            if !out.status.success() {
                return Err(LabError::command(
                    format!("kubectl {} {}", args.join(" "), file.display()),
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stderr),
                        String::from_utf8_lossy(&out.stdout)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The API path of an object (`with_name`: the object's own, else its
/// collection's).
fn object_path(o: &Value, with_name: bool) -> String {
    let api_version = o["apiVersion"].as_str().unwrap_or("v1");
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let plural = match o["kind"].as_str().unwrap_or("") {
        "Namespace" => "namespaces",
        "Pod" => "pods",
        "ServiceAccount" => "serviceaccounts",
        "Node" => "nodes",
        kind => model::admin::AdminKind::from_name(kind)
            .map_or("networkpolicies", model::admin::AdminKind::plural),
    };
    let ns = o["metadata"]["namespace"].as_str();
    let name = o["metadata"]["name"].as_str().unwrap_or("");
    let mut path = match (plural, ns) {
        ("namespaces", _) | (_, None) => format!("{prefix}/{plural}"),
        (_, Some(ns)) => format!("{prefix}/namespaces/{ns}/{plural}"),
    };
    if with_name {
        path = format!("{path}/{name}");
    }
    path
}

/// What a step writes, in order: deletions (contents before their
/// namespaces), creations (namespaces first), replacements, pod statuses.
#[derive(Debug, Default)]
struct Plan {
    delete: Vec<Value>,
    create: Vec<Value>,
    replace: Vec<Value>,
    status: Vec<Value>,
}

/// Namespaces first when creating; last when deleting.
fn kind_order(k: &KubeKey) -> u8 {
    match k.kind {
        KubeKind::Namespace | KubeKind::Node => 0,
        // Before the pods running as them, as the API server's admission
        // wants them.
        KubeKind::ServiceAccount => 1,
        KubeKind::Pod => 2,
        KubeKind::NetworkPolicy | KubeKind::Admin(_) => 3,
    }
}

fn to_json(o: &KubeObject) -> Result<Value, LabError> {
    let v = match o {
        KubeObject::Namespace(x) => serde_json::to_value(x),
        KubeObject::Pod(x) => serde_json::to_value(x),
        KubeObject::NetworkPolicy(x) => serde_json::to_value(x),
        KubeObject::Admin(x) => serde_json::to_value(x),
        KubeObject::ServiceAccount(x) => serde_json::to_value(x),
        KubeObject::Node(x) => serde_json::to_value(x),
    };
    let mut v = v.map_err(|e| LabError::Setup(format!("serializing {}: {e}", o.key())))?;
    if let KubeObject::Pod(_) = o {
        // As the kubelet reports a started pod.
        if let Some(status) = v.get_mut("status").and_then(Value::as_object_mut) {
            status
                .entry("phase")
                .or_insert_with(|| Value::String("Running".into()));
        }
    }
    Ok(v)
}

fn without_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

fn node_of(v: &Value) -> Option<&str> {
    v["spec"]["nodeName"].as_str()
}

impl Plan {
    fn new(previous: Option<&StepState>, state: &StepState) -> Result<Plan, LabError> {
        let mut plan = Plan::default();
        let mut keys: Vec<&KubeKey> = state.kube.keys().collect();
        keys.sort_by_key(|k| (kind_order(k), (*k).clone()));
        let before = |k: &KubeKey| previous.and_then(|p| p.kube.get(k));
        for k in keys {
            let now = to_json(&state.kube[k])?;
            let pod = k.kind == KubeKind::Pod;
            // Pods' and nodes' status goes through the subresource.
            let with_status = pod || k.kind == KubeKind::Node;
            match before(k).map(to_json).transpose()? {
                None => plan.create.push(now.clone()),
                // A pod's node cannot change: it is recreated.
                Some(old) if pod && node_of(&old) != node_of(&now) => {
                    plan.delete.push(old);
                    plan.create.push(now.clone());
                }
                Some(old) if without_status(&old) != without_status(&now) => {
                    plan.replace.push(now.clone())
                }
                Some(old) if old == now => continue,
                Some(_) => {}
            }
            if with_status && now.get("status").is_some() {
                plan.status.push(now);
            }
        }
        if let Some(prev) = previous {
            let mut gone: Vec<&KubeKey> = prev
                .kube
                .keys()
                .filter(|k| !state.kube.contains_key(*k))
                .collect();
            gone.sort_by_key(|k| (std::cmp::Reverse(kind_order(k)), (*k).clone()));
            for k in gone {
                plan.delete.push(to_json(&prev.kube[k])?);
            }
        }
        Ok(plan)
    }
}

/// `nftpolicy controller` watching the lab's API server and writing etcd;
/// stopped (SIGTERM, then SIGKILL) on drop.
pub struct Controller {
    child: Option<Child>,
    pub log: PathBuf,
    /// The Profile of `kube-system`, which holds the leader election's Lease.
    lease_namespace: model::calico::ResourceKey,
}

impl Controller {
    pub fn start(
        nftpolicy: &Path,
        api: &LabApi,
        etcd: &EtcdServer,
        log: PathBuf,
    ) -> Result<Controller, LabError> {
        // The leader election's Lease lives in kube-system.
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}});
        if api.server.apply(&ns).is_err() {
            return Err(LabError::Setup("creating kube-system".into()));
        }
        let file =
            std::fs::File::create(&log).map_err(|e| LabError::io(log.display().to_string(), e))?;
        let file2 = file
            .try_clone()
            .map_err(|e| LabError::io(log.display().to_string(), e))?;
        let mut cmd = Command::new(nftpolicy);
        cmd.args(["controller", "--datastore", &etcd.url()])
            .arg("--kubeconfig")
            .arg(&api.admin_kubeconfig)
            .args(["--leader-identity", "lab-controller"])
            .env_remove("KUBECONFIG")
            .env_remove("NFTPOLICY_DATASTORE")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        set_parent_death_signal(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io("running nftpolicy controller", e))?;
        Ok(Controller {
            child: Some(child),
            log,
            lease_namespace: model::calico::ResourceKey::new(
                model::calico::Kind::Profile,
                None,
                &model::convert::namespace_profile_name("kube-system"),
            ),
        })
    }

    fn check_running(&mut self) -> Result<(), LabError> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Err(LabError::Program {
                    node: "-".into(),
                    command: "nftpolicy controller".into(),
                    status: format!("exited ({status})"),
                    output: std::fs::read_to_string(&self.log).unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    /// Waits until etcd holds exactly the Calico resources `state` stands
    /// for (the controller caught up); returns etcd's revision then.
    pub fn wait_etcd(
        &mut self,
        etcd: &EtcdServer,
        state: &StepState,
        timeout: Duration,
    ) -> Result<i64, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let (revision, mut held) = etcd.resources()?;
            // The namespace of the controller's Lease is the lab's, unless
            // the scenario has it too.
            if state.cluster.get(&self.lease_namespace).is_none() {
                held.retain(|r| r.key() != self.lease_namespace);
            }
            // An endpoint compares as the state keeps it (`holds`): the
            // fields it leaves out are the converter's own unit tests' to check.
            let matches =
                held.len() == state.cluster.len() && held.iter().all(|r| state.cluster.holds(r));
            if matches {
                return Ok(revision);
            }
            if Instant::now() >= deadline {
                let held: Vec<String> = held.iter().map(|r| r.key().to_string()).collect();
                let want: Vec<String> = state
                    .cluster
                    .resources()
                    .map(|r| r.key().to_string())
                    .collect();
                return Err(LabError::Program {
                    node: "-".into(),
                    command: "nftpolicy controller".into(),
                    status: format!(
                        "etcd does not match the API server after {timeout:?}: holds {held:?}, want {want:?}"
                    ),
                    output: std::fs::read_to_string(&self.log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
