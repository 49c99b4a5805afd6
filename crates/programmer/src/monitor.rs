//! Watches nf_tables change notifications for changes to *our* tables made
//! by someone else (an admin's `nft`, another agent, a script), so the
//! agent can repair them at once instead of at the next periodic resync.
//!
//! nf_tables multicasts every committed change to `NFNLGRP_NFTABLES`: per
//! transaction, one notification per object touched, then `NFT_MSG_NEWGEN`
//! with the new generation and the committing process. Every notification
//! carries, as `nlmsg_pid`, the netlink port id of the socket that
//! committed — which is how our own commits are told apart
//! ([`crate::NftProgrammer::port_id`]).
//!
//! Notifications can be lost (the receive buffer overruns, `ENOBUFS`);
//! then which tables changed is unknown and [`ForeignChange::Unknown`] is
//! reported, so the caller re-reads the kernel.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use compiler::nft::{TableFamily, TABLE_NAME};
use tracing::{debug, trace};

use crate::consts::*;
use crate::netlink::NETLINK_NETFILTER;
use crate::nla::{AttrIter, NLMSG_HDRLEN};

/// `NFNLGRP_NFTABLES` (`linux/netfilter/nfnetlink.h`).
const NFNLGRP_NFTABLES: i32 = 7;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
/// A burst of foreign changes (a whole `nft -f` of someone else's table,
/// say) must not overrun us; 4 MiB holds tens of thousands of
/// notifications. Overruns are still handled (reported as unknown).
const RCVBUF_BYTES: i32 = 4 << 20;
const RECV_BUF: usize = 256 * 1024;

const NFT_MSG_NEWOBJ: u8 = 18;
const NFT_MSG_DELOBJ: u8 = 20;
const NFT_MSG_NEWFLOWTABLE: u8 = 22;
const NFT_MSG_DELFLOWTABLE: u8 = 24;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// Attribute 1 is the table name in every object notification (table,
/// chain, rule, set, element list, object, flowtable).
const NFTA_ANY_TABLE: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open a NETLINK_NETFILTER socket for nf_tables notifications")]
    Open(#[source] io::Error),
    #[error("failed to subscribe to the nf_tables notification group")]
    Subscribe(#[source] io::Error),
    #[error("failed to receive nf_tables notifications")]
    Receive(#[source] io::Error),
    #[error("malformed nf_tables notification: {0}")]
    Malformed(String),
}

/// What kind of object a notification concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Table,
    Chain,
    Rule,
    Set,
    Element,
    /// A stateful object (counter, quota…) or flowtable: we create none, so
    /// one in our table is foreign by definition.
    Other,
}

/// One object of our tables touched by a foreign commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TouchedObject {
    pub kind: ObjectKind,
    /// Deleted (`DEL*`) rather than created or updated (`NEW*`).
    pub deleted: bool,
    pub family: TableFamily,
    /// The object's name: the table's for a table, the chain's for a chain
    /// or a rule (rules have no name), the set's for a set or element.
    pub name: String,
}

impl fmt::Display for TouchedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.deleted { "deleted" } else { "added" };
        let fam = self.family.keyword();
        match self.kind {
            ObjectKind::Table => write!(f, "{op} table {fam} {}", self.name),
            ObjectKind::Chain => write!(f, "{op} chain {fam} {TABLE_NAME} {}", self.name),
            ObjectKind::Rule => write!(f, "{op} a rule of chain {fam} {TABLE_NAME} {}", self.name),
            ObjectKind::Set => write!(f, "{op} set {fam} {TABLE_NAME} {}", self.name),
            ObjectKind::Element => {
                write!(f, "{op} elements of set {fam} {TABLE_NAME} {}", self.name)
            }
            ObjectKind::Other => write!(f, "{op} object {fam} {TABLE_NAME} {}", self.name),
        }
    }
}

/// A foreign commit that touched our tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignTransaction {
    /// What it touched, in notification order.
    pub objects: Vec<TouchedObject>,
    /// Netlink port id of the committing socket (0 = the kernel itself).
    pub port_id: u32,
    /// From `NFT_MSG_NEWGEN`, when it was seen.
    pub generation: Option<u32>,
    pub process_pid: Option<u32>,
    pub process_name: Option<String>,
}

impl fmt::Display for ForeignTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.process_name, self.process_pid) {
            (Some(n), Some(p)) => write!(f, "{n} (pid {p})")?,
            _ => write!(f, "netlink port {}", self.port_id)?,
        }
        write!(f, " ")?;
        for (i, o) in self.objects.iter().take(3).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{o}")?;
        }
        if self.objects.len() > 3 {
            write!(f, " and {} more", self.objects.len() - 3)?;
        }
        Ok(())
    }
}

/// What [`Monitor::wait_foreign`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForeignChange {
    /// Someone else committed changes to our tables.
    Transaction(ForeignTransaction),
    /// Notifications were lost: our tables may have changed. Re-read them.
    Unknown,
}

impl fmt::Display for ForeignChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForeignChange::Transaction(t) => t.fmt(f),
            ForeignChange::Unknown => {
                write!(f, "unknown changes (nf_tables notifications were lost)")
            }
        }
    }
}

/// A socket subscribed to nf_tables notifications in the network namespace
/// of the thread that opened it.
#[derive(Debug)]
pub struct Monitor {
    fd: OwnedFd,
    rx: Vec<u8>,
    /// The transaction being received: its committer and what it touched
    /// in our tables so far (complete at its `NEWGEN`).
    pending: Option<ForeignTransaction>,
}

impl Monitor {
    /// Opens the socket and subscribes; changes committed from now on are
    /// seen.
    pub fn open() -> Result<Monitor, Error> {
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
        // SAFETY: zeroed sockaddr_nl is valid (autobind a port id).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
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
        // Best effort: a bigger buffer only makes overruns rarer.
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES);
        }
        setsockopt_int(raw, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            .map_err(Error::Subscribe)?;
        debug!("subscribed to nf_tables notifications");
        Ok(Monitor {
            fd,
            rx: vec![0u8; RECV_BUF],
            pending: None,
        })
    }

    /// Waits up to `timeout` for a committed change to our tables (family
    /// ip or ip6, name [`TABLE_NAME`]) by a socket other than
    /// `ignore_port`; `Ok(None)` when there was none. Changes to other
    /// tables and our own commits are skipped silently.
    pub fn wait_foreign(
        &mut self,
        ignore_port: u32,
        timeout: Duration,
    ) -> Result<Option<ForeignChange>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.poll(left)? {
                // A transaction whose NEWGEN we have not seen yet (it is
                // sent right after its objects, so this is rare): report
                // what we have rather than sit on it.
                return Ok(self.pending.take().and_then(non_empty));
            }
            let n = match self.recv()? {
                Recv::Overrun => {
                    debug!("nf_tables notifications lost (ENOBUFS)");
                    self.pending = None;
                    return Ok(Some(ForeignChange::Unknown));
                }
                Recv::Empty => continue,
                Recv::Data(n) => n,
            };
            let mut done = None;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let b = &self.rx[off..n];
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len < NLMSG_HDRLEN || len > b.len() {
                    return Err(Error::Malformed(format!(
                        "message length {len} with {} bytes left",
                        b.len()
                    )));
                }
                let msg_type = u16::from_ne_bytes([b[4], b[5]]);
                let port = u32::from_ne_bytes([b[12], b[13], b[14], b[15]]);
                let payload = b[NLMSG_HDRLEN..len].to_vec();
                off += crate::nla::align4(len);
                if let Some(t) = self.take_message(msg_type, port, ignore_port, &payload) {
                    // Several transactions in one datagram: report the
                    // first; the caller re-reads the kernel anyway.
                    done.get_or_insert(t);
                }
            }
            if let Some(t) = done {
                return Ok(Some(ForeignChange::Transaction(t)));
            }
        }
    }

    /// Folds one notification into the pending transaction; returns it
    /// when this message completed a foreign transaction touching ours.
    fn take_message(
        &mut self,
        msg_type: u16,
        port: u32,
        ignore_port: u32,
        payload: &[u8],
    ) -> Option<ForeignTransaction> {
        if msg_type >> 8 != NFNL_SUBSYS_NFTABLES || payload.len() < 4 {
            return None;
        }
        let family = match payload[0] {
            2 => Some(TableFamily::Ip),
            10 => Some(TableFamily::Ip6),
            _ => None,
        };
        let attrs = &payload[4..];
        let msg = (msg_type & 0xff) as u8;
        if msg == NFT_MSG_NEWGEN {
            let mut t = self.pending.take()?;
            for (kind, value) in AttrIter::new(attrs) {
                match kind {
                    NFTA_GEN_ID => t.generation = be_u32(value),
                    NFTA_GEN_PROC_PID => t.process_pid = be_u32(value),
                    NFTA_GEN_PROC_NAME => t.process_name = Some(c_str(value)),
                    _ => {}
                }
            }
            return non_empty(t).map(|c| match c {
                ForeignChange::Transaction(t) => t,
                ForeignChange::Unknown => unreachable!(),
            });
        }
        let (kind, deleted, name_attr) = match msg {
            NFT_MSG_NEWTABLE => (ObjectKind::Table, false, NFTA_TABLE_NAME),
            NFT_MSG_DELTABLE => (ObjectKind::Table, true, NFTA_TABLE_NAME),
            NFT_MSG_NEWCHAIN => (ObjectKind::Chain, false, NFTA_CHAIN_NAME),
            NFT_MSG_DELCHAIN => (ObjectKind::Chain, true, NFTA_CHAIN_NAME),
            NFT_MSG_NEWRULE => (ObjectKind::Rule, false, NFTA_RULE_CHAIN),
            NFT_MSG_DELRULE => (ObjectKind::Rule, true, NFTA_RULE_CHAIN),
            NFT_MSG_NEWSET => (ObjectKind::Set, false, NFTA_SET_NAME),
            NFT_MSG_DELSET => (ObjectKind::Set, true, NFTA_SET_NAME),
            NFT_MSG_NEWSETELEM => (ObjectKind::Element, false, NFTA_SET_ELEM_LIST_SET),
            NFT_MSG_DELSETELEM => (ObjectKind::Element, true, NFTA_SET_ELEM_LIST_SET),
            NFT_MSG_NEWOBJ | NFT_MSG_NEWFLOWTABLE => (ObjectKind::Other, false, 2),
            NFT_MSG_DELOBJ | NFT_MSG_DELFLOWTABLE => (ObjectKind::Other, true, 2),
            // GET*_RESET (counter resets) and anything newer: not a
            // change of what the ruleset does.
            _ => return None,
        };
        if port == ignore_port {
            return None;
        }
        let family = family?;
        let mut table = None;
        let mut name = None;
        for (k, v) in AttrIter::new(attrs) {
            if k == NFTA_ANY_TABLE {
                table = Some(c_str(v));
            }
            if k == name_attr {
                name = Some(c_str(v));
            }
        }
        if table.as_deref() != Some(TABLE_NAME) {
            return None;
        }
        let object = TouchedObject {
            kind,
            deleted,
            family,
            name: name.unwrap_or_default(),
        };
        trace!(%object, port, "foreign change to our table");
        // A new committer means the previous transaction ended without a
        // NEWGEN we saw; keep it (its objects still need a resync).
        let t = self.pending.get_or_insert_with(|| ForeignTransaction {
            objects: Vec::new(),
            port_id: port,
            generation: None,
            process_pid: None,
            process_name: None,
        });
        t.objects.push(object);
        None
    }

    /// Shrinks the receive buffer so a burst overruns it (tests ENOBUFS).
    #[cfg(test)]
    fn shrink_receive_buffer(&self) {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            1024,
        )
        .unwrap();
    }

    /// Whether the socket is readable within `timeout`.
    fn poll(&self, timeout: Duration) -> Result<bool, Error> {
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
            // POLLERR is how a pending ENOBUFS shows; recv reports it.
            return Ok(rc > 0);
        }
    }

    fn recv(&mut self) -> Result<Recv, Error> {
        // SAFETY: rx is a valid writable buffer of its length.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.rx.as_mut_ptr() as *mut libc::c_void,
                self.rx.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(Recv::Empty),
                Some(libc::ENOBUFS) => Ok(Recv::Overrun),
                _ => Err(Error::Receive(e)),
            };
        }
        let n = rc as usize;
        if n > self.rx.len() {
            // Truncated: grow for next time; what was cut is lost.
            self.rx.resize(n.next_power_of_two(), 0);
            return Ok(Recv::Overrun);
        }
        Ok(Recv::Data(n))
    }
}

enum Recv {
    Empty,
    Overrun,
    Data(usize),
}

fn non_empty(t: ForeignTransaction) -> Option<ForeignChange> {
    (!t.objects.is_empty()).then_some(ForeignChange::Transaction(t))
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

fn c_str(v: &[u8]) -> String {
    let s = v.split(|&c| c == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(s).into_owned()
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{nft_available, Netns};
    use crate::NftProgrammer;
    use compiler::nft::{Chain, Ruleset, Table};

    const WAIT: Duration = Duration::from_secs(5);
    /// How long "nothing is reported" is watched for. Not a timing
    /// assertion: the change was committed before we look, so its
    /// notification is already queued if it was sent at all.
    const QUIET: Duration = Duration::from_millis(300);

    fn our_ruleset(chains: &[&str]) -> Ruleset {
        let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
        for c in chains {
            t.chains.insert(
                (*c).to_owned(),
                Chain {
                    name: (*c).to_owned(),
                    base: None,
                    rules: Vec::new(),
                },
            );
        }
        Ruleset { tables: vec![t] }
    }

    #[test]
    fn a_change_by_nft_to_our_table_is_reported() {
        if !nft_available() {
            eprintln!("skipping: the nft binary is not installed");
            return;
        }
        let ns = Netns::enter("mon-nft").unwrap();
        let mut p = NftProgrammer::new().unwrap();
        p.apply(&our_ruleset(&["c1"])).unwrap();
        let mut m = Monitor::open().unwrap();
        let own = p.port_id().unwrap();
        ns.nft(&["add", "chain", "ip", TABLE_NAME, "intruder"])
            .unwrap();
        let change = m.wait_foreign(own, WAIT).unwrap().expect("a change");
        let ForeignChange::Transaction(t) = change else {
            panic!("expected a transaction, got {change:?}");
        };
        assert_eq!(
            t.objects,
            vec![TouchedObject {
                kind: ObjectKind::Chain,
                deleted: false,
                family: TableFamily::Ip,
                name: "intruder".into(),
            }]
        );
        assert_eq!(t.process_name.as_deref(), Some("nft"));
        assert!(t.generation.is_some());

        ns.nft(&["delete", "table", "ip", TABLE_NAME]).unwrap();
        let Some(ForeignChange::Transaction(t)) = m.wait_foreign(own, WAIT).unwrap() else {
            panic!("table deletion not reported");
        };
        assert!(
            t.objects
                .iter()
                .any(|o| o.kind == ObjectKind::Table && o.deleted),
            "{t:?}"
        );
    }

    #[test]
    fn a_change_to_another_table_is_not_reported() {
        if !nft_available() {
            eprintln!("skipping: the nft binary is not installed");
            return;
        }
        let ns = Netns::enter("mon-other").unwrap();
        let mut p = NftProgrammer::new().unwrap();
        p.apply(&our_ruleset(&["c1"])).unwrap();
        let mut m = Monitor::open().unwrap();
        let own = p.port_id().unwrap();
        ns.nft(&["add", "table", "ip", "kube-proxy"]).unwrap();
        ns.nft(&["add", "chain", "ip", "kube-proxy", "c1"]).unwrap();
        // Same table name in a family we do not program.
        ns.nft(&["add", "table", "inet", TABLE_NAME]).unwrap();
        assert_eq!(m.wait_foreign(own, QUIET).unwrap(), None);
        // The monitor is still live: a change to ours after those is seen.
        ns.nft(&["flush", "chain", "ip", TABLE_NAME, "c1"]).unwrap();
        ns.nft(&["add", "rule", "ip", TABLE_NAME, "c1", "accept"])
            .unwrap();
        let Some(ForeignChange::Transaction(t)) = m.wait_foreign(own, WAIT).unwrap() else {
            panic!("rule addition not reported");
        };
        assert_eq!(t.objects[0].kind, ObjectKind::Rule);
        assert_eq!(t.objects[0].name, "c1");
    }

    #[test]
    fn lost_notifications_are_reported_as_an_unknown_change() {
        if !nft_available() {
            eprintln!("skipping: the nft binary is not installed");
            return;
        }
        let ns = Netns::enter("mon-overrun").unwrap();
        let mut m = Monitor::open().unwrap();
        m.shrink_receive_buffer();
        // One notification per element: far more than 1 KiB of them, in
        // someone else's table even — what was lost is unknown.
        let elements: Vec<String> = (0..2000).map(|i| format!("{}", 1000 + i)).collect();
        ns.nft_script(
            &[],
            &format!(
                "table ip other {{\n set s {{\n type inet_service\n elements = {{ {} }}\n }}\n}}\n",
                elements.join(", ")
            ),
        )
        .unwrap();
        assert_eq!(
            m.wait_foreign(0, WAIT).unwrap(),
            Some(ForeignChange::Unknown)
        );
    }

    #[test]
    fn our_own_applies_are_not_reported() {
        let _ns = Netns::enter("mon-own").unwrap();
        let mut p = NftProgrammer::new().unwrap();
        let mut m = Monitor::open().unwrap();
        let own = p.port_id().unwrap();
        p.apply(&our_ruleset(&["c1"])).unwrap();
        p.apply(&our_ruleset(&["c1", "c2"])).unwrap();
        p.remove_all().unwrap();
        assert_eq!(m.wait_foreign(own, QUIET).unwrap(), None);
        // The same commits seen from another port are foreign: the monitor
        // did receive them and skipped them only because of the port id.
        let mut p2 = NftProgrammer::new().unwrap();
        p2.apply(&our_ruleset(&["c1"])).unwrap();
        let Some(ForeignChange::Transaction(t)) = m.wait_foreign(own, WAIT).unwrap() else {
            panic!("another programmer's commit not reported");
        };
        assert_eq!(t.port_id, p2.port_id().unwrap());
    }
}
