//! Rejected policies among good ones, through `nftpolicy run` with a file
//! datastore in a fresh network namespace: one whose selector does not
//! parse (skipped: nothing to fail closed on) and one with a field nftpolicy
//! does not implement (its stub drops the ingress of the endpoints it
//! selects). The good policies are programmed, each bad one is named in
//! the log once, and `nftpolicy_rejected_objects` is 2 — and stays 2 over
//! further applies (it is a gauge of what is rejected now, not a count of
//! applies); fixing them clears it.
//!
//! Needs root (network namespace, nf_tables).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::netns::Netns;

mod common;
use common::*;

const METRICS: &str = "127.0.0.1:19391";
const HEALTH: &str = "127.0.0.1:19399";

fn write(dir: &Path, file: &str, text: &str) {
    // Write then rename: the agent must never see a half-written file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn policy(name: &str, selector: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: \"{selector}\"\n  types: [Ingress]\n  ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [80]}}}}]\n"
    )
}

fn endpoint(pod: &str, ip: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
         metadata: {{name: node1-k8s-{pod}-eth0, namespace: default, labels: {{app: web, projectcalico.org/namespace: default}}}}\n\
         spec: {{orchestrator: k8s, node: node1, pod: {pod}, endpoint: eth0, interfaceName: cali-{pod}, ipNetworks: [\"{ip}/32\"]}}\n"
    )
}

/// The agent process, killed on drop (also when an assertion fails).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /metrics` (on this thread, inside the test's namespace).
fn metrics() -> Option<String> {
    let mut s = TcpStream::connect(METRICS).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of an un-labelled metric.
fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|v| v as i64)
}

/// Polls /metrics until `done` holds (the agent works asynchronously).
fn wait_for(what: &str, log: &Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(m) = metrics() {
            if done(&m) {
                return m;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; metrics:\n{}\nlog:\n{}",
                metrics().unwrap_or_default(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_malformed_policy_is_named_once_counted_once_and_the_rest_is_programmed() {
    let ns = Netns::enter("rejected").expect("create a netns (needs root and iproute2)");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
    let dir = TempDir::new("rejected");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "pod-a.yaml", &endpoint("a", "198.18.0.1"));
    write(
        &manifests,
        "good-one.yaml",
        &policy("good-one", "app == 'web'"),
    );
    write(&manifests, "good-two.yaml", &policy("good-two", "has(app)"));
    write(
        &manifests,
        "broken.yaml",
        &policy("broken-policy", "app == "),
    );
    // Egress only, so that the ingress policies stay in force.
    let unsupported = |extra: &str| {
        policy("unsupported", "app == 'web'")
            .replace("types: [Ingress]", "types: [Egress]")
            .replace("ingress:", "egress:")
            .replace(
                "destination: {ports: [80]}",
                &format!("destination: {{ports: [80]{extra}}}"),
            )
    };
    write(
        &manifests,
        "unsupported.yaml",
        &unsupported(", services: {name: api}"),
    );
    let log = dir.path().join("agent.log");

    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_nftpolicy"))
            .args(["run", "--node", "node1", "--file-poll-ms", "100"])
            .arg(format!("--datastore=file:{}", manifests.display()))
            .args(["--metrics-addr", METRICS, "--health-addr", HEALTH])
            .env("NFTPOLICY_LOG", "info")
            .env_remove("NFTPOLICY_CONFIG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
            .spawn()
            .expect("spawn nftpolicy run"),
    );

    let m = wait_for("the first apply", &log, |m| {
        metric(m, "felix_active_local_policies") == Some(2)
    });
    assert_eq!(metric(&m, "nftpolicy_rejected_objects"), Some(2), "{m}");
    // The default `--table-groups auto` keeps a ruleset this small whole.
    assert_eq!(metric(&m, "nftpolicy_table_groups"), Some(1), "{m}");
    let ruleset = ns.nft(&["list", "table", "ip", "nftpolicy"]).unwrap();
    for good in ["good-one", "good-two"] {
        assert!(
            ruleset.contains(good),
            "{good} is not programmed:\n{ruleset}"
        );
    }
    assert!(!ruleset.contains("broken-policy"), "{ruleset}");
    // The half-understood one fails closed: a's egress drops, naming it.
    let fw = ns
        .nft(&["list", "chain", "ip", "nftpolicy", "cali-fw-cali-a"])
        .unwrap();
    assert!(
        fw.contains("drop comment \"Rejected policy ns/default/unsupported: drop all egress until it is fixed\""),
        "{fw}"
    );

    // Further applies: two more endpoints, one at a time.
    for (n, (pod, ip)) in [("b", "198.18.0.2"), ("c", "198.18.0.3")]
        .into_iter()
        .enumerate()
    {
        write(&manifests, &format!("pod-{pod}.yaml"), &endpoint(pod, ip));
        let m = wait_for(&format!("endpoint {pod} programmed"), &log, |m| {
            metric(m, "felix_active_local_endpoints") == Some(n as i64 + 2)
        });
        assert_eq!(metric(&m, "nftpolicy_rejected_objects"), Some(2), "{m}");
    }

    let text = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(dir.path().join("agent.err")).unwrap();
    for (name, why) in [
        ("broken-policy", "spec.selector"),
        ("unsupported", "services: not implemented by nftpolicy"),
    ] {
        let naming: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(name) && l.contains("rejected") && l.contains(why))
            .collect();
        assert_eq!(
            naming.len(),
            1,
            "the agent's log should name {name} once as rejected ({why}):\n{text}"
        );
    }

    // Fixing them clears the gauge.
    write(
        &manifests,
        "broken.yaml",
        &policy("broken-policy", "app == 'db'"),
    );
    write(&manifests, "unsupported.yaml", &unsupported(""));
    wait_for("the fixed policies", &log, |m| {
        metric(m, "nftpolicy_rejected_objects") == Some(0)
            && metric(m, "felix_active_local_policies") == Some(3)
    });
}
