//! The shipping artefacts checked against the binary they ship: every YAML
//! document under `deploy/` parsed into Kubernetes types, the agent's and
//! controller's pod specs compared with the flags, environment variables and
//! defaults `nftpolicy --help` documents, the `Dockerfile` compared with the
//! workspace (`cargo metadata`), and the README's generated configuration
//! reference and metric list compared with the binary and `src/metrics.rs`.
//!
//! Nothing here needs root, a kernel or a Docker engine: the binary is only
//! asked for `--help` and to `render` an empty directory.
//!
//! `UPDATE_EXPECT=1 cargo test -p nftpolicy --test manifests` rewrites the
//! README's configuration reference from the current `--help` output.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Paths and processes.

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn read(rel: &str) -> String {
    let p = workspace().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The binary under test, without any `NFTPOLICY_*` variable of the
/// caller's environment (they would show up in `--help` as values).
fn nftpolicy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nftpolicy"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NFTPOLICY_") {
            c.env_remove(k);
        }
    }
    c
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p =
            std::env::temp_dir().join(format!("nftpolicy-manifests-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The CLI, as `--help` describes it.

#[derive(Debug, Clone, Default)]
struct Flag {
    /// `--backend`, or `<PATHS>...` for a positional argument.
    long: String,
    short: Option<String>,
    /// `<BACKEND>`; `None` for a switch.
    value: Option<String>,
    env: Option<String>,
    default: Option<String>,
    /// Names and (long help only) descriptions.
    possible: Vec<(String, String)>,
    help: String,
    required: bool,
    positional: bool,
}

#[derive(Debug, Clone, Default)]
struct Help {
    about: String,
    /// Subcommands (name, about), `help` left out.
    commands: Vec<(String, String)>,
    flags: Vec<Flag>,
}

impl Help {
    fn flag(&self, long: &str) -> Option<&Flag> {
        self.flags.iter().find(|f| f.long == long)
    }

    fn by_env(&self, env: &str) -> Option<&Flag> {
        self.flags.iter().find(|f| f.env.as_deref() == Some(env))
    }

    fn default_of(&self, long: &str) -> String {
        self.flag(long)
            .unwrap_or_else(|| panic!("no {long} in the help"))
            .default
            .clone()
            .unwrap_or_else(|| panic!("{long} has no default in the help"))
    }
}

/// Takes `[key: …]` out of `text`.
fn take_annotation(text: &mut String, key: &str) -> Option<String> {
    let open = format!("[{key}: ");
    let start = text.find(&open)?;
    let end = start + text[start..].find(']')?;
    let value = text[start + open.len()..end].to_owned();
    text.replace_range(start..=end, "");
    Some(value)
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut usage = String::new();
    let mut section = String::new();
    // (head, rest of the head line, following lines)
    let mut entries: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut about_done = false;
    for line in text.lines() {
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = u.to_owned();
            about_done = true;
            continue;
        }
        if !about_done {
            if !line.trim().is_empty() && help.about.is_empty() {
                help.about = line.trim().to_owned();
            }
            continue;
        }
        if !line.starts_with(' ') {
            if line.ends_with(':') {
                section = line.to_owned();
            }
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let head_and_rest = |s: &str| match s.find("  ") {
            Some(i) => (s[..i].to_owned(), s[i..].trim().to_owned()),
            None => (s.trim().to_owned(), String::new()),
        };
        match section.as_str() {
            "Commands:" if indent == 2 => {
                let (name, about) = head_and_rest(trimmed);
                if name != "help" {
                    help.commands.push((name, about));
                }
            }
            "Options:" | "Arguments:"
                if indent <= 6
                    && !trimmed.is_empty()
                    && (section == "Arguments:" || trimmed.starts_with('-')) =>
            {
                let (head, rest) = head_and_rest(trimmed);
                entries.push((head, rest, Vec::new()));
            }
            "Options:" | "Arguments:" => {
                if let Some(e) = entries.last_mut() {
                    e.2.push(trimmed.to_owned());
                }
            }
            _ => {}
        }
    }
    for (head, rest, body) in entries {
        let mut f = Flag::default();
        for word in head.split([',', ' ']).filter(|w| !w.is_empty()) {
            if word.starts_with("--") {
                f.long = word.to_owned();
            } else if word.starts_with('-') {
                f.short = Some(word.to_owned());
            } else if f.long.is_empty() && word.starts_with('<') {
                f.long = word.to_owned();
                f.positional = true;
            } else {
                f.value = Some(word.to_owned());
            }
        }
        // Long help: description, blank line, "Possible values:" list,
        // blank line, [annotations]. Short help: everything on one line.
        let mut desc = vec![rest];
        let mut in_possible = false;
        for l in &body {
            if l == "Possible values:" {
                in_possible = true;
            } else if in_possible && l.starts_with("- ") {
                let (name, what) = l[2..].split_once(':').unwrap_or((&l[2..], ""));
                f.possible
                    .push((name.trim().to_owned(), what.trim().to_owned()));
            } else if !l.is_empty() {
                in_possible = false;
                desc.push(l.clone());
            }
        }
        let mut text = desc.join(" ");
        f.env = take_annotation(&mut text, "env").map(|e| {
            let (name, value) = e.split_once('=').unwrap_or((&e, ""));
            assert!(value.is_empty(), "{name} is set in the help's environment");
            name.to_owned()
        });
        f.default = take_annotation(&mut text, "default");
        if let Some(p) = take_annotation(&mut text, "possible values") {
            f.possible = p
                .split(", ")
                .map(|v| (v.to_owned(), String::new()))
                .collect();
        }
        f.help = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let words: Vec<&str> = usage.split_whitespace().collect();
        f.required = if f.positional {
            words.contains(&f.long.as_str())
        } else {
            words.windows(2).any(|w| {
                (w[0] == f.long || Some(w[0]) == f.short.as_deref())
                    && Some(w[1]) == f.value.as_deref()
            })
        };
        help.flags.push(f);
    }
    help
}

fn run_help(args: &[&str]) -> String {
    let out = nftpolicy().args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "nftpolicy {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

struct Cli {
    top: Help,
    subs: BTreeMap<String, Help>,
}

impl Cli {
    fn sub(&self, name: &str) -> &Help {
        self.subs
            .get(name)
            .unwrap_or_else(|| panic!("{name:?} is not an nftpolicy subcommand"))
    }

    /// Subcommand flags that are not global ones.
    fn own_flags<'a>(&'a self, sub: &'a Help) -> impl Iterator<Item = &'a Flag> {
        sub.flags
            .iter()
            .filter(|f| self.top.flag(&f.long).is_none() && f.long != "--help")
    }
}

fn cli() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(|| {
        let top = parse_help(&run_help(&[]));
        let subs = top
            .commands
            .iter()
            .map(|(name, _)| (name.clone(), parse_help(&run_help(&[name]))))
            .collect();
        Cli { top, subs }
    })
}

#[test]
fn the_help_parser_understands_the_binary() {
    let cli = cli();
    for sub in [
        "check",
        "explain",
        "run",
        "apply",
        "delete",
        "controller",
        "sync",
        "render",
    ] {
        assert!(
            cli.subs.contains_key(sub),
            "no {sub} in {:?}",
            cli.top.commands
        );
    }
    let run = cli.sub("run");
    let backend = run.flag("--backend").unwrap();
    assert_eq!(backend.env.as_deref(), Some("NFTPOLICY_BACKEND"));
    assert_eq!(backend.default.as_deref(), Some("nftables"));
    let names: Vec<&str> = backend.possible.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["nftables", "iptables"]);
    let ipt = run.flag("--iptables-backend").unwrap();
    let names: Vec<&str> = ipt.possible.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["legacy", "nft"], "long-help possible values");
    assert!(run.flag("--node").unwrap().required);
    assert!(!run.flag("--backend").unwrap().required);
    let apply = cli.sub("apply");
    let f = apply.flag("--filename").unwrap();
    assert_eq!(f.short.as_deref(), Some("-f"));
    assert!(f.required);
    assert!(apply.flag("--dry-run").unwrap().value.is_none());
    let render = cli.sub("render");
    assert!(render.flags.iter().any(|f| f.positional && f.required));
    assert!(cli.top.flag("--log-format").is_some());
}

// ---------------------------------------------------------------------------
// deploy/: every document, typed.

enum Object {
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    ConfigMap(Box<ConfigMap>),
}

struct Doc {
    /// `deploy/daemonset.yaml#0`
    what: String,
    object: Object,
}

/// Deserialises into `T` and serialises back: anything the Kubernetes type
/// does not know (a misspelt or misplaced field, which the API server would
/// silently drop) or reads differently makes the two differ.
fn typed<T: DeserializeOwned + Serialize>(value: &serde_yaml::Value, what: &str) -> T {
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

fn json_diff(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
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

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
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

fn deploy_docs() -> &'static [Doc] {
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
                         teach crates/agent/tests/manifests.rs to check it"
                    ),
                };
                docs.push(Doc { what, object });
            }
        }
        docs
    })
}

fn meta_of(o: &Object) -> &ObjectMeta {
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

fn name_of(o: &Object) -> &str {
    meta_of(o).name.as_deref().unwrap_or("")
}

fn namespace_of(o: &Object) -> &str {
    meta_of(o).namespace.as_deref().unwrap_or("")
}

fn config_maps() -> Vec<&'static ConfigMap> {
    deploy_docs()
        .iter()
        .filter_map(|d| match &d.object {
            Object::ConfigMap(c) => Some(&**c),
            _ => None,
        })
        .collect()
}

fn config_map(namespace: &str, name: &str) -> Option<&'static ConfigMap> {
    config_maps().into_iter().find(|c| {
        c.metadata.name.as_deref() == Some(name)
            && c.metadata.namespace.as_deref() == Some(namespace)
    })
}

fn the_daemonset() -> &'static DaemonSet {
    let all: Vec<&DaemonSet> = deploy_docs()
        .iter()
        .filter_map(|d| match &d.object {
            Object::DaemonSet(x) => Some(&**x),
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 1, "one DaemonSet under deploy/");
    all[0]
}

fn the_controller() -> &'static Deployment {
    let all: Vec<&Deployment> = deploy_docs()
        .iter()
        .filter_map(|d| match &d.object {
            Object::Deployment(x) => Some(&**x),
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 1, "one Deployment under deploy/");
    all[0]
}

/// Every pod template under deploy/: (what, namespace, pod spec).
fn workloads() -> Vec<(String, String, &'static PodSpec)> {
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

fn only_container<'a>(spec: &'a PodSpec, what: &str) -> &'a Container {
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
fn resolved_env(c: &Container, namespace: &str, what: &str) -> BTreeMap<String, String> {
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
// The Dockerfile.

struct Stage {
    from: String,
    name: String,
    /// (instruction, arguments) with continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn dockerfile() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends in a continuation");
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (ins, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let ins = ins.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if ins == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push(Stage {
                from: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("Dockerfile: {ins} before FROM"));
            stage.instructions.push((ins, args));
        }
    }
    stages
}

impl Stage {
    fn all<'a>(&'a self, ins: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.instructions
            .iter()
            .filter(move |(i, _)| i == ins)
            .map(|(_, a)| a.as_str())
    }

    /// ENTRYPOINT / CMD in exec form.
    fn exec_form(&self, ins: &str) -> Option<Vec<String>> {
        let a = self.all(ins).last()?;
        Some(serde_json::from_str(a).unwrap_or_else(|e| {
            panic!(
                "Dockerfile stage {}: {ins} {a} is not exec (JSON) form: {e}",
                self.name
            )
        }))
    }

    /// Packages `apt-get install` adds in this stage.
    fn apt_packages(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for run in self.all("RUN") {
            for cmd in run.split("&&") {
                let words: Vec<&str> = cmd.split_whitespace().collect();
                if let Some(i) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                    out.extend(
                        words[i + 2..]
                            .iter()
                            .filter(|w| !w.starts_with('-'))
                            .map(|w| w.to_string()),
                    );
                }
            }
        }
        out
    }

    /// (sources, destination, --from) of every COPY.
    fn copies(&self) -> Vec<(Vec<String>, String, Option<String>)> {
        self.all("COPY")
            .map(|a| {
                let mut from = None;
                let mut words = Vec::new();
                for w in a.split_whitespace() {
                    if let Some(f) = w.strip_prefix("--from=") {
                        from = Some(f.to_owned());
                    } else if !w.starts_with("--") {
                        words.push(w.to_owned());
                    }
                }
                let dest = words.pop().expect("COPY without destination");
                (words, dest, from)
            })
            .collect()
    }
}

/// The effective command line of a container: `command` or the image's
/// ENTRYPOINT, then `args` or its CMD.
fn effective_argv(c: &Container) -> Vec<String> {
    let stages = dockerfile();
    let image = stages.last().unwrap();
    let mut argv = c
        .command
        .clone()
        .unwrap_or_else(|| image.exec_form("ENTRYPOINT").unwrap());
    argv.extend(
        c.args
            .clone()
            .unwrap_or_else(|| image.exec_form("CMD").unwrap_or_default()),
    );
    argv
}

// ---------------------------------------------------------------------------
// cargo metadata.

struct Package {
    name: String,
    version: String,
    manifest: PathBuf,
    bins: Vec<(String, PathBuf)>,
}

fn metadata() -> &'static (PathBuf, Vec<Package>) {
    static META: OnceLock<(PathBuf, Vec<Package>)> = OnceLock::new();
    META.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(workspace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let root = PathBuf::from(v["workspace_root"].as_str().unwrap());
        let packages = v["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Package {
                name: p["name"].as_str().unwrap().to_owned(),
                version: p["version"].as_str().unwrap().to_owned(),
                manifest: PathBuf::from(p["manifest_path"].as_str().unwrap()),
                bins: p["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                    .map(|t| {
                        (
                            t["name"].as_str().unwrap().to_owned(),
                            PathBuf::from(t["src_path"].as_str().unwrap()),
                        )
                    })
                    .collect(),
            })
            .collect();
        (root, packages)
    })
}

/// The package this test belongs to (crates/agent) and its binary, which
/// is the one the tests run (`CARGO_BIN_EXE_nftpolicy`).
fn agent_package() -> &'static Package {
    let (_, packages) = metadata();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("Cargo.toml")
        .canonicalize()
        .unwrap();
    packages
        .iter()
        .find(|p| p.manifest.canonicalize().unwrap() == manifest)
        .expect("cargo metadata lists crates/agent")
}

// ---------------------------------------------------------------------------
// Tests: deploy/.

#[test]
fn every_deploy_document_is_a_known_kind_and_parses_exactly() {
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
fn workloads_select_their_own_pods_and_reference_what_exists() {
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
    let service_accounts: BTreeSet<(String, String)> = deploy_docs()
        .iter()
        .filter(|d| matches!(d.object, Object::ServiceAccount(_)))
        .map(|d| {
            (
                namespace_of(&d.object).to_owned(),
                name_of(&d.object).to_owned(),
            )
        })
        .collect();
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
fn agent_runs_on_every_node_in_the_host_network() {
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
fn health_and_metrics_endpoints_match_the_agent() {
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
fn agent_capabilities_are_net_admin_only() {
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
fn controller_needs_no_privilege() {
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
fn containers_run_real_subcommands_with_real_flags() {
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
fn every_env_var_is_one_the_subcommand_documents() {
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
fn every_env_value_is_accepted_by_the_binary() {
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
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{what}: `nftpolicy render` rejects the manifest's environment: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn rbac_is_read_only_and_bound_to_existing_accounts() {
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
                    ["namespaces", "pods", "networkpolicies"].contains(&r.as_str()),
                    "{what}: resource {r} is more than nftpolicy needs"
                );
            }
            assert!(rule.non_resource_urls.is_none(), "{what}");
            assert!(rule.resource_names.is_none(), "{what}");
        }
    };
    let cluster_roles: BTreeMap<&str, &ClusterRole> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ClusterRole(r) => Some((name_of(&d.object), &**r)),
            _ => None,
        })
        .collect();
    for (name, role) in &cluster_roles {
        assert!(role.aggregation_rule.is_none(), "{name}");
        check_read_only(
            &format!("ClusterRole {name}"),
            role.rules.as_deref().unwrap_or_default(),
        );
    }
    // The only write: the controller's leader-election Lease.
    let roles: BTreeMap<&str, &Role> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::Role(r) => Some((name_of(&d.object), &**r)),
            _ => None,
        })
        .collect();
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
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::ServiceAccount(_)))
        .map(|d| {
            (
                namespace_of(&d.object).to_owned(),
                name_of(&d.object).to_owned(),
            )
        })
        .collect();
    let mut bound: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for d in docs {
        let (role_ref, subjects) = match &d.object {
            Object::ClusterRoleBinding(b) => {
                assert_eq!(b.role_ref.kind, "ClusterRole", "{}", d.what);
                assert!(
                    cluster_roles.contains_key(b.role_ref.name.as_str()),
                    "{}: no role {}",
                    d.what,
                    b.role_ref.name
                );
                (&b.role_ref, &b.subjects)
            }
            Object::RoleBinding(b) => {
                assert_eq!(b.role_ref.kind, "Role", "{}", d.what);
                assert!(
                    roles.contains_key(b.role_ref.name.as_str()),
                    "{}: no role {}",
                    d.what,
                    b.role_ref.name
                );
                (&b.role_ref, &b.subjects)
            }
            _ => continue,
        };
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
fn images_are_this_workspace_version() {
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

// ---------------------------------------------------------------------------
// Tests: the Dockerfile.

#[test]
fn dockerfile_builds_the_package_and_binary_the_tests_use() {
    let pkg = agent_package();
    let exe = Path::new(env!("CARGO_BIN_EXE_nftpolicy"));
    let (bin, src) = pkg
        .bins
        .iter()
        .find(|(name, _)| exe.file_stem().and_then(|s| s.to_str()) == Some(name.as_str()))
        .expect("the binary the tests run is a bin target of crates/agent");
    assert!(src.is_file(), "{}", src.display());
    let manifest = read("crates/agent/Cargo.toml");
    assert!(manifest.contains(&format!("name = \"{}\"", pkg.name)));
    assert!(manifest.contains(&format!("name = \"{bin}\"")));

    let stages = dockerfile();
    let builds: Vec<(&Stage, &str)> = stages
        .iter()
        .flat_map(|s| s.all("RUN").map(move |r| (s, r)))
        .filter(|(_, r)| r.contains("cargo build"))
        .collect();
    assert_eq!(builds.len(), 1, "one `cargo build` in the Dockerfile");
    let (builder, run) = builds[0];
    let words: Vec<&str> = run.split_whitespace().collect();
    let at = words
        .windows(2)
        .position(|w| w == ["cargo", "build"])
        .unwrap();
    let args: Vec<&str> = words[at + 2..]
        .iter()
        .take_while(|w| !["&&", ";", "||"].contains(w))
        .copied()
        .collect();
    let value_of = |names: &[&str]| -> Vec<String> {
        let mut out = Vec::new();
        for (i, a) in args.iter().enumerate() {
            for n in names {
                if a == n {
                    out.push(args.get(i + 1).expect("flag value").to_string());
                } else if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                    out.push(v.to_owned());
                }
            }
        }
        out
    };
    assert!(
        args.contains(&"--release"),
        "cargo build {args:?}: --release"
    );
    assert!(args.contains(&"--locked"), "cargo build {args:?}: --locked");
    assert_eq!(
        value_of(&["-p", "--package"]),
        std::slice::from_ref(&pkg.name),
        "the package"
    );
    let bins = value_of(&["--bin"]);
    assert!(
        bins.is_empty() || bins == std::slice::from_ref(bin),
        "--bin {bins:?}"
    );
    assert!(
        run.contains(&format!("target/release/{bin}")),
        "the build step takes target/release/{bin}"
    );
    let installs = builder.apt_packages();
    // The same packages `cargo xtask` installs for protoc (xtask/src/tools.rs):
    // protobuf-compiler without recommends lacks the well-known types that
    // etcd-client's protos import.
    for package in ["protobuf-compiler", "libprotobuf-dev"] {
        assert!(
            installs.contains(package),
            "etcd-client's build needs protoc and google/protobuf/descriptor.proto: install {package}"
        );
    }
    let builder_runs: Vec<&str> = builder
        .instructions
        .iter()
        .filter(|(ins, _)| ins == "RUN")
        .map(|(_, args)| args.as_str())
        .collect();
    assert!(
        builder_runs
            .iter()
            .any(|r| r.contains("google/protobuf/descriptor.proto") && r.contains("protoc ")),
        "the builder checks that protoc compiles a file importing descriptor.proto before the build"
    );
    assert!(
        builder.from.starts_with("rust:"),
        "builder FROM {}",
        builder.from
    );
}

#[test]
fn dockerfile_copies_the_whole_workspace() {
    let (root, packages) = metadata();
    let stages = dockerfile();
    let copied: BTreeSet<String> = stages
        .iter()
        .flat_map(|s| s.copies())
        .filter(|(_, _, from)| from.is_none())
        .flat_map(|(srcs, _, _)| srcs)
        .map(|s| s.trim_end_matches('/').trim_start_matches("./").to_owned())
        .collect();
    let everything = copied.contains(".");
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock"].map(String::from).into();
    for p in packages {
        let rel = p.manifest.strip_prefix(root).unwrap();
        needed.insert(
            rel.components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .into_owned(),
        );
    }
    for n in &needed {
        assert!(
            everything || copied.contains(n),
            "the Dockerfile does not COPY {n} (workspace member or lock file); copied {copied:?}"
        );
    }
    // .dockerignore: keeps target/ out, keeps what is copied in.
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.iter().any(|p| p.trim_end_matches('/') == "target"),
        ".dockerignore must exclude target/"
    );
    for p in &patterns {
        let p = p.trim_end_matches('/');
        assert!(
            !needed.contains(p) && !p.starts_with('!'),
            ".dockerignore excludes {p}, which the build copies"
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        if from.file_name().is_some_and(|n| n == "target") {
            return; // .dockerignore keeps build output out of the context
        }
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

/// What `docker build` would see: only the paths the Dockerfile copies.
/// Cargo must load that as a workspace and resolve it with `--locked`
/// (a stale Cargo.lock or a member missing from the COPY lines fails the
/// image build). Offline: the test's own build already fetched everything.
#[test]
fn dockerfile_build_context_resolves_with_the_lock_file() {
    let root = workspace();
    let ctx = TempDir::new("docker-context");
    for stage in dockerfile() {
        for (srcs, _, from) in stage.copies() {
            if from.is_some() {
                continue;
            }
            for src in srcs {
                let src = src.trim_end_matches('/');
                copy_tree(&root.join(src), &ctx.0.join(src));
            }
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let pkg = agent_package();
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--depth",
            "0",
        ])
        .args(["-p", &pkg.name])
        .current_dir(&ctx.0)
        .env("CARGO_TARGET_DIR", ctx.0.join("target"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Dockerfile's build context does not resolve with --locked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_images_run_the_binary_with_only_what_it_needs() {
    let stages = dockerfile();
    let bin = &agent_package().bins[0].0;
    let builder = stages
        .iter()
        .find(|s| s.all("RUN").any(|r| r.contains("cargo build")))
        .unwrap();
    let codename = builder.from.rsplit('-').next().unwrap().to_owned();
    let runtime: Vec<&Stage> = stages
        .iter()
        .filter(|s| {
            s.copies()
                .iter()
                .any(|(_, _, from)| from.as_deref() == Some(builder.name.as_str()))
        })
        .collect();
    assert!(!runtime.is_empty());
    for s in &runtime {
        assert!(
            s.from.starts_with("debian:") && s.from.contains(&codename),
            "stage {}: FROM {} should be the builder's Debian release ({codename}), for glibc",
            s.name,
            s.from
        );
        assert_eq!(
            s.exec_form("ENTRYPOINT"),
            Some(vec![bin.clone()]),
            "stage {}",
            s.name
        );
        let cmd = s.exec_form("CMD").unwrap_or_default();
        let sub = cmd
            .first()
            .unwrap_or_else(|| panic!("stage {}: CMD names a subcommand", s.name));
        cli().sub(sub);
        assert!(
            s.copies()
                .iter()
                .any(|(_, dest, _)| dest == &format!("/usr/local/bin/{bin}")),
            "stage {}: the binary goes to /usr/local/bin/{bin} (on PATH)",
            s.name
        );
        assert!(
            !s.apt_packages().contains("nftables"),
            "stage {}: no nft binary",
            s.name
        );
        assert!(
            s.all("USER").next().is_none(),
            "stage {}: runs as root (CAP_NET_ADMIN)",
            s.name
        );
    }
    // The default image is the last stage, without the iptables tools; the
    // iptables tools are opt-in.
    let last = stages.last().unwrap();
    assert!(
        runtime.iter().any(|s| std::ptr::eq(*s, last)),
        "the default target is a runtime image"
    );
    assert!(
        last.apt_packages().is_empty(),
        "the default image installs nothing"
    );
    let ipt = stages
        .iter()
        .find(|s| s.name == "runtime-iptables")
        .expect("a runtime-iptables target");
    assert_eq!(
        ipt.apt_packages(),
        BTreeSet::from(["iptables".to_owned(), "ipset".to_owned()])
    );
}

// ---------------------------------------------------------------------------
// Tests: the README.

const REF_BEGIN: &str =
    "<!-- BEGIN configuration reference: generated from --help by crates/agent/tests/manifests.rs -->";
const REF_END: &str = "<!-- END configuration reference -->";

/// Markdown table cell text: `|` escaped everywhere, `*`, `<` and `>`
/// outside code spans.
fn md(s: &str) -> String {
    s.split('`')
        .enumerate()
        .map(|(i, part)| {
            let part = part.replace('|', "\\|");
            if i % 2 == 1 {
                part
            } else {
                part.replace('*', "\\*")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;")
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

fn flag_row(f: &Flag) -> String {
    let mut name = match (&f.short, &f.value) {
        (Some(s), Some(v)) => format!("`{s}`, `{} {v}`", f.long),
        (Some(s), None) => format!("`{s}`, `{}`", f.long),
        (None, Some(v)) => format!("`{} {v}`", f.long),
        (None, None) => format!("`{}`", f.long),
    };
    if f.positional {
        name = format!("`{}` (argument)", f.long);
    }
    let env = f.env.as_ref().map_or("—".to_owned(), |e| format!("`{e}`"));
    let default = match (&f.default, f.required) {
        (Some(d), _) => format!("`{d}`"),
        (None, true) => "required".to_owned(),
        (None, false) if f.value.is_none() && !f.positional => "off".to_owned(),
        (None, false) => "—".to_owned(),
    };
    let mut help = f.help.clone();
    if help.is_empty() {
        help.push('—');
    } else if !help.ends_with('.') {
        help.push('.');
    }
    if !f.possible.is_empty() {
        let values: Vec<String> = f
            .possible
            .iter()
            .map(|(v, what)| {
                if what.is_empty() {
                    format!("`{v}`")
                } else {
                    format!("`{v}` ({what})")
                }
            })
            .collect();
        help = format!("{help} One of {}.", values.join(", "));
    }
    format!(
        "| {} | {env} | {default} | {} |",
        md(&name),
        md(help.trim())
    )
}

fn configuration_reference() -> String {
    let cli = cli();
    let mut out = vec![
        REF_BEGIN.to_owned(),
        String::new(),
        "Every flag can also be set through its environment variable; a flag on".to_owned(),
        "the command line wins over the variable.".to_owned(),
        String::new(),
        "Global (every subcommand):".to_owned(),
        String::new(),
        "| Flag | Environment | Default | Meaning |".to_owned(),
        "|---|---|---|---|".to_owned(),
    ];
    for f in cli
        .top
        .flags
        .iter()
        .filter(|f| !["--help", "--version"].contains(&f.long.as_str()))
    {
        out.push(flag_row(f));
    }
    for (name, about) in &cli.top.commands {
        let sub = cli.sub(name);
        out.push(String::new());
        out.push(format!("`nftpolicy {name}`: {about}."));
        out.push(String::new());
        out.push("| Flag | Environment | Default | Meaning |".to_owned());
        out.push("|---|---|---|---|".to_owned());
        for f in cli.own_flags(sub) {
            out.push(flag_row(f));
        }
    }
    out.push(String::new());
    out.push(REF_END.to_owned());
    out.join("\n")
}

#[test]
fn readme_configuration_reference_matches_the_help() {
    let path = workspace().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let expected = configuration_reference();
    let (Some(start), Some(end)) = (readme.find(REF_BEGIN), readme.find(REF_END)) else {
        panic!("README.md has no generated configuration reference ({REF_BEGIN} … {REF_END})");
    };
    let current = &readme[start..end + REF_END.len()];
    if current == expected {
        return;
    }
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        let updated = format!(
            "{}{expected}{}",
            &readme[..start],
            &readme[end + REF_END.len()..]
        );
        std::fs::write(&path, updated).unwrap();
        return;
    }
    let differing: Vec<String> = expected
        .lines()
        .filter(|l| !current.lines().any(|c| c == *l))
        .map(|l| format!("  + {l}"))
        .chain(
            current
                .lines()
                .filter(|c| !expected.lines().any(|l| l == *c))
                .map(|l| format!("  - {l}")),
        )
        .collect();
    panic!(
        "README.md's configuration reference differs from `nftpolicy --help`; \
         run `UPDATE_EXPECT=1 cargo test -p nftpolicy --test manifests`:\n{}",
        differing.join("\n")
    );
}

#[test]
fn readme_names_every_metric() {
    let src = read("crates/agent/src/metrics.rs");
    let readme = read("README.md");
    let mut names = Vec::new();
    for piece in src.split('"').skip(1).step_by(2) {
        let is_name = (piece.starts_with("felix_") || piece.starts_with("nftpolicy_"))
            && piece
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
        if is_name {
            names.push(piece);
        }
    }
    assert!(names.len() >= 10, "found only {names:?} in src/metrics.rs");
    for n in names {
        assert!(
            readme.contains(&format!("`{n}`")),
            "README.md does not describe metric {n}"
        );
    }
}
