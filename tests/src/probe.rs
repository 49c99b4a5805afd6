//! Probes: a connection from the source endpoint's namespace to the
//! destination, allowed when one request/response round trip completes.
//!
//! The client socket is made (and bound to the probe's source address) by a
//! thread inside the source namespace; connecting and waiting happen on the
//! lab's runtime, all probes of a step at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::calico::Protocol;
use model::scenario::ResolvedProbe;
use socket2::{Domain, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;
use crate::serve;
use crate::LabError;

/// UDP has no handshake: a lost first datagram (e.g. while a neighbour
/// entry resolves) is sent again this often until the probe times out.
const UDP_RESEND: Duration = Duration::from_millis(250);
pub(crate) const REQUEST: &[u8] = b"nplab probe\n";

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// `Some(true)`: the round trip completed; `Some(false)`: it did not
    /// (refused, unreachable, timed out); `None`: skipped.
    pub allowed: Option<bool>,
    /// How: "answered in 3 ms", "no answer within 1.5s", "kernel has no SCTP".
    pub detail: String,
    pub elapsed: Duration,
}

impl ProbeResult {
    fn skipped(detail: &str) -> ProbeResult {
        ProbeResult {
            allowed: None,
            detail: detail.to_owned(),
            elapsed: Duration::ZERO,
        }
    }
}

/// Whether the calling thread's namespace can open SCTP sockets.
pub(crate) fn kernel_has_sctp() -> bool {
    Socket::new(
        Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
    )
    .is_ok()
}

/// A probe ready to run: its client socket, or why it is skipped.
pub(crate) struct Prepared {
    name: String,
    protocol: Protocol,
    dst: SocketAddr,
    expected: Arc<str>,
    socket: Result<Socket, ProbeResult>,
}

/// Makes the probe's client socket inside `src_netns`, bound to the probe's
/// source address.
pub(crate) fn prepare(
    src_netns: &Netns,
    probe: &ResolvedProbe,
    sctp: bool,
) -> Result<Prepared, LabError> {
    let protocol = probe.probe.protocol;
    let dst = SocketAddr::new(probe.dst, probe.port);
    let mut prepared = Prepared {
        name: probe.probe.to_string(),
        protocol,
        dst,
        expected: serve::reply(&probe.probe.to.to_string(), probe.port, protocol),
        socket: Err(ProbeResult::skipped("not run")),
    };
    if protocol == Protocol::Sctp && !sctp {
        prepared.socket = Err(ProbeResult::skipped("kernel has no SCTP"));
        return Ok(prepared);
    }
    let (ty, proto) = serve::socket_type(protocol).ok_or_else(|| LabError::Probe {
        probe: prepared.name.clone(),
        reason: format!("cannot probe protocol {protocol}"),
    })?;
    let src = SocketAddr::new(probe.src, 0);
    let socket = src_netns
        .run(|| -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(dst), ty, Some(proto))?;
            socket.set_nonblocking(true)?;
            socket.bind(&src.into())?;
            Ok(socket)
        })?
        .map_err(|e| LabError::Probe {
            probe: prepared.name.clone(),
            reason: format!("client socket in {}: {e}", src_netns.name()),
        })?;
    prepared.socket = Ok(socket);
    Ok(prepared)
}

/// Runs every probe concurrently; results in the order given.
pub(crate) async fn run_all(
    probes: Vec<Prepared>,
    timeout: Duration,
) -> Result<Vec<ProbeResult>, LabError> {
    let handles: Vec<_> = probes
        .into_iter()
        .map(|p| tokio::spawn(run_one(p, timeout)))
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        let result = h.await.map_err(|e| LabError::Probe {
            probe: "?".into(),
            reason: format!("probe task failed: {e}"),
        })??;
        results.push(result);
    }
    Ok(results)
}

/// How a round trip ended, before it is judged.
enum Outcome {
    Reply(Vec<u8>),
    Failed(std::io::Error),
}

pub(crate) async fn run_one(p: Prepared, timeout: Duration) -> Result<ProbeResult, LabError> {
    let socket = match p.socket {
        Ok(s) => s,
        Err(skipped) => return Ok(skipped),
    };
    let start = Instant::now();
    let mut stage = "connecting";
    let outcome = match p.protocol {
        Protocol::Udp => {
            tokio::time::timeout(timeout, datagram(socket, p.dst, &mut stage, false)).await
        }
        p_ if serve::is_ipip(p_) => {
            tokio::time::timeout(timeout, datagram(socket, p.dst, &mut stage, true)).await
        }
        _ => tokio::time::timeout(timeout, stream(socket, p.dst, &mut stage)).await,
    };
    let elapsed = start.elapsed();
    let (allowed, detail) = match outcome {
        Err(_) => (false, format!("no answer within {timeout:?} ({stage})")),
        Ok(Outcome::Failed(e)) => (false, format!("{stage}: {e}")),
        Ok(Outcome::Reply(reply)) if reply.is_empty() => {
            (false, "connection closed without an answer".to_owned())
        }
        Ok(Outcome::Reply(reply)) => {
            if reply != p.expected.as_bytes() {
                // Packets reached some other server: the lab is miswired,
                // and no verdict from it can be trusted.
                return Err(LabError::Probe {
                    probe: p.name,
                    reason: format!(
                        "answered by the wrong server: {:?}, expected {:?}",
                        String::from_utf8_lossy(&reply).trim(),
                        p.expected.trim()
                    ),
                });
            }
            (true, format!("answered in {} ms", elapsed.as_millis()))
        }
    };
    Ok(ProbeResult {
        allowed: Some(allowed),
        detail,
        elapsed,
    })
}

/// TCP (and SCTP): connect, send one line, read the answer to its end.
async fn stream(socket: Socket, dst: SocketAddr, stage: &mut &'static str) -> Outcome {
    let result = async {
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let mut conn = socket.connect(dst).await?;
        *stage = "sending";
        conn.write_all(REQUEST).await?;
        *stage = "waiting for the answer";
        let mut reply = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = conn.read(&mut buf).await?;
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || reply.ends_with(b"\n") {
                return Ok(reply);
            }
        }
    }
    .await;
    match result {
        Ok(reply) => Outcome::Reply(reply),
        Err(e) => Outcome::Failed(e),
    }
}

/// UDP: send a datagram (again every [`UDP_RESEND`]) until one is answered.
/// The socket is connected, so an ICMP port unreachable surfaces as
/// "connection refused" instead of a timeout. IP-in-IP (`raw`): the same
/// with a raw packet of protocol 4 — but a raw socket sees every IP-in-IP
/// packet its namespace receives (until connected, even other peers'), so
/// only the destination's answers count, not its own probes' requests.
async fn datagram(socket: Socket, dst: SocketAddr, stage: &mut &'static str, raw: bool) -> Outcome {
    let result = async {
        let socket = tokio::net::UdpSocket::from_std(socket.into())?;
        socket.connect(dst).await?;
        *stage = "waiting for the answer";
        let mut buf = [0u8; 2048];
        loop {
            socket.send(REQUEST).await?;
            let answer = tokio::time::timeout(UDP_RESEND, async {
                loop {
                    let (n, from) = socket.recv_from(&mut buf).await?;
                    if !raw {
                        return Ok::<_, std::io::Error>(buf[..n].to_vec());
                    }
                    let payload = serve::raw_payload(&buf[..n], dst.is_ipv4());
                    if from.ip() == dst.ip() && payload != REQUEST {
                        return Ok(payload.to_vec());
                    }
                }
            })
            .await;
            if let Ok(received) = answer {
                return received;
            }
        }
    }
    .await;
    match result {
        Ok(reply) => Outcome::Reply(reply),
        Err(e) => Outcome::Failed(e),
    }
}
