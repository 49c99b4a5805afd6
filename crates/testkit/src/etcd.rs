//! A real etcd server for tests: Debian's `etcd` (from `etcd-server`; or
//! `$NFTPOLICY_ETCD`) on 127.0.0.1 with free ports and a temporary data dir
//! (under /dev/shm when there is one, so fsyncs are cheap).
//!
//! [`EtcdProcess`] only starts and stops the process; each user waits for
//! readiness its own way (the watcher's tests with an etcd client, the lab
//! over etcd's JSON gateway) and retries [`EtcdProcess::spawn`] when a port
//! was taken in between. Dropping it kills etcd (SIGKILL) and removes the
//! data dir, also when the test panics; the child also gets SIGKILL if the
//! thread that started it ends first (PR_SET_PDEATHSIG).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::{free_loopback_port, set_parent_death_signal, TestkitError};

/// How to run one etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The member's `--name` (and its entry in `--initial-cluster`).
    pub member_name: &'static str,
    /// The first characters of the temporary directory's name.
    pub dir_prefix: &'static str,
    /// Serve clients over TLS only, requiring a client certificate
    /// (`--client-cert-auth`), with certificates from [`EtcdCerts::generate`].
    pub tls: bool,
    /// With `tls`: also serve plain HTTP on a second loopback port, for a
    /// helper that reads the store without certificates.
    pub plain_listener: bool,
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate
/// (EC P-256, valid two days), made with the `openssl` command.
#[derive(Debug, Clone)]
pub struct EtcdCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), TestkitError> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| TestkitError::io("running openssl (etcd over TLS needs it)", e))?;
    if !out.status.success() {
        return Err(TestkitError::Command {
            what: format!("openssl {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

impl EtcdCerts {
    /// Writes the CA, server and client files into `dir`.
    pub fn generate(dir: &Path) -> Result<EtcdCerts, TestkitError> {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=nftpolicy-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(dir, &ca)?;
        for (name, usage) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.join(&ext),
                format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )
            .map_err(|e| TestkitError::io(ext.clone(), e))?;
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
            openssl(dir, &req)?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            )?;
        }
        Ok(EtcdCerts {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        })
    }
}

/// The etcd binary: `$NFTPOLICY_ETCD`, else `etcd` on `PATH` or in the
/// usual directories.
pub fn etcd_binary() -> Result<PathBuf, TestkitError> {
    if let Some(p) = std::env::var_os("NFTPOLICY_ETCD") {
        return Ok(p.into());
    }
    crate::find_tool("etcd").ok_or_else(|| {
        TestkitError::Missing(
            "etcd tests need an etcd server: `apt-get install -y etcd-server` \
             (or set NFTPOLICY_ETCD)"
                .into(),
        )
    })
}

/// A running (or killed) etcd with its own data dir, removed on drop.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    binary: PathBuf,
    member_name: &'static str,
    client_port: u16,
    peer_port: u16,
    plain_port: Option<u16>,
    certs: Option<EtcdCerts>,
}

impl EtcdProcess {
    /// Makes a fresh data dir, picks free ports (and certificates), and
    /// starts etcd. It does not wait for etcd to answer: the caller does,
    /// and on failure drops this and calls `spawn` again (new ports).
    pub fn spawn(options: &EtcdOptions) -> Result<EtcdProcess, TestkitError> {
        let binary = etcd_binary()?;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix(options.dir_prefix)
            .tempdir_in(&base)
            .map_err(|e| TestkitError::io("creating etcd's data directory", e))?;
        let certs = if options.tls {
            Some(EtcdCerts::generate(dir.path())?)
        } else {
            None
        };
        let plain_port = if options.tls && options.plain_listener {
            Some(free_loopback_port()?)
        } else {
            None
        };
        let mut process = EtcdProcess {
            child: None,
            dir,
            binary,
            member_name: options.member_name,
            client_port: free_loopback_port()?,
            peer_port: free_loopback_port()?,
            plain_port,
            certs,
        };
        process.start()?;
        Ok(process)
    }

    /// Kills etcd and starts it again on the same data dir and ports.
    pub fn respawn(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.start()
    }

    /// Kills etcd, removes its data and starts it again empty on the same
    /// ports (a wiped member restarted).
    pub fn respawn_empty(&mut self) -> Result<(), TestkitError> {
        self.kill();
        let data = self.dir.path().join("data");
        match std::fs::remove_dir_all(&data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TestkitError::io(data.display().to_string(), e)),
        }
        self.start()
    }

    fn start(&mut self) -> Result<(), TestkitError> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| TestkitError::io(log_path.display().to_string(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| TestkitError::io(log_path.display().to_string(), e))?;
        let client = self.client_url();
        let listen = match self.plain_port {
            Some(plain) => format!("{client},http://127.0.0.1:{plain}"),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--name", self.member_name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.member_name))
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(certs) = &self.certs {
            cmd.arg("--cert-file")
                .arg(&certs.server_cert)
                .arg("--key-file")
                .arg(&certs.server_key)
                .arg("--trusted-ca-file")
                .arg(&certs.ca)
                .arg("--client-cert-auth");
        }
        set_parent_death_signal(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How etcd ended, if it has (or was killed).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The client port on 127.0.0.1 (TLS when started with `tls`).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The plain-HTTP client port, with `tls` and `plain_listener`.
    pub fn plain_port(&self) -> Option<u16> {
        self.plain_port
    }

    /// The certificates, when started with `tls`.
    pub fn certs(&self) -> Option<&EtcdCerts> {
        self.certs.as_ref()
    }

    /// `http://127.0.0.1:<client port>`, or `https://…` with TLS.
    pub fn client_url(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// What etcd wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        // The TempDir removes the data dir as it drops, after this.
    }
}
