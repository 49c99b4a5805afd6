//! Reading NFLOG records (`log group N` in nftables, `-j NFLOG` in
//! iptables): what `--log-denied` sends, for tests and for operators
//! without ulogd. Binds one group on a `NETLINK_NETFILTER` socket
//! (`NFULNL_MSG_CONFIG`, `NFULNL_CFG_CMD_BIND`) in the current network
//! namespace; the group is released when the listener is dropped.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::netlink::{NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST};
use crate::nla::{AttrIter, Writer};
use crate::trace::{messages, poll_readable};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 4;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_CFG_CMD_UNBIND: u8 = 2;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("failed to open an NFLOG socket")]
    Open(#[source] io::Error),
    #[error("failed to bind NFLOG group {group}")]
    Bind {
        group: u16,
        #[source]
        source: io::Error,
    },
    #[error("failed to receive NFLOG records")]
    Receive(#[source] io::Error),
}

/// One logged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NflogRecord {
    /// `NFPROTO_IPV4` (2) or `NFPROTO_IPV6` (10).
    pub family: u8,
    /// The rule's prefix (`DROP default.web-deny-all ingress end-of-tier `).
    pub prefix: String,
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
    /// The start of the packet (from the network header).
    pub payload: Vec<u8>,
}

impl NflogRecord {
    /// Source and destination address from the packet's IP header.
    pub fn addresses(&self) -> Option<(IpAddr, IpAddr)> {
        let p = &self.payload;
        match p.first()? >> 4 {
            4 if p.len() >= 20 => {
                let a: [u8; 4] = p[12..16].try_into().ok()?;
                let b: [u8; 4] = p[16..20].try_into().ok()?;
                Some((a.into(), b.into()))
            }
            6 if p.len() >= 40 => {
                let a: [u8; 16] = p[8..24].try_into().ok()?;
                let b: [u8; 16] = p[24..40].try_into().ok()?;
                Some((a.into(), b.into()))
            }
            _ => None,
        }
    }
}

/// A socket bound to one NFLOG group.
#[derive(Debug)]
pub struct NflogListener {
    fd: OwnedFd,
    group: u16,
    rx: Vec<u8>,
}

impl NflogListener {
    /// Binds `group` in the current thread's network namespace; records
    /// are delivered one by one (queue threshold 1) with up to
    /// `copy_bytes` of each packet.
    pub fn bind(group: u16, copy_bytes: u32) -> Result<NflogListener, NflogError> {
        // SAFETY: plain syscall; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(NflogError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let rc = unsafe {
            libc::bind(
                raw,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NflogError::Open(io::Error::last_os_error()));
        }
        let mut l = NflogListener {
            fd,
            group,
            rx: vec![0u8; 1 << 16],
        };
        let bind_err = |source| NflogError::Bind { group, source };
        l.config(|w| w.put(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]))
            .map_err(bind_err)?;
        l.config(|w| {
            let mut mode = copy_bytes.to_be_bytes().to_vec();
            mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
            w.put(NFULA_CFG_MODE, &mode);
            w.put_u32_be(NFULA_CFG_QTHRESH, 1);
        })
        .map_err(bind_err)?;
        Ok(l)
    }

    /// Sends one config message for our group and waits for its ACK.
    fn config(&mut self, attrs: impl FnOnce(&mut Writer)) -> io::Result<()> {
        let mut w = Writer::with_capacity(64);
        let m = w.begin_msg(
            (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            0, // AF_UNSPEC
            self.group,
        );
        attrs(&mut w);
        w.end_msg(m);
        // SAFETY: buf is valid for its length.
        let rc = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                w.buf.as_ptr() as *const libc::c_void,
                w.buf.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_readable(&self.fd, left)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no ACK from nfnetlink_log",
                ));
            }
            let n = self.recv()?;
            for (t, _, _) in messages(&self.rx[..n]) {
                if t == NLMSG_ERROR {
                    // nlmsgerr: the errno right after the 16-byte header.
                    let errno = i32::from_ne_bytes(self.rx[16..20].try_into().expect("4 bytes"));
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
            }
        }
    }

    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: rx is a valid writable buffer of its length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.rx.as_mut_ptr() as *mut libc::c_void,
                    self.rx.len(),
                    0,
                )
            };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Waits up to `timeout` for records; returns those of the first
    /// datagram that held any (empty on timeout).
    pub fn next_records(&mut self, timeout: Duration) -> Result<Vec<NflogRecord>, NflogError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_readable(&self.fd, left).map_err(NflogError::Receive)? {
                return Ok(vec![]);
            }
            let n = match self.recv() {
                Ok(n) => n,
                // Overrun: records were lost; later ones still arrive.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => return Err(NflogError::Receive(e)),
            };
            let records: Vec<NflogRecord> = messages(&self.rx[..n])
                .into_iter()
                .filter(|(t, _, _)| *t == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
                .map(|(_, family, attrs)| decode_record(family, attrs))
                .collect();
            if !records.is_empty() {
                return Ok(records);
            }
        }
    }
}

impl Drop for NflogListener {
    fn drop(&mut self) {
        // Closing the socket releases the group too; unbinding says so
        // explicitly. Best effort.
        let _ = self.config(|w| w.put(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_UNBIND]));
    }
}

fn decode_record(family: u8, attrs: &[u8]) -> NflogRecord {
    let mut r = NflogRecord {
        family,
        prefix: String::new(),
        in_ifindex: None,
        out_ifindex: None,
        payload: Vec::new(),
    };
    let be_u32 = |v: &[u8]| {
        v.get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    for (t, v) in AttrIter::new(attrs) {
        match t {
            NFULA_PREFIX => {
                let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                r.prefix = String::from_utf8_lossy(&v[..end]).into_owned();
            }
            NFULA_IFINDEX_INDEV => r.in_ifindex = be_u32(v),
            NFULA_IFINDEX_OUTDEV => r.out_ifindex = be_u32(v),
            NFULA_PAYLOAD => r.payload = v.to_vec(),
            _ => {}
        }
    }
    r
}
