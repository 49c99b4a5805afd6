//! Reading NFLOG records (`log group N` in nftables, `-j NFLOG` in
//! iptables): what `--log-denied` sends, for tests and for operators
//! without ulogd. Binds one group on a `NETLINK_NETFILTER` socket
//! (`NFULNL_MSG_CONFIG`, `NFULNL_CFG_CMD_BIND`) in the current network
//! namespace; the group is released when the listener is dropped.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::consts::*;
use crate::netlink::{self, NlMsg, Received, Socket};
use crate::nla::{be_u32, c_str, AttrIter, Writer};

#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    /// Opening the socket or receiving from it.
    #[error(transparent)]
    Socket(#[from] netlink::Error),
    #[error("failed to bind NFLOG group {group}")]
    Bind {
        group: u16,
        #[source]
        source: netlink::Error,
    },
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
    sock: Socket,
    group: u16,
}

impl NflogListener {
    /// Binds `group` in the current thread's network namespace; records
    /// are delivered one by one (queue threshold 1) with up to
    /// `copy_bytes` of each packet.
    pub fn bind(group: u16, copy_bytes: u32) -> Result<NflogListener, NflogError> {
        let mut l = NflogListener {
            sock: Socket::open()?,
            group,
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
    fn config(&mut self, attrs: impl FnOnce(&mut Writer)) -> Result<(), netlink::Error> {
        let mut w = Writer::with_capacity(64);
        let m = w.begin_msg(
            (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            0, // AF_UNSPEC
            self.group,
        );
        attrs(&mut w);
        w.end_msg(m);
        self.sock.request(&mut w.buf)?;
        Ok(())
    }

    /// Waits up to `timeout` for records; returns those of the first
    /// datagram that held any (empty on timeout).
    pub fn next_records(&mut self, timeout: Duration) -> Result<Vec<NflogRecord>, NflogError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.sock.wait_readable(left)? {
                return Ok(vec![]);
            }
            let n = match self.sock.receive()? {
                Received::Datagram(n) => n,
                // Overrun: records were lost; later ones still arrive.
                Received::Overrun | Received::Empty => continue,
            };
            let records: Vec<NflogRecord> = self
                .sock
                .messages(n)
                .filter_map(Result::ok)
                .filter_map(|m| decode_record(&m))
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

/// One `NFULNL_MSG_PACKET` message; `None` for any other message.
fn decode_record(msg: &NlMsg<'_>) -> Option<NflogRecord> {
    if msg.msg_type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
        return None;
    }
    let (family, attrs) = msg.nfgen()?;
    let mut r = NflogRecord {
        family,
        prefix: String::new(),
        in_ifindex: None,
        out_ifindex: None,
        payload: Vec::new(),
    };
    for (t, v) in AttrIter::new(attrs) {
        match t {
            NFULA_PREFIX => r.prefix = c_str(v),
            NFULA_IFINDEX_INDEV => r.in_ifindex = be_u32(v),
            NFULA_IFINDEX_OUTDEV => r.out_ifindex = be_u32(v),
            NFULA_PAYLOAD => r.payload = v.to_vec(),
            _ => {}
        }
    }
    Some(r)
}
