//! The one `NETLINK_NETFILTER` socket type: open and bind, subscribe to a
//! multicast group, send a batch in one `sendmsg` and collect its ACKs and
//! errors, send a request (a GET, a dump, an NFLOG config) and collect its
//! replies, and receive datagrams without blocking. The programmer's
//! transactions and read-back, the notification monitor, kernel tracing and
//! the NFLOG listener all use it.
//!
//! The rules it follows, and why, are in `docs/netlink.md` ("Transport").

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tracing::{debug, trace};

use crate::consts::*;
use crate::nla::{align4, c_str, AttrIter, NLMSG_HDRLEN};

/// Receive buffer for one datagram. Dumps come in ≤ 32 KiB skbs; batch
/// error replies are small (capped), but take no chances.
const RECV_BUF: usize = 1 << 20;
/// Socket receive buffer: error replies for a batch in which thousands of
/// messages fail must fit, or we lose them (ENOBUFS = state unknown).
const RCVBUF_BYTES: usize = 8 << 20;
/// Initial socket send buffer; raised per batch when a batch is larger.
const SNDBUF_BYTES: usize = 4 << 20;
/// A dump that stalls this long is reported, not waited for forever.
const RECV_TIMEOUT_SECS: i64 = 10;
/// Receive buffer of a group subscriber: a burst of notifications (a whole
/// `nft -f` of someone else's table, say) or of trace events must not
/// overrun it; 4 MiB holds tens of thousands. Overruns are still reported.
const GROUP_RCVBUF_BYTES: usize = 4 << 20;
/// Datagram buffer of a group subscriber (grown when a datagram is larger).
const GROUP_RECV_BUF: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open a NETLINK_NETFILTER socket")]
    Open(#[source] io::Error),
    #[error("failed to set socket option {option}")]
    SetOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to subscribe to netlink group {group}")]
    Subscribe {
        group: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to send {bytes} bytes to the kernel")]
    Send {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("the kernel accepted only {sent} of {bytes} bytes of a batch")]
    ShortSend { sent: usize, bytes: usize },
    #[error("failed to receive from the kernel")]
    Receive(#[source] io::Error),
    #[error("the kernel's reply is malformed: {0}")]
    MalformedReply(String),
    #[error("the kernel rejected the request: {}", errno_text(*.errno, .message.as_deref()))]
    Request { errno: i32, message: Option<String> },
    #[error("the dump was interrupted by a concurrent ruleset change")]
    DumpInterrupted,
    #[error("replies were lost (receive buffer overflow) while reading a dump")]
    DumpOverrun,
}

pub fn errno_text(errno: i32, message: Option<&str>) -> String {
    let base = io::Error::from_raw_os_error(errno);
    match message {
        Some(m) if !m.is_empty() => format!("{base} ({m})"),
        _ => base.to_string(),
    }
}

/// One error reply for a message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError {
    /// Index of the failing message in the batch buffer (0 = BATCH_BEGIN).
    pub index: usize,
    /// Positive errno.
    pub errno: i32,
    /// The extended-ACK message, if the kernel set one.
    pub message: Option<String>,
    /// The extended-ACK offset of the offending attribute in the message.
    pub attr_offset: Option<u32>,
}

/// What the kernel said about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Committed. `acked` tells whether BATCH_END was acknowledged (kernels
    /// ≥ 6.10 do so only on a successful commit); without an ack and without
    /// any error or lost reply we still know it committed, since errors are
    /// always reported.
    Committed { acked: bool },
    /// Rolled back as a whole; at least one message failed.
    Rejected(Vec<MessageError>),
    /// Replies were lost (ENOBUFS): committed or not, we cannot tell.
    Unknown { errors_seen: Vec<MessageError> },
}

/// A reply message: netlink type and payload (after the nlmsghdr).
#[derive(Debug, Clone)]
pub struct Reply {
    pub msg_type: u16,
    pub payload: Vec<u8>,
}

/// What one non-blocking receive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Nothing queued.
    Empty,
    /// Datagrams were lost (the receive buffer overran, or one did not fit
    /// ours — which grows for the next one).
    Overrun,
    /// One datagram of this many bytes: read it with [`Socket::messages`].
    Datagram(usize),
}

/// A `NETLINK_NETFILTER` socket in the network namespace of the thread that
/// opened it.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    sndbuf: usize,
    next_seq: u32,
    rx: Vec<u8>,
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_*BUFFORCE` needs CAP_NET_ADMIN (which programming nf_tables needs
/// anyway); fall back to the capped `SO_*BUF` otherwise.
fn set_buf(
    fd: &OwnedFd,
    force: i32,
    plain: i32,
    bytes: usize,
    option: &'static str,
) -> Result<(), Error> {
    let v = bytes.min(i32::MAX as usize / 2) as i32;
    setsockopt(fd, libc::SOL_SOCKET, force, &v)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, plain, &v))
        .map_err(|source| Error::SetOption { option, source })
}

impl Socket {
    /// Opens a socket for transactions and requests in the current thread's
    /// network namespace: extended ACKs, capped error replies, buffers large
    /// enough for any batch's replies, and a bounded wait for a reply.
    pub fn open() -> Result<Socket, Error> {
        let sock = Socket::bound(RECV_BUF)?;
        let fd = &sock.fd;
        for (option, name) in [
            ("NETLINK_EXT_ACK", NETLINK_EXT_ACK),
            ("NETLINK_CAP_ACK", NETLINK_CAP_ACK),
        ] {
            setsockopt(fd, SOL_NETLINK, name, &1i32)
                .map_err(|source| Error::SetOption { option, source })?;
        }
        let (snd, rcv) = ("SO_SNDBUFFORCE", "SO_RCVBUFFORCE");
        set_buf(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SNDBUF_BYTES, snd)?;
        set_buf(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF_BYTES, rcv)?;
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).map_err(|source| {
            Error::SetOption {
                option: "SO_RCVTIMEO",
                source,
            }
        })?;
        debug!("opened NETLINK_NETFILTER socket");
        Ok(sock)
    }

    /// Opens a socket subscribed to the multicast `group`
    /// (`NFNLGRP_NFTABLES` notifications, `NFNLGRP_NFTRACE` events):
    /// messages sent to the group from now on are received.
    pub fn subscribe(group: u32) -> Result<Socket, Error> {
        let sock = Socket::bound(GROUP_RECV_BUF)?;
        // Best effort: a bigger buffer only makes overruns rarer.
        let _ = sock.set_receive_buffer(GROUP_RCVBUF_BYTES);
        setsockopt(&sock.fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group)
            .map_err(|source| Error::Subscribe { group, source })?;
        debug!(group, "subscribed to a NETLINK_NETFILTER group");
        Ok(sock)
    }

    /// A socket bound to a port id the kernel picks.
    fn bound(rx_len: usize) -> Result<Socket, Error> {
        // SAFETY: plain syscall; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = kernel_addr();
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                raw,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        // Sequence numbers only need to be unique on this socket; starting
        // from the clock keeps them distinct from a previous socket's.
        let next_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1)
            | 1;
        Ok(Socket {
            fd,
            sndbuf: SNDBUF_BYTES,
            next_seq,
            rx: vec![0u8; rx_len],
        })
    }

    /// Sets the socket receive buffer (`SO_RCVBUFFORCE`, else `SO_RCVBUF`).
    pub fn set_receive_buffer(&self, bytes: usize) -> Result<(), Error> {
        set_buf(
            &self.fd,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            bytes,
            "SO_RCVBUFFORCE",
        )
    }

    /// The port id the kernel bound this socket to: nf_tables
    /// notifications of our commits carry it as `nlmsg_pid`.
    pub fn port_id(&self) -> Result<u32, Error> {
        let mut addr = kernel_addr();
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr and len are valid for writing.
        let rc = unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                &mut addr as *mut libc::sockaddr_nl as *mut libc::sockaddr,
                &mut len,
            )
        };
        if rc < 0 {
            return Err(Error::Receive(io::Error::last_os_error()));
        }
        Ok(addr.nl_pid)
    }

    fn take_seqs(&mut self, n: usize) -> u32 {
        let base = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(n as u32 + 1);
        if self.next_seq < base {
            // Wrapped: skip 0, which some tools treat as "unset".
            self.next_seq = 1;
        }
        base
    }

    fn ensure_sndbuf(&mut self, bytes: usize) -> Result<(), Error> {
        // netlink_sendmsg refuses messages larger than sk_sndbuf - 32.
        let want = bytes + 64 * 1024;
        if want > self.sndbuf {
            set_buf(
                &self.fd,
                libc::SO_SNDBUFFORCE,
                libc::SO_SNDBUF,
                want,
                "SO_SNDBUFFORCE",
            )?;
            self.sndbuf = want;
            debug!(bytes = want, "raised socket send buffer");
        }
        Ok(())
    }

    fn send_all(&mut self, buf: &[u8]) -> Result<(), Error> {
        self.ensure_sndbuf(buf.len())?;
        let addr = kernel_addr();
        loop {
            // SAFETY: buf and addr are valid for the given lengths.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr() as *const libc::c_void,
                    buf.len(),
                    0,
                    &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Send {
                    bytes: buf.len(),
                    source: e,
                });
            }
            // A batch must go out in one sendmsg: the kernel aborts batches
            // split over several (docs/netlink.md). Netlink datagrams are never
            // partially sent, but say so loudly if it ever happened.
            if rc as usize != buf.len() {
                return Err(Error::ShortSend {
                    sent: rc as usize,
                    bytes: buf.len(),
                });
            }
            return Ok(());
        }
    }

    /// Whether a datagram (or a pending error such as an overrun) is
    /// waiting, within `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, Error> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(Error::Receive(e));
            }
            // POLLERR is how a pending ENOBUFS shows; receive reports it.
            return Ok(rc > 0);
        }
    }

    /// Receives one datagram without blocking.
    pub fn receive(&mut self) -> Result<Received, Error> {
        self.recv(true)
    }

    /// The messages of the datagram [`receive`](Self::receive) reported as
    /// `Datagram(len)`.
    pub fn messages(&self, len: usize) -> NlMsgIter<'_> {
        NlMsgIter::new(&self.rx[..len])
    }

    /// Receives one datagram; blocking ones wait up to the socket's receive
    /// timeout.
    fn recv(&mut self, nonblocking: bool) -> Result<Received, Error> {
        loop {
            let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 } | libc::MSG_TRUNC;
            // SAFETY: rx is a valid writable buffer of its length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.rx.as_mut_ptr() as *mut libc::c_void,
                    self.rx.len(),
                    flags,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if nonblocking => return Ok(Received::Empty),
                    Some(libc::ENOBUFS) => return Ok(Received::Overrun),
                    _ => return Err(Error::Receive(e)),
                }
            }
            let n = rc as usize;
            if n > self.rx.len() {
                // MSG_TRUNC reports the real length: grow and let the caller
                // treat the lost datagram as an overrun.
                self.rx.resize(n.next_power_of_two(), 0);
                return Ok(Received::Overrun);
            }
            return Ok(Received::Datagram(n));
        }
    }

    /// Discards anything still queued (e.g. after an interrupted dump).
    fn drain_stale(&mut self) -> Result<(), Error> {
        loop {
            match self.recv(true)? {
                Received::Empty => return Ok(()),
                Received::Overrun => continue,
                Received::Datagram(n) => trace!(bytes = n, "discarded stale netlink data"),
            }
        }
    }

    /// Sends a complete batch (BATCH_BEGIN … BATCH_END, already encoded) in
    /// one `sendmsg`. `offsets` are the start offsets of every message in
    /// `buf`, in order, BATCH_BEGIN first and BATCH_END last. Sequence
    /// numbers are written here; `NLM_F_ACK` is set on BATCH_END only (an
    /// ACK per message overflows the receive buffer beyond ~250 messages).
    pub fn send_batch(&mut self, buf: &mut [u8], offsets: &[usize]) -> Result<BatchOutcome, Error> {
        if offsets.is_empty() {
            return Ok(BatchOutcome::Committed { acked: false });
        }
        self.drain_stale()?;
        let base = self.take_seqs(offsets.len());
        for (i, &off) in offsets.iter().enumerate() {
            let seq = base.wrapping_add(i as u32);
            buf[off + 8..off + 12].copy_from_slice(&seq.to_ne_bytes());
        }
        let last = offsets[offsets.len() - 1];
        let flags = u16::from_ne_bytes([buf[last + 6], buf[last + 7]]) | NLM_F_ACK;
        buf[last + 6..last + 8].copy_from_slice(&flags.to_ne_bytes());

        self.send_all(buf)?;

        // The kernel processed the whole batch inside sendmsg: every reply
        // is queued now. Drain without blocking (since 6.10 BATCH_END is
        // acked only on success, so waiting for it could hang).
        let n = offsets.len();
        let mut errors = Vec::new();
        let mut end_acked = false;
        let mut overrun = false;
        loop {
            let len = match self.recv(true)? {
                Received::Empty => break,
                Received::Overrun => {
                    overrun = true;
                    continue;
                }
                Received::Datagram(len) => len,
            };
            for msg in NlMsgIter::new(&self.rx[..len]) {
                let msg = msg.map_err(Error::MalformedReply)?;
                if msg.msg_type != NLMSG_ERROR {
                    trace!(
                        msg_type = msg.msg_type,
                        "ignoring non-error reply to a batch"
                    );
                    continue;
                }
                let index = msg.seq.wrapping_sub(base) as usize;
                if index >= n {
                    trace!(seq = msg.seq, "ignoring reply for another request");
                    continue;
                }
                let err = parse_error(msg.flags, msg.payload).map_err(Error::MalformedReply)?;
                if err.errno == 0 {
                    if index == n - 1 {
                        end_acked = true;
                    }
                    continue;
                }
                errors.push(MessageError {
                    index,
                    errno: err.errno,
                    message: err.message,
                    attr_offset: err.offset,
                });
            }
        }
        debug!(
            messages = n,
            errors = errors.len(),
            end_acked,
            overrun,
            "batch replies drained"
        );
        match (errors.is_empty(), end_acked, overrun) {
            // Any error aborts the whole batch: errors are proof of a
            // rollback even if other replies were lost.
            (false, false, _) => Ok(BatchOutcome::Rejected(errors)),
            // Errors *and* a commit ack contradict each other: do not guess.
            (false, true, _) => Ok(BatchOutcome::Unknown {
                errors_seen: errors,
            }),
            (true, false, true) => Ok(BatchOutcome::Unknown {
                errors_seen: errors,
            }),
            (true, acked, _) => Ok(BatchOutcome::Committed { acked }),
        }
    }

    /// Sends one request (a GET, dump or not, or a configuration message)
    /// and collects its replies until NLMSG_DONE (dump) or the ACK
    /// (non-dump; `NLM_F_ACK` is set here). An error reply becomes
    /// `Error::Request`. Messages of other sequence numbers (stale replies,
    /// multicast traffic) are skipped.
    pub fn request(&mut self, msg: &mut [u8]) -> Result<Vec<Reply>, Error> {
        self.drain_stale()?;
        let seq = self.take_seqs(1);
        msg[8..12].copy_from_slice(&seq.to_ne_bytes());
        let flags = u16::from_ne_bytes([msg[6], msg[7]]);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = flags | NLM_F_REQUEST | if dump { 0 } else { NLM_F_ACK };
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.send_all(msg)?;

        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let len = match self.recv(false)? {
                Received::Empty => continue,
                Received::Overrun => return Err(Error::DumpOverrun),
                Received::Datagram(len) => len,
            };
            for m in NlMsgIter::new(&self.rx[..len]) {
                let m = m.map_err(Error::MalformedReply)?;
                if m.seq != seq {
                    trace!(seq = m.seq, "ignoring stale reply");
                    continue;
                }
                if m.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match m.msg_type {
                    NLMSG_DONE => {
                        return if interrupted {
                            Err(Error::DumpInterrupted)
                        } else {
                            Ok(out)
                        };
                    }
                    NLMSG_ERROR => {
                        let e = parse_error(m.flags, m.payload).map_err(Error::MalformedReply)?;
                        if e.errno != 0 {
                            return Err(Error::Request {
                                errno: e.errno,
                                message: e.message,
                            });
                        }
                        if !dump {
                            return Ok(out);
                        }
                    }
                    t => out.push(Reply {
                        msg_type: t,
                        payload: m.payload.to_vec(),
                    }),
                }
            }
        }
    }
}

/// The kernel's address (port id 0), also what `bind` takes to autobind.
fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: a zeroed sockaddr_nl is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr
}

/// One netlink message of a received datagram.
#[derive(Debug, Clone, Copy)]
pub struct NlMsg<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    /// Port id of the sender (for notifications: of the committing socket).
    pub port: u32,
    /// Everything after the `nlmsghdr`.
    pub payload: &'a [u8],
}

impl<'a> NlMsg<'a> {
    /// For an nfnetlink message: the `nfgenmsg` family and the attributes
    /// after it; `None` when the payload is too short for an `nfgenmsg`.
    pub fn nfgen(&self) -> Option<(u8, &'a [u8])> {
        (self.payload.len() >= 4).then(|| (self.payload[0], &self.payload[4..]))
    }
}

/// The messages of one datagram; a malformed length ends it with an error.
pub struct NlMsgIter<'a> {
    buf: &'a [u8],
}

impl<'a> NlMsgIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        NlMsgIter { buf }
    }
}

impl<'a> Iterator for NlMsgIter<'a> {
    type Item = Result<NlMsg<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let b = self.buf;
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            self.buf = &[];
            return Some(Err(format!(
                "netlink message length {len} out of range ({} bytes left)",
                b.len()
            )));
        }
        let msg = NlMsg {
            msg_type: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            port: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            payload: &b[NLMSG_HDRLEN..len],
        };
        let next = align4(len).min(b.len());
        self.buf = &b[next..];
        Some(Ok(msg))
    }
}

struct ParsedError {
    errno: i32,
    message: Option<String>,
    offset: Option<u32>,
}

/// Parses an `NLMSG_ERROR` payload: `struct nlmsgerr` (error code and the
/// original header, plus its payload unless capped), then the extended-ACK
/// attributes when `NLM_F_ACK_TLVS` is set.
fn parse_error(flags: u16, payload: &[u8]) -> Result<ParsedError, String> {
    if payload.len() < 4 + NLMSG_HDRLEN {
        return Err(format!("NLMSG_ERROR payload of {} bytes", payload.len()));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let mut parsed = ParsedError {
        errno: -code,
        message: None,
        offset: None,
    };
    if flags & NLM_F_ACK_TLVS == 0 {
        return Ok(parsed);
    }
    let orig_len = u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]) as usize;
    let skip = if flags & NLM_F_CAPPED != 0 {
        4 + NLMSG_HDRLEN
    } else {
        4 + align4(orig_len)
    };
    if skip > payload.len() {
        return Ok(parsed);
    }
    for (kind, value) in AttrIter::new(&payload[skip..]) {
        match kind {
            NLMSGERR_ATTR_MSG => parsed.message = Some(c_str(value)),
            NLMSGERR_ATTR_OFFS if value.len() >= 4 => {
                parsed.offset = Some(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]));
            }
            _ => {}
        }
    }
    Ok(parsed)
}
