//! A real etcd server for the lab: Debian's `etcd` (or `$NFTPOLICY_ETCD`)
//! on 127.0.0.1 with free ports and a temporary data dir (under /dev/shm
//! when there is one, so fsyncs are cheap). Dropping the guard kills it and
//! removes the data dir; the child also gets SIGKILL if the thread that
//! started it ends first (PR_SET_PDEATHSIG), so a crashed run leaves none.
//!
//! The lab speaks to it only through etcd's JSON gateway (`/v3/…` on the
//! client port), to learn the store's revision; the writes themselves go
//! through `nftpolicy apply|delete`.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// How long etcd may take to answer after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one gateway request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running etcd; killed and its data removed on drop.
pub struct EtcdServer {
    child: Child,
    dir: tempfile::TempDir,
    client_port: u16,
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

fn etcd_binary() -> Result<PathBuf, LabError> {
    if let Some(p) = std::env::var_os("NFTPOLICY_ETCD") {
        return Ok(p.into());
    }
    crate::netns::find_tool("etcd").ok_or_else(|| {
        LabError::Setup(
            "the etcd datastore needs an etcd server: `apt-get install -y etcd-server` \
             (or set NFTPOLICY_ETCD)"
                .into(),
        )
    })
}

/// A loopback port that was free when asked.
pub(crate) fn free_port() -> Result<u16, LabError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| LabError::io("finding a free loopback port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| LabError::io("finding a free loopback port", e))
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
        let binary = etcd_binary()?;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let mut last = String::new();
        // A port taken by someone else between free_port() and etcd's bind
        // is retried with new ports.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("nplab-etcd-")
                .tempdir_in(&base)
                .map_err(|e| LabError::io("creating etcd's data directory", e))?;
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let log_path = dir.path().join("etcd.log");
            let log = std::fs::File::create(&log_path)
                .map_err(|e| LabError::io(log_path.display().to_string(), e))?;
            let log2 = log
                .try_clone()
                .map_err(|e| LabError::io(log_path.display().to_string(), e))?;
            let tls = if tls {
                Some(crate::etcd_tls::generate(dir.path(), free_port()?)?)
            } else {
                None
            };
            let (client, listen) = match &tls {
                Some(t) => (
                    format!("https://127.0.0.1:{client_port}"),
                    format!(
                        "https://127.0.0.1:{client_port},http://127.0.0.1:{}",
                        t.plain_port
                    ),
                ),
                None => {
                    let url = format!("http://127.0.0.1:{client_port}");
                    (url.clone(), url)
                }
            };
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut cmd = Command::new(&binary);
            cmd.args(["--name", "nplab", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &listen])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .arg("--initial-cluster")
                .arg(format!("nplab={peer}"))
                .args(["--log-level", "warn", "--logger", "zap"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            if let Some(t) = &tls {
                cmd.arg("--cert-file")
                    .arg(&t.server_cert)
                    .arg("--key-file")
                    .arg(&t.server_key)
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--client-cert-auth");
            }
            set_parent_death_signal(&mut cmd);
            let child = cmd
                .spawn()
                .map_err(|e| LabError::io(format!("starting {}", binary.display()), e))?;
            let mut server = EtcdServer {
                child,
                dir,
                client_port,
                tls,
            };
            match server.wait_ready() {
                Ok(()) => {
                    crate::trace(|| format!("etcd on 127.0.0.1:{client_port}"));
                    return Ok(server);
                }
                Err(e) => last = format!("{e}\n{}", server.log()),
            }
        }
        Err(LabError::Setup(format!("etcd did not start: {last}")))
    }

    /// The client port on 127.0.0.1.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// `etcd://127.0.0.1:<port>` (`https://…` with TLS), as `nftpolicy` takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The TLS files, for an etcd from [`EtcdServer::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// What etcd wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// The store's current revision (the header of a range read).
    pub fn revision(&self) -> Result<i64, LabError> {
        // A range over a key nobody writes; only the header matters.
        let body = r#"{"key":"bnBsYWItcmV2aXNpb24="}"#;
        let port = self.tls.as_ref().map_or(self.client_port, |t| t.plain_port);
        let stream = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| LabError::io("connecting to etcd", e))?;
        let (status, text) = crate::agents::http(stream, "POST", "/v3/kv/range", Some(body))
            .map_err(|e| LabError::io("reading etcd's revision", e))?;
        if status != 200 {
            return Err(LabError::Command {
                what: "etcd /v3/kv/range".into(),
                detail: format!("HTTP {status}: {text}"),
            });
        }
        json_number(&text, "revision").ok_or_else(|| LabError::Command {
            what: "etcd /v3/kv/range".into(),
            detail: format!("no header revision in {text}"),
        })
    }

    fn wait_ready(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
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

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The TempDir removes the data dir as it drops.
    }
}

/// The child dies with the thread that started it, also when the lab
/// itself is killed.
pub(crate) fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
