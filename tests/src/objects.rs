//! A step's cluster state as YAML files: the datastore `nftpolicy sync
//! --datastore file:<dir>` reads.

use std::path::{Path, PathBuf};

use model::kube::KubeObject;
use model::scenario::StepState;

use crate::LabError;

/// Writes every object of `state` to its own file in `dir` (created if
/// needed; files already there are left alone, so give each step a fresh
/// directory): the Kubernetes objects as the scenario loader filled them in
/// (pods with addresses and nodes), then the Calico resources written in
/// the scenario. Files are numbered so that a plain sorted read sees
/// namespaces, pods, Kubernetes policies, then Calico resources.
pub fn write_state(dir: &Path, state: &StepState) -> Result<Vec<PathBuf>, LabError> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir.display().to_string(), e))?;
    let mut written = Vec::new();
    let mut write = |stem: String, yaml: Result<String, serde_yaml::Error>| {
        let yaml = yaml.map_err(|e| LabError::Setup(format!("serializing {stem}: {e}")))?;
        let path = dir.join(format!("{:03}-{}.yaml", written.len(), file_safe(&stem)));
        std::fs::write(&path, yaml).map_err(|e| LabError::io(path.display().to_string(), e))?;
        written.push(path);
        Ok::<(), LabError>(())
    };
    let stem = |kind: &dyn std::fmt::Display, namespace: Option<&str>, name: &str| {
        format!("{kind}-{}-{name}", namespace.unwrap_or("_"))
    };
    for (key, obj) in &state.kube {
        let stem = stem(&key.kind, key.namespace.as_deref(), &key.name);
        let yaml = match obj {
            KubeObject::Namespace(o) => serde_yaml::to_string(o),
            KubeObject::Pod(o) => serde_yaml::to_string(o),
            KubeObject::NetworkPolicy(o) => serde_yaml::to_string(o),
            KubeObject::Admin(o) => serde_yaml::to_string(o),
            KubeObject::ServiceAccount(o) => serde_yaml::to_string(o),
            KubeObject::Node(o) => serde_yaml::to_string(o),
        };
        write(stem, yaml)?;
    }
    for (key, resource) in &state.native {
        let stem = stem(&key.kind, key.namespace.as_deref(), &key.name);
        write(format!("calico-{stem}"), serde_yaml::to_string(resource))?;
    }
    Ok(written)
}

/// Lower case, and nothing but `[a-z0-9._-]`.
fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-' | '_') => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::kube::{parse_manifests, Manifest};
    use model::scenario::Scenario;

    const SCENARIO: &str = r#"
name: objects-roundtrip
steps:
  - apply:
      - {apiVersion: v1, kind: Namespace, metadata: {name: ns, labels: {team: a}}}
      - apiVersion: v1
        kind: Pod
        metadata: {name: web, namespace: ns, labels: {app: web}}
        spec: {containers: [{name: w, ports: [{name: http, containerPort: 80, protocol: TCP}]}]}
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-in, namespace: ns}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress: [{ports: [{port: http}]}]
      - apiVersion: projectcalico.org/v3
        kind: GlobalNetworkPolicy
        metadata: {name: deny-ext}
        spec:
          selector: all()
          types: [Ingress]
          ingress: [{action: Deny, source: {nets: [198.19.0.0/16]}}]
    probes: []
"#;

    /// What the lab writes reads back, through the model's own manifest
    /// parser, as the very objects of the step (pods with their addresses).
    #[test]
    fn written_objects_read_back() {
        let scenario = Scenario::parse("objects-roundtrip.yaml", SCENARIO).unwrap();
        let state = &scenario.states().unwrap()[0];
        let dir = tempfile::tempdir().unwrap();
        let files = write_state(dir.path(), state).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "000-namespace-_-ns.yaml",
                "001-pod-ns-web.yaml",
                "002-networkpolicy-ns-web-in.yaml",
                "003-calico-globalnetworkpolicy-_-deny-ext.yaml",
            ]
        );
        let mut kube = Vec::new();
        let mut native = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for m in parse_manifests(&f.display().to_string(), &text).unwrap() {
                match m {
                    Manifest::Kube(o) => kube.push(o),
                    Manifest::Calico(r) => native.push(r),
                }
            }
        }
        assert_eq!(kube, state.kube.values().cloned().collect::<Vec<_>>());
        assert_eq!(native, state.native.values().cloned().collect::<Vec<_>>());
        let KubeObject::Pod(pod) = &kube[1] else {
            panic!("second object is the pod")
        };
        assert!(pod.status.as_ref().unwrap().pod_ip.is_some());
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node1")
        );
    }
}
