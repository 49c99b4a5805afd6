//! A real etcd server for tests, and a loopback TCP proxy that can cut the
//! connections to it.
//!
//! [`Etcd::start`] runs the `etcd` binary (Debian's `etcd-server`; or
//! `$NFTPOLICY_ETCD`) on 127.0.0.1 with free ports and a temporary data dir
//! (under /dev/shm when there is one, so fsyncs are cheap), and waits until
//! it answers. Dropping the guard kills it (SIGKILL) and removes the data
//! dir, also when the test panics; the child also gets SIGKILL if the
//! thread that started it dies first (PR_SET_PDEATHSIG).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use testkit::etcd::{EtcdOptions, EtcdProcess};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The certificate files of a TLS etcd (see [`Etcd::start_tls`]).
pub use testkit::etcd::EtcdCerts as Certs;

/// How long etcd may take to answer after starting.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Etcd {
    /// Kills etcd and removes its data dir on drop.
    process: EtcdProcess,
    pub client_port: u16,
    /// Set: clients must speak TLS and present a certificate.
    pub tls: Option<Certs>,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Self::start_with(false).await
    }

    /// etcd serving clients over TLS only, requiring client certificates.
    pub async fn start_tls() -> Etcd {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Etcd {
        let options = EtcdOptions {
            member_name: "test",
            dir_prefix: "nftpolicy-etcd-",
            tls,
            plain_listener: false,
        };
        let mut last_log = String::new();
        // A port taken between picking it and etcd's bind is retried with
        // new ports.
        for _ in 0..3 {
            let process = EtcdProcess::spawn(&options).unwrap_or_else(|e| panic!("{e}"));
            let mut etcd = Etcd {
                client_port: process.client_port(),
                tls: process.certs().cloned(),
                process,
            };
            match etcd.wait_ready().await {
                Ok(()) => return etcd,
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not start:\n{last_log}");
    }

    pub fn endpoint(&self) -> String {
        self.process.client_url()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until etcd answers a read, or fails with its log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.process.exit_status() {
                return Err(format!("etcd exited with {status}:\n{}", self.log()));
            }
            let probe = async {
                let mut c = self.try_client().await?;
                c.get("/health-probe", None).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), probe).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "etcd did not answer within {START_DEADLINE:?}:\n{}",
            self.log()
        ))
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts etcd again on the same data dir and ports.
    pub async fn restart(&mut self) {
        let respawned = self.process.respawn();
        self.respawned(respawned).await;
    }

    /// Kills etcd, wipes its data and starts it empty on the same ports.
    pub async fn restart_empty(&mut self) {
        let respawned = self.process.respawn_empty();
        self.respawned(respawned).await;
    }

    async fn respawned(&mut self, respawned: Result<(), testkit::TestkitError>) {
        respawned.unwrap_or_else(|e| panic!("etcd did not restart: {e}"));
        if let Err(log) = self.wait_ready().await {
            panic!("etcd did not restart:\n{log}");
        }
    }

    async fn try_client(&self) -> Option<Client> {
        let mut opts = ConnectOptions::new();
        if let Some(t) = &self.tls {
            let read = |p: &std::path::PathBuf| std::fs::read(p).unwrap();
            opts = opts.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&t.ca)))
                    .identity(Identity::from_pem(
                        read(&t.client_cert),
                        read(&t.client_key),
                    )),
            );
        }
        Client::connect([self.endpoint()], Some(opts)).await.ok()
    }

    pub async fn client(&self) -> Client {
        self.try_client().await.expect("an etcd client")
    }
}

/// A loopback TCP proxy in front of a port, whose connections the test can
/// cut (and refuse) and restore.
/// etcd's keys under Calico's prefix, in key order.
pub async fn calico_keys(c: &mut Client) -> Vec<String> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let r = c
        .get(model::calico::ETCD_PREFIX, Some(options))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

pub struct Proxy {
    pub port: u16,
    open: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, _) = watch::channel(true);
        let open = Arc::new(open);
        let state = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*state.borrow() {
                    let _ = inbound.shutdown().await;
                    continue; // refused: dropped at once
                }
                let mut open = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                    // Dropping both ends closes them.
                });
            }
        });
        Proxy { port, open, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
