//! The real `kubectl` against the fake API server (a test double): what the
//! lab and the README do with it must work with the client people use, not
//! only with kube-rs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::apiserver::FakeApiServer;

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(dir: &Path, api: &FakeApiServer) -> Kubectl {
        let bin = testkit::find_tool("kubectl")
            .expect("kubectl is not installed (cargo xtask test installs it)");
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, Some("kubernetes-admin"))
            .unwrap();
        Kubectl {
            bin,
            kubeconfig,
            cache: dir.join("cache"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl; `(success, stdout, stderr)`.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command(args).output().expect("running kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "kubectl {}: {err}{out}", args.join(" "));
        out
    }

    /// `kubectl … -w` in the background, its output read by a thread.
    fn watch(&self, args: &[&str]) -> Watch {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl -w");
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Watch { child, reader }
    }
}

struct Watch {
    child: Child,
    reader: std::thread::JoinHandle<String>,
}

impl Watch {
    /// Stops kubectl (by its pid) and returns what it printed.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let out = self.reader.join().unwrap();
        format!("{out}{err}")
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec:
  nodeName: node1
  containers: [{name: w, image: registry.invalid/web, ports: [{name: http, containerPort: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny-all, namespace: demo}
spec: {podSelector: {matchLabels: {app: web}}}
"#;

const POD_V2: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web, version: "2"}}
spec:
  nodeName: node1
  containers: [{name: w, image: registry.invalid/web, ports: [{name: http, containerPort: 80}]}]
status:
  phase: Running
  podIP: 198.18.0.10
  podIPs: [{ip: 198.18.0.10}]
"#;

/// Waits until `f` holds (kubectl -w prints asynchronously).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kubectl_creates_replaces_watches_and_deletes() {
    let api = FakeApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(dir.path(), &api);
    let objects = write(dir.path(), "objects.yaml", OBJECTS);
    let pod_v2 = write(dir.path(), "pod-v2.yaml", POD_V2);

    let table = k.watch(&["get", "pods", "-A", "-w"]);
    let yaml = k.watch(&["get", "pods", "-A", "-w", "-o", "yaml"]);
    eventually("both watches open", || api.open_watches() >= 2);

    let out = k.ok(&["create", "-f", &objects]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "namespace/demo created",
            "pod/web created",
            "networkpolicy.networking.k8s.io/web-deny-all created"
        ]
    );
    // Created again: the API server's AlreadyExists, as kubectl shows it.
    let (ok, _, err) = k.run(&["create", "-f", &objects]);
    assert!(
        !ok && err.contains("AlreadyExists") && err.contains("\"web\" already exists"),
        "{err}"
    );

    // The status in the file is ignored by replace and written by the
    // status subresource only.
    assert_eq!(k.ok(&["replace", "-f", &pod_v2]).trim(), "pod/web replaced");
    let phase = k.ok(&[
        "get",
        "pod",
        "-n",
        "demo",
        "web",
        "-o",
        "jsonpath={.status.phase} {.metadata.labels.version}",
    ]);
    assert_eq!(phase, "Pending 2");
    assert_eq!(
        k.ok(&["replace", "--subresource=status", "-f", &pod_v2])
            .trim(),
        "pod/web replaced"
    );

    let all: serde_yaml::Value = serde_yaml::from_str(&k.ok(&[
        "get",
        "namespaces,pods,networkpolicies",
        "-A",
        "-o",
        "yaml",
    ]))
    .unwrap();
    let items = all["items"].as_sequence().unwrap();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "Pod", "NetworkPolicy"]);
    let pod = &items[1];
    assert_eq!(pod["status"]["podIP"].as_str(), Some("198.18.0.10"));
    assert_eq!(pod["metadata"]["labels"]["version"].as_str(), Some("2"));
    assert_eq!(
        items[0]["metadata"]["labels"]["kubernetes.io/metadata.name"].as_str(),
        Some("demo"),
        "the label the API server puts on namespaces"
    );

    // A pod in a namespace that does not exist: the API server's NotFound.
    let stray = write(
        dir.path(),
        "stray.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c, image: x}]}\n",
    );
    let (ok, _, err) = k.run(&["create", "-f", &stray]);
    assert!(
        !ok && err.contains("namespaces \"nowhere\" not found"),
        "{err}"
    );

    // Deleted in reverse (pods and policies before their namespace).
    let reverse: Vec<&str> = OBJECTS.split("---").collect();
    let reversed = write(
        dir.path(),
        "reversed.yaml",
        &reverse
            .iter()
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join("---"),
    );
    let out = k.ok(&["delete", "-f", &reversed]);
    let lines: Vec<&str> = out.lines().collect();
    // Newer kubectl versions add " from <namespace> namespace".
    for (line, want) in lines.iter().zip([
        "networkpolicy.networking.k8s.io \"web-deny-all\" deleted",
        "pod \"web\" deleted",
        "namespace \"demo\" deleted",
    ]) {
        assert!(line.starts_with(want), "{out}");
    }
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(k.ok(&["get", "pods", "-A", "-o", "name"]).trim(), "");

    // The watches saw the pod pending, then running with its address,
    // then nothing more after its deletion.
    eventually("the table watch saw the status", || {
        api.requests("watch", "pods") >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    let table = table.finish();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("NAMESPACE"), "{table}");
    assert!(
        rows.iter()
            .any(|r| r.contains("web") && r.contains("Pending")),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("Running") && r.contains("198.18.0.10") && r.contains("node1")),
        "{table}"
    );
    let yaml = yaml.finish();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let phases: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["status"]["phase"].as_str())
        .collect();
    assert!(phases.starts_with(&["Pending"]), "{yaml}");
    assert!(phases.contains(&"Running"), "{yaml}");
}
