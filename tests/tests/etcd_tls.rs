//! etcd over TLS with client certificates, end to end: a real etcd with
//! `--client-cert-auth`, the policy controller path (`nftpolicy apply` with
//! `--etcd-ca/--etcd-cert/--etcd-key`) writing a scenario, and
//! `nftpolicy run --datastore https://127.0.0.1:PORT` in a lab node.
//!
//! - An agent that has the CA but no client certificate is refused by
//!   etcd: it says so on stderr (a TLS problem, naming the certificate
//!   and the `--etcd-ca/--etcd-cert/--etcd-key` flags), never
//!   becomes ready, and leaves the dataplane untouched (no table).
//! - An agent with the client certificate programs exactly the desired
//!   ruleset, and the probes see the policy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compiler::{compile_nftables, CompileOptions};
use lab::{nftpolicy_binary, write_state, Agents, EtcdServer, Lab};
use nix::sys::signal::Signal;

mod common;
use common::{assert_probes, canonical, kernel, shop};

const TIMEOUT: Duration = Duration::from_secs(60);

fn tls_flags(etcd: &EtcdServer, with_client_cert: bool) -> Vec<String> {
    let tls = etcd.tls().expect("a TLS etcd");
    let mut flags = vec!["--etcd-ca".to_owned(), tls.ca.display().to_string()];
    if with_client_cert {
        flags.extend([
            "--etcd-cert".to_owned(),
            tls.client_cert.display().to_string(),
            "--etcd-key".to_owned(),
            tls.client_key.display().to_string(),
        ]);
    }
    flags
}

/// `nftpolicy apply -f <dir> --etcd <https url> <tls flags>`.
fn apply(nftpolicy: &Path, etcd: &EtcdServer, dir: &Path, tls: &[String]) -> std::process::Output {
    Command::new(nftpolicy)
        .arg("apply")
        .arg("-f")
        .arg(dir)
        .args(["--etcd", &etcd.url()])
        .args(tls)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn agent_over_tls_with_client_certificate_programs_and_without_it_touches_nothing() {
    let (state, probes) = shop();
    let nftpolicy = nftpolicy_binary();
    let etcd = EtcdServer::start_tls().unwrap();
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    let mut lab = Lab::build(&state.pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();

    // The controller path, over TLS: without a client certificate etcd
    // refuses it; with one the objects land.
    let manifests: PathBuf = lab.workdir().join("manifests");
    write_state(&manifests, &state).unwrap();
    let refused = apply(&nftpolicy, &etcd, &manifests, &tls_flags(&etcd, false));
    let refused_stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "apply without a client certificate succeeded"
    );
    eprintln!("apply without a client certificate: {refused_stderr}");
    let out = apply(&nftpolicy, &etcd, &manifests, &tls_flags(&etcd, true));
    assert!(
        out.status.success(),
        "apply over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revision = etcd.revision().unwrap();

    // An agent without a client certificate.
    let log = lab.workdir().join("agent-node1.log");
    {
        let agents = Agents::start(
            &lab,
            &etcd,
            &nftpolicy,
            "nftables",
            &tls_flags(&etcd, false),
        )
        .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        // Under TLS 1.3 the client's first request can race etcd's alert,
        // and that attempt fails as a plain "connection closed"; the agent
        // retries, and an attempt that sees the alert must say it is TLS.
        let said = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tls_line = text
                .lines()
                .find(|l| l.contains("datastore disconnected") && l.contains("TLS problem"));
            if let Some(line) = tls_line {
                break line.to_owned();
            }
            if text.contains("ERROR") {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "the agent without a client certificate did not report a TLS problem \
                 within {TIMEOUT:?}:\n{text}"
            );
            // Polling the agent's log: it has no other way to tell.
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("agent without a client certificate: {said}");
        // etcd's TLS alert, as rustls reports it ("received fatal alert:
        // CertificateRequired"), is what the agent passes on, saying it is
        // a TLS problem and which flags to look at.
        assert!(
            said.contains("datastore disconnected, dataplane left as is")
                && said.to_lowercase().contains("certificate"),
            "the agent's complaint does not name the certificate:\n{said}"
        );
        assert!(
            said.contains("TLS problem")
                && ["--etcd-ca", "--etcd-cert", "--etcd-key"]
                    .iter()
                    .all(|flag| said.contains(flag)),
            "the agent's complaint does not point at the TLS flags:\n{said}"
        );
        let status = agents.status("node1").unwrap();
        assert!(!status.ready, "{status:?}");
        assert_eq!(kernel(&node_ns), (None, None), "the dataplane was touched");
        // Dropping the guard stops the agent (SIGTERM).
    }

    // The same agent with its client certificate.
    let mut agents =
        Agents::start(&lab, &etcd, &nftpolicy, "nftables", &tls_flags(&etcd, true)).unwrap();
    agents.wait_applied(revision, TIMEOUT).unwrap();
    let (_, rs) = compile_nftables(&state.cluster, &CompileOptions::new("node1")).unwrap();
    assert_eq!(
        kernel(&node_ns),
        canonical(&rs),
        "the kernel differs from the desired ruleset"
    );
    assert_probes(&mut lab, &probes, "over TLS");
    agents.stop("node1", Signal::SIGTERM).unwrap();
    drop(agents);
    drop(lab);
}
