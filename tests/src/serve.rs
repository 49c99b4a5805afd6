//! Servers inside endpoint namespaces, without extra processes: sockets are
//! made and bound by a thread that entered the namespace (a socket belongs
//! to the namespace it was created in, whoever uses it later), then served
//! by the lab's tokio runtime.
//!
//! Every server answers with `nplab <identity> <port>/<protocol>\n`, so a
//! probe can tell that the right endpoint answered. IP-in-IP (protocol 4,
//! no port) is served by a raw socket answering each probe request with a
//! raw packet of its own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use model::calico::Protocol;
use model::state::IPIP_PROTOCOL;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::netns::Netns;
use crate::LabError;

/// How long a server waits for a request line on an accepted connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 1024;

/// The line a server answers with.
pub(crate) fn reply(identity: &str, port: u16, protocol: Protocol) -> Arc<str> {
    format!("nplab {identity} {port}/{protocol}\n").into()
}

pub(crate) fn socket_type(protocol: Protocol) -> Option<(Type, socket2::Protocol)> {
    match protocol {
        Protocol::Tcp => Some((Type::STREAM, socket2::Protocol::TCP)),
        Protocol::Udp => Some((Type::DGRAM, socket2::Protocol::UDP)),
        // One-to-one style SCTP behaves like TCP at the socket API.
        Protocol::Sctp => Some((Type::STREAM, socket2::Protocol::from(libc::IPPROTO_SCTP))),
        p if is_ipip(p) => Some((Type::RAW, socket2::Protocol::from(libc::IPPROTO_IPIP))),
        _ => None,
    }
}

pub(crate) fn is_ipip(protocol: Protocol) -> bool {
    protocol.number() == IPIP_PROTOCOL
}

/// The payload of a packet read from a raw socket: IPv4 raw sockets hand
/// over the IP header too, IPv6 ones do not.
pub(crate) fn raw_payload(packet: &[u8], v4: bool) -> &[u8] {
    if !v4 {
        return packet;
    }
    let header = packet.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
    packet.get(header..).unwrap_or_default()
}

/// Bound (and, for streams, listening) non-blocking sockets on `port`, one
/// per address family the endpoint has, made inside its namespace.
pub(crate) fn open(
    netns: &Netns,
    ips: &[IpAddr],
    port: u16,
    protocol: Protocol,
) -> Result<Vec<Socket>, LabError> {
    let (ty, proto) = socket_type(protocol)
        .ok_or_else(|| LabError::Setup(format!("cannot serve protocol {protocol}")))?;
    let mut wildcards = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        wildcards.push(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        wildcards.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    }
    let what = format!("{}: serving {port}/{protocol}", netns.name());
    netns
        .run(|| {
            wildcards
                .iter()
                .map(|addr| {
                    let socket = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
                    if addr.is_ipv6() && ty != Type::RAW {
                        // The IPv4 socket serves IPv4; keep the two apart.
                        socket.set_only_v6(true)?;
                    }
                    socket.set_reuse_address(true)?;
                    socket.set_nonblocking(true)?;
                    socket.bind(&(*addr).into())?;
                    if ty == Type::STREAM {
                        socket.listen(128)?;
                    }
                    Ok(socket)
                })
                .collect::<io::Result<Vec<Socket>>>()
        })?
        .map_err(|e| LabError::io(what, e))
}

/// Starts serving one socket in `set` (must be called inside the runtime).
pub(crate) fn spawn(
    set: &mut JoinSet<()>,
    socket: Socket,
    protocol: Protocol,
    reply: Arc<str>,
) -> io::Result<()> {
    match protocol {
        Protocol::Udp => {
            let socket = tokio::net::UdpSocket::from_std(socket.into())?;
            set.spawn(serve_datagrams(socket, reply));
        }
        p if is_ipip(p) => {
            let v4 = socket.domain()? == Domain::IPV4;
            // A raw socket is a datagram socket to tokio: recv_from and
            // send_to work on it as on UDP (the port is 0).
            let socket = tokio::net::UdpSocket::from_std(socket.into())?;
            set.spawn(serve_raw(socket, reply, v4));
        }
        _ => {
            // tokio's TcpListener only uses accept/read/write, which work
            // the same on an SCTP one-to-one socket.
            let listener = tokio::net::TcpListener::from_std(socket.into())?;
            set.spawn(serve_streams(listener, reply));
        }
    }
    Ok(())
}

async fn serve_streams(listener: tokio::net::TcpListener, reply: Arc<str>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Transient (the peer gave up before accept); keep serving.
            continue;
        };
        let reply = reply.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                // One request line in, one reply line out.
                let mut request = Vec::new();
                let mut buf = [0u8; 256];
                loop {
                    let n = conn.read(&mut buf).await?;
                    request.extend_from_slice(&buf[..n]);
                    if n == 0 || request.contains(&b'\n') || request.len() > MAX_REQUEST {
                        break;
                    }
                }
                conn.write_all(reply.as_bytes()).await?;
                conn.shutdown().await
            })
            .await;
        });
    }
}

/// Answers probe requests only: a raw socket sees every IP-in-IP packet
/// the namespace receives, answers of other servers included.
async fn serve_raw(socket: tokio::net::UdpSocket, reply: Arc<str>, v4: bool) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if raw_payload(&buf[..n], v4) == crate::probe::REQUEST {
                let _ = socket.send_to(reply.as_bytes(), peer).await;
            }
        }
    }
}

async fn serve_datagrams(socket: tokio::net::UdpSocket, reply: Arc<str>) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(reply.as_bytes(), peer).await;
        }
    }
}
