//! `deploy/`: every document typed, and the workloads checked against the
//! binary they run.

use super::*;

// ---------------------------------------------------------------------------
// deploy/: every document, typed.

pub(crate) enum Object {
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    ConfigMap(Box<ConfigMap>),
}

pub(crate) struct Doc {
    /// `deploy/daemonset.yaml#0`
    pub(crate) what: String,
    pub(crate) object: Object,
}

/// Deserialises into `T` and serialises back: anything the Kubernetes type
/// does not know (a misspelt or misplaced field, which the API server would
/// silently drop) or reads differently makes the two differ.
pub(crate) fn typed<T: DeserializeOwned + Serialize>(value: &serde_yaml::Value, what: &str) -> T {
    let t: T = serde_yaml::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid object of its kind: {e}"));
    let original = serde_json::to_value(value).unwrap();
    let back = serde_json::to_value(&t).unwrap();
    if original != back {
        let mut diffs = Vec::new();
        json_diff("", &original, &back, &mut diffs);
        panic!(
            "{what}: fields the Kubernetes type does not read as written:\n  {}",
            diffs.join("\n  ")
        );
    }
    t
}

pub(crate) fn json_diff(
    at: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value::{Array, Object};
    match (a, b) {
        (Object(x), Object(y)) => {
            for k in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let p = format!("{at}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => json_diff(&p, u, v, out),
                    (Some(u), None) => out.push(format!("{p}: unknown field ({u})")),
                    (None, Some(v)) => out.push(format!("{p}: appeared as {v}")),
                    (None, None) => {}
                }
            }
        }
        (Array(x), Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{at}[{i}]"), u, v, out);
            }
        }
        _ if a != b => out.push(format!("{at}: written {a}, read {b}")),
        _ => {}
    }
}

pub(crate) fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

pub(crate) fn deploy_docs() -> &'static [Doc] {
    static DOCS: OnceLock<Vec<Doc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let root = workspace();
        let mut files = Vec::new();
        yaml_files(&root.join("deploy"), &mut files);
        assert!(!files.is_empty(), "no YAML under deploy/");
        let mut docs = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&root).unwrap().display().to_string();
            let text = std::fs::read_to_string(&file).unwrap();
            for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let what = format!("{rel}#{i}");
                let value = serde_yaml::Value::deserialize(de)
                    .unwrap_or_else(|e| panic!("{what}: malformed YAML: {e}"));
                if value.is_null() {
                    continue;
                }
                let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("");
                let object = match (field("apiVersion"), field("kind")) {
                    ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(&value, &what)),
                    ("apps/v1", "Deployment") => Object::Deployment(typed(&value, &what)),
                    ("v1", "ServiceAccount") => Object::ServiceAccount(typed(&value, &what)),
                    ("v1", "ConfigMap") => Object::ConfigMap(typed(&value, &what)),
                    ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                        Object::ClusterRole(typed(&value, &what))
                    }
                    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                        Object::ClusterRoleBinding(typed(&value, &what))
                    }
                    ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(&value, &what)),
                    ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                        Object::RoleBinding(typed(&value, &what))
                    }
                    (api, kind) => panic!(
                        "{what}: {api}/{kind} is not a kind this test knows; \
                         teach crates/agent/tests/manifests/ to check it"
                    ),
                };
                docs.push(Doc { what, object });
            }
        }
        docs
    })
}

pub(crate) fn meta_of(o: &Object) -> &ObjectMeta {
    match o {
        Object::DaemonSet(x) => &x.metadata,
        Object::Deployment(x) => &x.metadata,
        Object::ServiceAccount(x) => &x.metadata,
        Object::ClusterRole(x) => &x.metadata,
        Object::ClusterRoleBinding(x) => &x.metadata,
        Object::Role(x) => &x.metadata,
        Object::RoleBinding(x) => &x.metadata,
        Object::ConfigMap(x) => &x.metadata,
    }
}

pub(crate) fn name_of(o: &Object) -> &str {
    meta_of(o).name.as_deref().unwrap_or("")
}

pub(crate) fn namespace_of(o: &Object) -> &str {
    meta_of(o).namespace.as_deref().unwrap_or("")
}

/// Every document of one kind under deploy/, typed: `objects!(ConfigMap)`
/// iterates over the `&'static ConfigMap`s.
macro_rules! objects {
    ($kind:ident) => {
        deploy_docs().iter().filter_map(|d| match &d.object {
            Object::$kind(x) => Some(&**x),
            _ => None,
        })
    };
}

/// The only document of its kind under deploy/.
fn the_one<T>(kind: &str, all: impl Iterator<Item = &'static T>) -> &'static T {
    let all: Vec<&T> = all.collect();
    assert_eq!(all.len(), 1, "one {kind} under deploy/");
    all[0]
}

/// (namespace, name) of every ServiceAccount under deploy/.
fn service_accounts() -> BTreeSet<(String, String)> {
    objects!(ServiceAccount)
        .map(|a| {
            let m = &a.metadata;
            let ns = m.namespace.clone().unwrap_or_default();
            (ns, m.name.clone().unwrap_or_default())
        })
        .collect()
}

pub(crate) fn config_maps() -> Vec<&'static ConfigMap> {
    objects!(ConfigMap).collect()
}

pub(crate) fn config_map(namespace: &str, name: &str) -> Option<&'static ConfigMap> {
    config_maps().into_iter().find(|c| {
        c.metadata.name.as_deref() == Some(name)
            && c.metadata.namespace.as_deref() == Some(namespace)
    })
}

pub(crate) fn the_daemonset() -> &'static DaemonSet {
    the_one("DaemonSet", objects!(DaemonSet))
}

pub(crate) fn the_controller() -> &'static Deployment {
    the_one("Deployment", objects!(Deployment))
}

/// Every pod template under deploy/: (what, namespace, pod spec).
pub(crate) fn workloads() -> Vec<(String, String, &'static PodSpec)> {
    let mut out = Vec::new();
    for d in deploy_docs() {
        let (kind, spec) = match &d.object {
            Object::DaemonSet(x) => ("DaemonSet", x.spec.as_ref().unwrap().template.spec.as_ref()),
            Object::Deployment(x) => (
                "Deployment",
                x.spec.as_ref().unwrap().template.spec.as_ref(),
            ),
            _ => continue,
        };
        let what = format!("{} ({kind} {})", d.what, name_of(&d.object));
        let spec = spec.unwrap_or_else(|| panic!("{what}: no pod spec"));
        out.push((what, namespace_of(&d.object).to_owned(), spec));
    }
    out
}

pub(crate) fn only_container<'a>(spec: &'a PodSpec, what: &str) -> &'a Container {
    assert_eq!(spec.containers.len(), 1, "{what}: one container");
    assert!(
        spec.init_containers.as_ref().is_none_or(|c| c.is_empty()),
        "{what}: no init containers"
    );
    &spec.containers[0]
}

/// A container's environment as the binary sees it: configMapKeyRef
/// resolved against deploy/'s ConfigMaps (an absent optional key leaves the
/// variable unset), fieldRef spec.nodeName as a stand-in node name.
pub(crate) fn resolved_env(c: &Container, namespace: &str, what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(v.clone())
        } else {
            let from = e
                .value_from
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: {} has no value", e.name));
            if let Some(r) = &from.config_map_key_ref {
                let cm = config_map(namespace, &r.name).unwrap_or_else(|| {
                    panic!(
                        "{what}: {}: no ConfigMap {namespace}/{} under deploy/",
                        e.name, r.name
                    )
                });
                let v = cm.data.as_ref().and_then(|d| d.get(&r.key)).cloned();
                if v.is_none() {
                    assert_eq!(
                        r.optional,
                        Some(true),
                        "{what}: {}: ConfigMap {} has no key {:?} and the reference is not optional",
                        e.name,
                        r.name,
                        r.key
                    );
                }
                v
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => Some("node-from-spec-nodename".to_owned()),
                    "metadata.name" => Some("pod-from-metadata-name".to_owned()),
                    other => panic!("{what}: {}: fieldRef {other} is not checked", e.name),
                }
            } else {
                panic!(
                    "{what}: {}: only configMapKeyRef and fieldRef are checked",
                    e.name
                )
            }
        };
        if let Some(v) = value {
            out.insert(e.name.clone(), v);
        }
    }
    assert!(
        c.env_from.as_ref().is_none_or(|v| v.is_empty()),
        "{what}: envFrom hides which variables are set; use valueFrom"
    );
    out
}

// ---------------------------------------------------------------------------
// Tests: deploy/.

#[test]
pub(crate) fn every_deploy_document_is_a_known_kind_and_parses_exactly() {
    let docs = deploy_docs();
    let mut seen = BTreeSet::new();
    for d in docs {
        let m = meta_of(&d.object);
        let name = m
            .name
            .as_deref()
            .unwrap_or_else(|| panic!("{}: no name", d.what));
        let cluster_scoped = matches!(
            d.object,
            Object::ClusterRole(_) | Object::ClusterRoleBinding(_)
        );
        assert_eq!(
            m.namespace.is_none(),
            cluster_scoped,
            "{}: namespace set exactly on namespaced kinds",
            d.what
        );
        if !cluster_scoped {
            assert_eq!(namespace_of(&d.object), "kube-system", "{}", d.what);
        }
        let kind = std::mem::discriminant(&d.object);
        assert!(
            seen.insert((format!("{kind:?}"), m.namespace.clone(), name.to_owned())),
            "{}: {name} defined twice",
            d.what
        );
    }
    // What the deployment needs is all there.
    the_daemonset();
    the_controller();
    assert!(config_map("kube-system", "nftpolicy-config").is_some());
}

#[test]
pub(crate) fn workloads_select_their_own_pods_and_reference_what_exists() {
    for d in deploy_docs() {
        let (selector, template_labels) = match &d.object {
            Object::DaemonSet(x) => {
                let s = x.spec.as_ref().unwrap();
                (
                    &s.selector,
                    s.template.metadata.as_ref().and_then(|m| m.labels.clone()),
                )
            }
            Object::Deployment(x) => {
                let s = x.spec.as_ref().unwrap();
                (
                    &s.selector,
                    s.template.metadata.as_ref().and_then(|m| m.labels.clone()),
                )
            }
            _ => continue,
        };
        let labels = template_labels.unwrap_or_default();
        let wanted = selector.match_labels.clone().unwrap_or_default();
        assert!(!wanted.is_empty(), "{}: empty selector", d.what);
        for (k, v) in &wanted {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{}: the selector misses the template",
                d.what
            );
        }
    }
    let service_accounts = service_accounts();
    for (what, ns, spec) in workloads() {
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| panic!("{what}: set serviceAccountName"));
        assert!(
            service_accounts.contains(&(ns.clone(), sa.clone())),
            "{what}: no ServiceAccount {ns}/{sa} under deploy/"
        );
        let volumes: BTreeMap<&str, _> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        let mut used = BTreeSet::new();
        for c in spec.containers.iter() {
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains_key(m.name.as_str()),
                    "{what}: no volume {}",
                    m.name
                );
                used.insert(m.name.as_str());
            }
            // Resolves every configMapKeyRef (and fails on a missing key).
            resolved_env(c, &ns, &what);
        }
        for (name, v) in &volumes {
            assert!(
                used.contains(name),
                "{what}: volume {name} is mounted nowhere"
            );
            if let Some(cm) = &v.config_map {
                assert!(
                    config_map(&ns, &cm.name).is_some() || cm.optional == Some(true),
                    "{what}: volume {name}: no ConfigMap {}",
                    cm.name
                );
            }
            if let Some(s) = &v.secret {
                // No Secret ships under deploy/: each is the operator's to
                // create, and the pod must start without it.
                assert_eq!(
                    s.optional,
                    Some(true),
                    "{what}: secret volume {name} must be optional"
                );
                let mode = s.default_mode.unwrap_or(0o644);
                assert_eq!(
                    mode & 0o337,
                    0,
                    "{what}: secret volume {name}: mode {mode:o}"
                );
            }
        }
    }
    // Every key of the shared ConfigMap is consumed by someone.
    let config = config_map("kube-system", "nftpolicy-config").unwrap();
    let mut consumed = BTreeSet::new();
    for (_, _, spec) in workloads() {
        for c in &spec.containers {
            for e in c.env.iter().flatten() {
                if let Some(r) = e
                    .value_from
                    .as_ref()
                    .and_then(|f| f.config_map_key_ref.as_ref())
                {
                    if r.name == "nftpolicy-config" {
                        consumed.insert(r.key.clone());
                    }
                }
            }
        }
    }
    for key in config.data.iter().flatten().map(|(k, _)| k) {
        assert!(
            consumed.contains(key),
            "nftpolicy-config key {key:?} is read by no container"
        );
    }
}

#[test]
pub(crate) fn agent_runs_on_every_node_in_the_host_network() {
    let ds = the_daemonset();
    assert_eq!(ds.metadata.name.as_deref(), Some("nftpolicy-node"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        spec.host_network,
        Some(true),
        "the agent programs the node's namespace"
    );
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        spec.automount_service_account_token,
        Some(true),
        "the agent watches the API server with its token (KDD mode)"
    );
    // The default datastore is the API server: nothing else to deploy.
    let config = config_map("kube-system", "nftpolicy-config").unwrap();
    assert_eq!(
        config
            .data
            .as_ref()
            .unwrap()
            .get("datastore")
            .map(String::as_str),
        Some("kubernetes")
    );
    let tolerates = |key: Option<&str>, effect: Option<&str>| {
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists")
                && t.key.as_deref() == key
                && t.effect.as_deref() == effect
                && t.value.is_none()
        })
    };
    assert!(
        tolerates(None, Some("NoSchedule")),
        "tolerate every NoSchedule taint"
    );
    assert!(
        tolerates(None, Some("NoExecute")),
        "tolerate every NoExecute taint"
    );
    assert!(tolerates(Some("CriticalAddonsOnly"), None));
    let c = only_container(spec, "DaemonSet");
    let argv = effective_argv(c);
    assert_eq!(argv.first().map(String::as_str), Some("nftpolicy"));
    assert_eq!(
        argv.get(1).map(String::as_str),
        Some("run"),
        "the agent is `nftpolicy run`"
    );
}

#[test]
pub(crate) fn health_and_metrics_endpoints_match_the_agent() {
    let run = cli().sub("run");
    let default_health: SocketAddr = run.default_of("--health-addr").parse().unwrap();
    let default_metrics: SocketAddr = run.default_of("--metrics-addr").parse().unwrap();
    // felix's ports, which the README and the manifests promise.
    assert_eq!(default_health.port(), 9099);
    assert_eq!(default_metrics.port(), 9091);
    // The paths the agent serves (src/http.rs), as its help names them.
    let http = read("crates/agent/src/http.rs");
    for path in ["/liveness", "/readiness", "/metrics"] {
        assert!(
            http.contains(&format!("\"{path}\"")),
            "src/http.rs serves no {path}"
        );
    }
    let health_help = &run.flag("--health-addr").unwrap().help;
    assert!(health_help.contains("`/liveness`") && health_help.contains("`/readiness`"));
    assert!(run
        .flag("--metrics-addr")
        .unwrap()
        .help
        .contains("`/metrics`"));

    let ds = the_daemonset();
    let template = &ds.spec.as_ref().unwrap().template;
    let spec = template.spec.as_ref().unwrap();
    let c = only_container(spec, "DaemonSet");
    let env = resolved_env(c, "kube-system", "DaemonSet");
    let addr = |var: &str, default: SocketAddr| -> SocketAddr {
        env.get(var)
            .map(|v| v.parse().unwrap_or_else(|e| panic!("{var}={v:?}: {e}")))
            .unwrap_or(default)
    };
    let health = addr("NFTPOLICY_HEALTH_ADDR", default_health);
    let metrics = addr("NFTPOLICY_METRICS_ADDR", default_metrics);

    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/liveness"),
        (c.readiness_probe.as_ref(), "/readiness"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            IntOrString::Int(health.port() as i32),
            "{path}: port"
        );
        assert!(
            get.scheme.as_deref().is_none_or(|s| s == "HTTP"),
            "{path}: the agent serves plain HTTP"
        );
        // The kubelet probes from the node; with the host network a
        // loopback listener is reachable only as host 127.0.0.1/localhost.
        if health.ip().is_loopback() {
            assert!(
                matches!(get.host.as_deref(), Some("127.0.0.1" | "localhost")),
                "{path}: the agent listens on {health}; probe host 127.0.0.1"
            );
        }
    }
    assert!(spec.host_network == Some(true));

    let ports = c.ports.iter().flatten().collect::<Vec<_>>();
    let metrics_port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a containerPort named metrics");
    assert_eq!(metrics_port.container_port, metrics.port() as i32);
    assert!(
        !ports
            .iter()
            .any(|p| p.container_port == health.port() as i32)
            || !health.ip().is_loopback(),
        "declaring the loopback-only health port would be misleading"
    );
    let annotations = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    if annotations.get("prometheus.io/scrape").map(String::as_str) == Some("true") {
        assert_eq!(
            annotations.get("prometheus.io/port"),
            Some(&metrics.port().to_string())
        );
        assert_eq!(
            annotations.get("prometheus.io/path").map(String::as_str),
            Some("/metrics")
        );
        assert!(
            !metrics.ip().is_loopback(),
            "scraped metrics must not listen on {metrics} (NFTPOLICY_METRICS_ADDR)"
        );
    }
}

#[test]
pub(crate) fn agent_capabilities_are_net_admin_only() {
    let ds = the_daemonset();
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = only_container(spec, "DaemonSet");
    let env = resolved_env(c, "kube-system", "DaemonSet");
    let run = cli().sub("run");
    let backend = env
        .get("NFTPOLICY_BACKEND")
        .cloned()
        .unwrap_or_else(|| run.default_of("--backend"));
    let tools = env
        .get("NFTPOLICY_IPTABLES_BACKEND")
        .cloned()
        .unwrap_or_else(|| run.default_of("--iptables-backend"));
    let sc = c.security_context.as_ref().expect("a securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let drop: BTreeSet<&str> = caps.drop.iter().flatten().map(String::as_str).collect();
    assert_eq!(drop, BTreeSet::from(["ALL"]));
    // netlink (nftables, ipset, iptables-nft) needs CAP_NET_ADMIN;
    // iptables-legacy's raw socket needs CAP_NET_RAW as well.
    let expected = if backend == "iptables" && tools == "legacy" {
        BTreeSet::from(["NET_ADMIN", "NET_RAW"])
    } else {
        BTreeSet::from(["NET_ADMIN"])
    };
    assert_eq!(add, expected, "backend {backend}, iptables tools {tools}");
    // The agent must run as root for the added capabilities to apply.
    assert_ne!(sc.run_as_non_root, Some(true));
    assert!(sc.run_as_user.is_none_or(|u| u == 0));
    assert!(
        spec.host_pid.is_none_or(|p| !p),
        "no host PID namespace needed"
    );
    // iptables-legacy's lock is the host's.
    let lock = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/run/xtables.lock")
        })
        .expect("a hostPath volume for /run/xtables.lock");
    assert!(c.volume_mounts.iter().flatten().any(|m| m.name == lock.name
        && m.mount_path == "/run/xtables.lock"
        && m.read_only != Some(true)));
    let host_paths: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert_eq!(host_paths, ["/run/xtables.lock"], "no other host path");
}

#[test]
pub(crate) fn controller_needs_no_privilege() {
    let d = the_controller();
    assert_eq!(d.metadata.name.as_deref(), Some("nftpolicy-controller"));
    let s = d.spec.as_ref().unwrap();
    let spec = s.template.spec.as_ref().unwrap();
    assert_ne!(spec.host_network, Some(true));
    let pod_sc = spec.security_context.as_ref().unwrap();
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    let c = only_container(spec, "Deployment");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert!(caps.add.as_ref().is_none_or(|a| a.is_empty()));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let argv = effective_argv(c);
    assert_eq!(argv[1], "controller");
    // It watches the API server (no --from), and more than one replica
    // only with the leader election on, each under its own name.
    assert!(!argv.iter().any(|a| a.starts_with("--from")), "{argv:?}");
    let env = resolved_env(c, "kube-system", "Deployment");
    let elect = !argv.iter().any(|a| a == "--leader-elect=false")
        && env
            .get("NFTPOLICY_LEADER_ELECT")
            .is_none_or(|v| v == "true");
    assert!(
        s.replicas == Some(1) || elect,
        "replicas {:?} without leader election: two writers into etcd",
        s.replicas
    );
    if elect {
        let identity = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NFTPOLICY_LEADER_IDENTITY")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(identity, Some("metadata.name"), "each replica's own name");
    }
    assert_eq!(
        spec.automount_service_account_token,
        Some(true),
        "the controller watches the API server"
    );
}

#[test]
pub(crate) fn containers_run_real_subcommands_with_real_flags() {
    let cli = cli();
    for (what, ns, spec) in workloads() {
        let c = only_container(spec, &what);
        let argv = effective_argv(c);
        assert_eq!(
            argv.first().map(String::as_str),
            Some(agent_package().bins[0].0.as_str()),
            "{what}: runs the nftpolicy binary"
        );
        let sub = argv
            .get(1)
            .unwrap_or_else(|| panic!("{what}: no subcommand"));
        let help = cli.sub(sub);
        let mut i = 2;
        while i < argv.len() {
            let a = &argv[i];
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (a.as_str(), None),
            };
            let flag = help
                .flags
                .iter()
                .find(|f| f.long == name || f.short.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{what}: `nftpolicy {sub}` has no {a}"));
            assert!(!flag.positional, "{what}: {a}");
            if flag.value.is_some() && inline.is_none() {
                i += 1;
                let v = argv
                    .get(i)
                    .unwrap_or_else(|| panic!("{what}: {a} needs a value"));
                if flag.value.as_deref() == Some("<INTERVAL>") {
                    v.parse::<u64>()
                        .unwrap_or_else(|e| panic!("{what}: {a} {v}: {e}"));
                }
            }
            i += 1;
        }
        // Required flags are given as flags or through the environment.
        let env = resolved_env(c, &ns, &what);
        for f in help.flags.iter().filter(|f| f.required) {
            let given = argv.iter().any(|a| {
                a == &f.long
                    || a.starts_with(&format!("{}=", f.long))
                    || Some(a.as_str()) == f.short.as_deref()
            }) || f.env.as_ref().is_some_and(|e| env.contains_key(e));
            assert!(given, "{what}: `nftpolicy {sub}` requires {}", f.long);
        }
    }
}

#[test]
pub(crate) fn every_env_var_is_one_the_subcommand_documents() {
    let cli = cli();
    for (what, _, spec) in workloads() {
        let c = only_container(spec, &what);
        let sub = effective_argv(c)[1].clone();
        let help = cli.sub(&sub);
        for e in c.env.iter().flatten() {
            assert!(
                help.by_env(&e.name).is_some(),
                "{what}: {} is not documented by `nftpolicy {sub} --help` \
                 (it documents {:?})",
                e.name,
                help.flags
                    .iter()
                    .filter_map(|f| f.env.as_deref())
                    .collect::<Vec<_>>()
            );
        }
    }
}

#[test]
pub(crate) fn every_env_value_is_accepted_by_the_binary() {
    let cli = cli();
    let render = cli.sub("render");
    for (what, ns, spec) in workloads() {
        let c = only_container(spec, &what);
        let sub = effective_argv(c)[1].clone();
        let help = cli.sub(&sub);
        let env = resolved_env(c, &ns, &what);
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        for (name, value) in &env {
            let flag = help.by_env(name).unwrap();
            if !flag.possible.is_empty() {
                assert!(
                    flag.possible.iter().any(|(p, _)| p == value),
                    "{what}: {name}={value:?} is none of {:?}",
                    flag.possible
                );
            }
            match name.as_str() {
                "NFTPOLICY_DATASTORE" | "NFTPOLICY_ETCD" => {
                    let kubernetes = watcher::kubernetes::ClusterAccess::from_datastore(value);
                    match kubernetes {
                        Some(access) => {
                            access.unwrap_or_else(|e| panic!("{what}: {name}={value:?}: {e}"));
                            if sub == "controller" {
                                // etcd mode's controller with the shipped
                                // (KDD) setting: it must say what to set.
                                let out = nftpolicy()
                                    .args(["controller", "--datastore", value])
                                    .output()
                                    .unwrap();
                                let err = String::from_utf8_lossy(&out.stderr);
                                assert!(
                                    !out.status.success() && err.contains("etcd mode"),
                                    "{what}: {err}"
                                );
                            }
                        }
                        None if sub == "run" && value.starts_with("file:") => {}
                        None => {
                            watcher::etcd::EtcdConfig::from_url(value)
                                .unwrap_or_else(|e| panic!("{what}: {name}={value:?}: {e}"));
                        }
                    }
                }
                "NFTPOLICY_LEADER_IDENTITY" => assert!(!value.is_empty(), "{what}: {name}"),
                "NFTPOLICY_ETCD_CA" | "NFTPOLICY_ETCD_CERT" | "NFTPOLICY_ETCD_KEY" => {
                    assert!(
                        mounts.iter().any(|m| Path::new(value).starts_with(m)),
                        "{what}: {name}={value:?} is in no mounted volume"
                    );
                }
                "NFTPOLICY_HEALTH_ADDR" | "NFTPOLICY_METRICS_ADDR" => {
                    value
                        .parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("{what}: {name}={value:?}: {e}"));
                }
                "NFTPOLICY_RESYNC_INTERVAL" | "NFTPOLICY_FILE_POLL_MS" => {
                    let n: u64 = value
                        .parse()
                        .unwrap_or_else(|e| panic!("{what}: {name}={value:?}: {e}"));
                    assert!(n > 0, "{what}: {name}=0");
                }
                // Checked by running the binary below.
                _ if render.by_env(name).is_some() => {}
                _ => panic!("{what}: no check for {name}; add one to this test"),
            }
        }
        // The dataplane and logging variables, parsed by the binary itself:
        // `render` shares them with `run` and touches no kernel.
        let empty = TempDir::new("render");
        let mut cmd = nftpolicy();
        cmd.arg("render").arg(&empty.0);
        for (name, value) in &env {
            if render.by_env(name).is_some() {
                cmd.env(name, value);
            }
        }
        if !env.contains_key("NFTPOLICY_NODE") {
            cmd.args(["--node", "test-node"]);
        }
        testkit::output_ok(
            &mut cmd,
            format!("{what}: `nftpolicy render` with the manifest's environment"),
        );
    }
}

#[test]
pub(crate) fn rbac_is_read_only_and_bound_to_existing_accounts() {
    let docs = deploy_docs();
    let check_read_only = |what: &str, rules: &[PolicyRule]| {
        for rule in rules {
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "{what}: verb {verb} is not read-only"
                );
            }
            for r in rule.resources.iter().flatten() {
                assert!(
                    [
                        "namespaces",
                        "pods",
                        "networkpolicies",
                        "serviceaccounts",
                        "nodes",
                        "adminnetworkpolicies",
                        "baselineadminnetworkpolicies",
                        "clusternetworkpolicies"
                    ]
                    .contains(&r.as_str()),
                    "{what}: resource {r} is more than nftpolicy needs"
                );
            }
            assert!(rule.non_resource_urls.is_none(), "{what}");
            assert!(rule.resource_names.is_none(), "{what}");
        }
    };
    let named = |m: &'static ObjectMeta| m.name.as_deref().unwrap_or("");
    let cluster_roles: BTreeMap<&str, &ClusterRole> = objects!(ClusterRole)
        .map(|r| (named(&r.metadata), r))
        .collect();
    for (name, role) in &cluster_roles {
        assert!(role.aggregation_rule.is_none(), "{name}");
        check_read_only(
            &format!("ClusterRole {name}"),
            role.rules.as_deref().unwrap_or_default(),
        );
    }
    // The only write: the controller's leader-election Lease.
    let roles: BTreeMap<&str, &Role> = objects!(Role).map(|r| (named(&r.metadata), r)).collect();
    for (name, role) in &roles {
        for rule in role.rules.iter().flatten() {
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&["coordination.k8s.io".to_owned()][..]),
                "Role {name}"
            );
            assert_eq!(
                rule.resources.as_deref(),
                Some(&["leases".to_owned()][..]),
                "Role {name}"
            );
            for verb in &rule.verbs {
                assert!(
                    ["create", "get", "update"].contains(&verb.as_str()),
                    "Role {name}: {verb}"
                );
                if verb != "create" {
                    assert_eq!(
                        rule.resource_names.as_deref(),
                        Some(&["nftpolicy-controller".to_owned()][..]),
                        "Role {name}: {verb} on its own Lease only"
                    );
                }
            }
        }
    }
    let accounts = service_accounts();
    let mut bound: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for d in docs {
        let (kind, role_ref, subjects, known) = match &d.object {
            Object::ClusterRoleBinding(b) => (
                "ClusterRole",
                &b.role_ref,
                &b.subjects,
                cluster_roles.contains_key(b.role_ref.name.as_str()),
            ),
            Object::RoleBinding(b) => (
                "Role",
                &b.role_ref,
                &b.subjects,
                roles.contains_key(b.role_ref.name.as_str()),
            ),
            _ => continue,
        };
        assert_eq!(role_ref.kind, kind, "{}", d.what);
        assert!(known, "{}: no role {}", d.what, role_ref.name);
        for s in subjects.iter().flatten() {
            assert_eq!(s.kind, "ServiceAccount", "{}", d.what);
            let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
            assert!(
                accounts.contains(&key),
                "{}: no ServiceAccount {key:?}",
                d.what
            );
            bound.entry(key).or_default().push(role_ref.name.clone());
        }
    }
    // The agent watches the API server: bound to its read-only role, and
    // to nothing that writes.
    assert_eq!(
        bound.get(&("kube-system".to_owned(), "nftpolicy-node".to_owned())),
        Some(&vec!["nftpolicy-node".to_owned()]),
    );
}

#[test]
pub(crate) fn images_are_this_workspace_version() {
    let pkg = agent_package();
    for (what, _, spec) in workloads() {
        let c = only_container(spec, &what);
        let image = c
            .image
            .as_deref()
            .unwrap_or_else(|| panic!("{what}: no image"));
        let (repo, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{what}: untagged image"));
        assert!(repo.ends_with(&pkg.bins[0].0), "{what}: image {image}");
        assert_eq!(
            tag, pkg.version,
            "{what}: image tag vs crates/agent's version"
        );
    }
}
