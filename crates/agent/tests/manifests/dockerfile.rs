//! The `Dockerfile`, compared with the workspace (`cargo metadata`) and
//! the binary.

use super::*;

// ---------------------------------------------------------------------------
// The Dockerfile.

pub(crate) struct Stage {
    pub(crate) from: String,
    pub(crate) name: String,
    /// (instruction, arguments) with continuation lines joined.
    pub(crate) instructions: Vec<(String, String)>,
}

pub(crate) fn dockerfile() -> Vec<Stage> {
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
    pub(crate) fn all<'a>(&'a self, ins: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.instructions
            .iter()
            .filter(move |(i, _)| i == ins)
            .map(|(_, a)| a.as_str())
    }

    /// ENTRYPOINT / CMD in exec form.
    pub(crate) fn exec_form(&self, ins: &str) -> Option<Vec<String>> {
        let a = self.all(ins).last()?;
        Some(serde_json::from_str(a).unwrap_or_else(|e| {
            panic!(
                "Dockerfile stage {}: {ins} {a} is not exec (JSON) form: {e}",
                self.name
            )
        }))
    }

    /// Packages `apt-get install` adds in this stage.
    pub(crate) fn apt_packages(&self) -> BTreeSet<String> {
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
    pub(crate) fn copies(&self) -> Vec<(Vec<String>, String, Option<String>)> {
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
pub(crate) fn effective_argv(c: &Container) -> Vec<String> {
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

pub(crate) struct Package {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) manifest: PathBuf,
    pub(crate) bins: Vec<(String, PathBuf)>,
}

pub(crate) fn metadata() -> &'static (PathBuf, Vec<Package>) {
    static META: OnceLock<(PathBuf, Vec<Package>)> = OnceLock::new();
    META.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = testkit::output_ok(
            Command::new(cargo)
                .args(["metadata", "--no-deps", "--format-version", "1"])
                .current_dir(workspace()),
            "cargo metadata",
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
pub(crate) fn agent_package() -> &'static Package {
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
// Tests: the Dockerfile.

#[test]
pub(crate) fn dockerfile_builds_the_package_and_binary_the_tests_use() {
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
pub(crate) fn dockerfile_copies_the_whole_workspace() {
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

pub(crate) fn copy_tree(from: &Path, to: &Path) {
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
pub(crate) fn dockerfile_build_context_resolves_with_the_lock_file() {
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
    testkit::output_ok(
        Command::new(cargo)
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
            .env("CARGO_TARGET_DIR", ctx.0.join("target")),
        "resolving the Dockerfile's build context with --locked",
    );
}

#[test]
pub(crate) fn dockerfile_images_run_the_binary_with_only_what_it_needs() {
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
