//! What `nftpolicy render` prints is valid `nft -f` input: for every step
//! of every scenario the project has (tests/scenarios, and the shared
//! examples when they sit beside the checkout), for every node, with and
//! without `--log-denied`, `nft -c -f` (parse and check against the kernel,
//! change nothing) accepts it; so do the compiler's golden renderings.
//! nft runs inside a network namespace this test creates, so even a check
//! that went wrong could touch nothing else.
//!
//! The agent never runs `nft` (it speaks netlink), and the kernel accepts
//! some rules `nft` itself refuses (an ICMP type match under an ICMPv6
//! protocol match: "conflicting protocols"), so this is the check that
//! `render`'s output — what operators read and feed to `nft -f`, and what
//! the nft-CLI benchmark column loads — stays loadable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lab::netns::Netns;
use lab::{nftpolicy_binary, write_state};
use model::scenario::{collect_files, Scenario, NODES};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `nft -c -f -` inside `ns`: `Err(nft's complaint)` when it refuses.
/// Started from a thread inside the namespace (cheaper than `ip netns
/// exec`, which also sets up a mount namespace per call).
fn nft_check(ns: &Netns, text: &str) -> Result<(), String> {
    let mut child = ns
        .run(|| {
            Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .expect("entering the test namespace")
        .expect("running nft");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("writing to nft");
    let out = child.wait_with_output().expect("waiting for nft");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn render_output_of_every_scenario_loads_with_nft() {
    let ns = Netns::create(&format!("nptest-render{}", std::process::id()))
        .expect("create a network namespace (needs root and iproute2)");
    let nftpolicy = nftpolicy_binary();
    let mut paths = vec![root().join("tests/scenarios")];
    paths.extend(testkit::extra_scenario_paths());
    let files = collect_files(&paths).unwrap();
    assert!(files.len() > 50, "the project's scenarios: {files:?}");
    let work = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in &files {
        let scenario = Scenario::load(file).unwrap();
        for (i, state) in scenario.states().unwrap().iter().enumerate() {
            let dir = work.path().join(format!("{}-{}", scenario.name, i + 1));
            write_state(&dir, state).unwrap();
            let mut nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
            for pod in state.pods() {
                if !nodes.contains(&pod.node) {
                    nodes.push(pod.node);
                }
            }
            for node in &nodes {
                for extra in [&[][..], &["--log-denied"][..]] {
                    let out = Command::new(&nftpolicy)
                        .args(["render", "--node", node])
                        .args(scenario.config.agent_args())
                        .args(extra)
                        .arg(&dir)
                        .output()
                        .expect("running nftpolicy render");
                    // 1: rendered, with rejected objects (which the
                    // scenario lists; its loader checked that).
                    assert!(
                        matches!(out.status.code(), Some(0 | 1)) && !out.stdout.is_empty(),
                        "{}: render --node {node}: {}",
                        file.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let text = String::from_utf8(out.stdout).unwrap();
                    if let Err(e) = nft_check(&ns, &text) {
                        failures.push(format!(
                            "{} step {} node {node} {extra:?}:\n{e}",
                            file.display(),
                            i + 1
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "nft -c -f refused:\n{}",
        failures.join("\n")
    );
    assert!(checked >= files.len() * 4, "{checked} renderings checked");
}

#[test]
fn golden_renderings_load_with_nft() {
    let ns = Netns::create(&format!("nptest-golden{}", std::process::id()))
        .expect("create a network namespace (needs root and iproute2)");
    let dir = root().join("crates/compiler/tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("nft") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        nft_check(&ns, &text).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        checked += 1;
    }
    assert!(checked > 0, "no golden .nft file under {}", dir.display());
}
