//! A real etcd server for the lab: Debian's `etcd` (or `$NFTPOLICY_ETCD`)
//! on 127.0.0.1 with free ports and a temporary data dir (under /dev/shm
//! when there is one, so fsyncs are cheap). Dropping the guard kills it and
//! removes the data dir; the child also gets SIGKILL if the thread that
//! started it ends first (PR_SET_PDEATHSIG), so a crashed run leaves none.
//!
//! The lab speaks to it only through etcd's JSON gateway (`/v3/…` on the
//! client port), to learn the store's revision; the writes themselves go
//! through `nftpolicy apply|delete`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::etcd::{EtcdOptions, EtcdProcess};

use crate::LabError;

/// The child dies with the thread that started it (shared with the lab's
/// agents).
pub(crate) use testkit::set_parent_death_signal;

/// How long etcd may take to answer after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one gateway request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running etcd; killed and its data removed on drop.
pub struct EtcdServer {
    /// Kills etcd and removes its data dir on drop.
    process: EtcdProcess,
    /// Set by [`EtcdServer::start_tls`].
    tls: Option<EtcdTls>,
}

/// The files of an etcd that serves clients over TLS only and requires a
/// client certificate (made with the `openssl` command, in etcd's data
/// directory). The lab itself reads the revision over a second, plain
/// listener on 127.0.0.1 ([`EtcdTls::plain_port`]) that the nodes never see.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub plain_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Result<EtcdServer, LabError> {
        Self::start_with(false)
    }

    /// Starts etcd serving clients over TLS with client certificates
    /// (`--client-cert-auth`), with a fresh CA, a server certificate for
    /// 127.0.0.1 and a client certificate: see [`EtcdServer::tls`].
    pub fn start_tls() -> Result<EtcdServer, LabError> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<EtcdServer, LabError> {
        let options = EtcdOptions {
            member_name: "nplab",
            dir_prefix: "nplab-etcd-",
            tls,
            plain_listener: true,
        };
        let mut last = String::new();
        // A port taken by someone else between picking it and etcd's bind
        // is retried with new ports.
        for _ in 0..3 {
            let process = EtcdProcess::spawn(&options)?;
            let tls = match (process.certs(), process.plain_port()) {
                (Some(certs), Some(plain_port)) => Some(EtcdTls {
                    ca: certs.ca.clone(),
                    server_cert: certs.server_cert.clone(),
                    server_key: certs.server_key.clone(),
                    client_cert: certs.client_cert.clone(),
                    client_key: certs.client_key.clone(),
                    plain_port,
                }),
                _ => None,
            };
            let mut server = EtcdServer { process, tls };
            match server.wait_ready() {
                Ok(()) => {
                    crate::trace(|| format!("etcd on 127.0.0.1:{}", server.client_port()));
                    return Ok(server);
                }
                Err(e) => last = format!("{e}\n{}", server.log()),
            }
        }
        Err(LabError::Setup(format!("etcd did not start: {last}")))
    }

    /// The client port on 127.0.0.1.
    pub fn client_port(&self) -> u16 {
        self.process.client_port()
    }

    /// `etcd://127.0.0.1:<port>` (`https://…` with TLS), as `nftpolicy` takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client_port())
    }

    /// The TLS files, for an etcd from [`EtcdServer::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// What etcd wrote to its log.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// A range read through the gateway (`body` is its JSON request): the
    /// answer's text, which holds the header revision and the key-values.
    fn range(&self, body: &str) -> Result<String, LabError> {
        self.gateway("/v3/kv/range", body)
    }

    /// `POST path` with the JSON `body` to etcd's gateway (over the plain
    /// listener with TLS); the answer's text.
    fn gateway(&self, path: &str, body: &str) -> Result<String, LabError> {
        let port = self
            .tls
            .as_ref()
            .map_or(self.client_port(), |t| t.plain_port);
        let stream = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| LabError::io("connecting to etcd", e))?;
        let (status, text) = crate::agents::http(stream, "POST", path, Some(body))
            .map_err(|e| LabError::io(format!("etcd {path}"), e))?;
        if status != 200 {
            return Err(LabError::command(
                format!("etcd {path}"),
                format!("HTTP {status}: {text}"),
            ));
        }
        Ok(text)
    }

    /// The store's current revision (the header of a range read).
    pub fn revision(&self) -> Result<i64, LabError> {
        // A range over a key nobody writes; only the header matters.
        let text = self.range(r#"{"key":"bnBsYWItcmV2aXNpb24="}"#)?;
        json_number(&text, "revision")
            .ok_or_else(|| range_error(format!("no header revision in {text}")))
    }

    /// Every Calico resource in the store (keys under
    /// `/calico/resources/v3/projectcalico.org/`), and the revision read at.
    pub fn resources(&self) -> Result<(i64, Vec<model::calico::Resource>), LabError> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let prefix = model::calico::ETCD_PREFIX.as_bytes();
        let mut end = prefix.to_vec();
        *end.last_mut().expect("a prefix") += 1;
        let body = serde_json::json!({"key": b64.encode(prefix), "range_end": b64.encode(&end)});
        let text = self.range(&body.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| range_error(format!("{e}: {text}")))?;
        let revision = json_number(&text, "revision").ok_or_else(|| range_error(text.clone()))?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let decode = |f: &str| {
                b64.decode(kv[f].as_str().unwrap_or(""))
                    .map_err(|e| range_error(format!("{f}: {e}")))
            };
            let key = String::from_utf8_lossy(&decode("key")?).into_owned();
            let value = decode("value")?;
            let mut r = model::calico::Resource::from_json(&key, &value)
                .map_err(|e| range_error(e.to_string()))?;
            // Namespaced values may leave their namespace to the key.
            if let Some(k) = model::calico::ResourceKey::from_etcd_key(&key) {
                if r.metadata().namespace.is_none() {
                    r.metadata_mut().namespace = k.namespace.clone();
                }
            }
            out.push(r);
        }
        Ok((revision, out))
    }

    /// SIGKILLs etcd (the child this guard started, by its pid); its data
    /// stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts etcd again on its data dir and ports; waits until it answers.
    pub fn restart(&mut self) -> Result<(), LabError> {
        self.process
            .respawn()
            .map_err(|e| LabError::Setup(format!("restarting etcd: {e}")))?;
        self.wait_ready()
    }

    /// Kills etcd, wipes its data and starts it empty on the same ports;
    /// waits until it answers.
    pub fn restart_empty(&mut self) -> Result<(), LabError> {
        self.process
            .respawn_empty()
            .map_err(|e| LabError::Setup(format!("restarting etcd empty: {e}")))?;
        self.wait_ready()
    }

    /// Compacts the store at its current revision (physically): no watch
    /// can start or resume from an earlier one. Returns that revision.
    pub fn compact(&self) -> Result<i64, LabError> {
        let revision = self.revision()?;
        self.gateway(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        Ok(revision)
    }

    fn wait_ready(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.process.exit_status() {
                return Err(LabError::Setup(format!("etcd exited ({status})")));
            }
            match self.revision() {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(LabError::Setup(format!(
                        "etcd not answering after {START_TIMEOUT:?}: {e}"
                    )))
                }
                // Polling a starting server: it has no readiness signal we
                // could block on.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn range_error(detail: String) -> LabError {
    LabError::command("etcd /v3/kv/range", detail)
}

/// The first `"name": N` or `"name": "N"` in a JSON text (etcd's gateway
/// writes 64-bit numbers as strings).
pub(crate) fn json_number(text: &str, name: &str) -> Option<i64> {
    let key = format!("\"{name}\"");
    let at = text.find(&key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// Bound on gateway and status requests.
pub(crate) const HTTP_TIMEOUT: Duration = REQUEST_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::json_number;

    #[test]
    fn numbers_from_json() {
        let header = r#"{"header":{"cluster_id":"1","revision":"42","raft_term":"2"}}"#;
        assert_eq!(json_number(header, "revision"), Some(42));
        assert_eq!(
            json_number(r#"{"applied_revision": 7}"#, "applied_revision"),
            Some(7)
        );
        assert_eq!(json_number("{}", "revision"), None);
    }
}
