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
use std::time::{Duration, Instant};

use compiler::nft::{is_our_table, TableFamily};
use tracing::{debug, trace};

use crate::consts::*;
use crate::netlink::{self, Received, Socket};
use crate::nla::{be_u32, c_str, AttrIter};

/// Attribute 1 is the table name in every object notification (table,
/// chain, rule, set, element list, object, flowtable).
const NFTA_ANY_TABLE: u16 = 1;

/// The monitor's errors are its socket's: subscribing
/// ([`Error::Subscribe`]), receiving ([`Error::Receive`]) and a malformed
/// notification ([`Error::MalformedReply`]).
pub use crate::netlink::Error;

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
    /// The object's table (one of ours).
    pub table: String,
    /// The object's name: the table's for a table, the chain's for a chain
    /// or a rule (rules have no name), the set's for a set or element.
    pub name: String,
}

impl fmt::Display for TouchedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.deleted { "deleted" } else { "added" };
        let (fam, table, name) = (self.family.keyword(), &self.table, &self.name);
        match self.kind {
            ObjectKind::Table => write!(f, "{op} table {fam} {name}"),
            ObjectKind::Chain => write!(f, "{op} chain {fam} {table} {name}"),
            ObjectKind::Rule => write!(f, "{op} a rule of chain {fam} {table} {name}"),
            ObjectKind::Set => write!(f, "{op} set {fam} {table} {name}"),
            ObjectKind::Element => write!(f, "{op} elements of set {fam} {table} {name}"),
            ObjectKind::Other => write!(f, "{op} object {fam} {table} {name}"),
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
    sock: Socket,
    /// The transaction being received: its committer and what it touched
    /// in our tables so far (complete at its `NEWGEN`).
    pending: Option<ForeignTransaction>,
}

impl Monitor {
    /// Opens the socket and subscribes; changes committed from now on are
    /// seen.
    pub fn open() -> Result<Monitor, Error> {
        Ok(Monitor {
            sock: Socket::subscribe(NFNLGRP_NFTABLES)?,
            pending: None,
        })
    }

    /// Waits up to `timeout` for a committed change to our tables (family
    /// ip or ip6, [`is_our_table`]) by a socket other than
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
            if !self.sock.wait_readable(left)? {
                // A transaction whose NEWGEN we have not seen yet (it is
                // sent right after its objects, so this is rare): report
                // what we have rather than sit on it.
                return Ok(self.pending.take().and_then(non_empty));
            }
            let n = match self.sock.receive()? {
                Received::Overrun => {
                    debug!("nf_tables notifications lost (ENOBUFS)");
                    self.pending = None;
                    return Ok(Some(ForeignChange::Unknown));
                }
                Received::Empty => continue,
                Received::Datagram(n) => n,
            };
            let mut done = None;
            for msg in self.sock.messages(n) {
                let msg = msg.map_err(Error::MalformedReply)?;
                if let Some(t) = take_message(&mut self.pending, &msg, ignore_port) {
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

    /// Shrinks the receive buffer so a burst overruns it (tests ENOBUFS).
    #[cfg(test)]
    fn shrink_receive_buffer(&self) {
        self.sock.set_receive_buffer(1024).unwrap();
    }
}

/// Folds one notification into the pending transaction; returns it when
/// this message completed a foreign transaction touching ours.
fn take_message(
    pending: &mut Option<ForeignTransaction>,
    msg: &netlink::NlMsg<'_>,
    ignore_port: u32,
) -> Option<ForeignTransaction> {
    if msg.msg_type >> 8 != NFNL_SUBSYS_NFTABLES {
        return None;
    }
    let (nfproto, attrs) = msg.nfgen()?;
    let family = match nfproto {
        NFPROTO_IPV4 => Some(TableFamily::Ip),
        NFPROTO_IPV6 => Some(TableFamily::Ip6),
        _ => None,
    };
    let port = msg.port;
    let kind = (msg.msg_type & 0xff) as u8;
    if kind == NFT_MSG_NEWGEN {
        let mut t = pending.take()?;
        for (attr, value) in AttrIter::new(attrs) {
            match attr {
                NFTA_GEN_ID => t.generation = be_u32(value),
                NFTA_GEN_PROC_PID => t.process_pid = be_u32(value),
                NFTA_GEN_PROC_NAME => t.process_name = Some(c_str(value)),
                _ => {}
            }
        }
        return (!t.objects.is_empty()).then_some(t);
    }
    let (kind, deleted, name_attr) = match kind {
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
        // GET*_RESET (counter resets) and anything newer: not a change of
        // what the ruleset does.
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
    let table = table.filter(|t| is_our_table(t))?;
    let object = TouchedObject {
        kind,
        deleted,
        family,
        table,
        name: name.unwrap_or_default(),
    };
    trace!(%object, port, "foreign change to our table");
    // A new committer means the previous transaction ended without a
    // NEWGEN we saw; keep it (its objects still need a resync).
    let t = pending.get_or_insert_with(|| ForeignTransaction {
        objects: Vec::new(),
        port_id: port,
        generation: None,
        process_pid: None,
        process_name: None,
    });
    t.objects.push(object);
    None
}

fn non_empty(t: ForeignTransaction) -> Option<ForeignChange> {
    (!t.objects.is_empty()).then_some(ForeignChange::Transaction(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NftProgrammer;
    use compiler::nft::{Chain, Ruleset, Table, TABLE_NAME};
    use testkit::netns::{nft_available, Netns};

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
                    rules: Vec::new().into(),
                },
            );
        }
        Ruleset { tables: vec![t] }
    }

    /// A namespace whose table holds chain c1, a monitor opened after it,
    /// and the programmer with its port id; `None` where nft is missing.
    fn watched(tag: &str) -> Option<(Netns, NftProgrammer, Monitor, u32)> {
        if !nft_available() {
            eprintln!("skipping: the nft binary is not installed");
            return None;
        }
        let ns = Netns::enter(tag).unwrap();
        let mut p = NftProgrammer::new().unwrap();
        p.apply(&our_ruleset(&["c1"])).unwrap();
        let m = Monitor::open().unwrap();
        let own = p.port_id().unwrap();
        Some((ns, p, m, own))
    }

    #[test]
    fn a_change_by_nft_to_our_table_is_reported() {
        let Some((ns, _p, mut m, own)) = watched("mon-nft") else {
            return;
        };
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
                table: TABLE_NAME.into(),
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
        let Some((ns, _p, mut m, own)) = watched("mon-other") else {
            return;
        };
        ns.nft(&["add", "table", "ip", "kube-proxy"]).unwrap();
        ns.nft(&["add", "chain", "ip", "kube-proxy", "c1"]).unwrap();
        // Same table name in a family we do not program.
        ns.nft(&["add", "table", "inet", TABLE_NAME]).unwrap();
        // Names that only look like a group's table.
        for name in [
            "nftpolicy-g",
            "nftpolicy-gx",
            "nftpolicy-g1x",
            "nftpolicyg1",
        ] {
            ns.nft(&["add", "table", "ip", name]).unwrap();
        }
        assert_eq!(m.wait_foreign(own, QUIET).unwrap(), None);
        // A group's table is ours.
        ns.nft(&["add", "table", "ip", "nftpolicy-g12"]).unwrap();
        let Some(ForeignChange::Transaction(t)) = m.wait_foreign(own, WAIT).unwrap() else {
            panic!("a group table's creation not reported");
        };
        assert_eq!(t.objects[0].table, "nftpolicy-g12");
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
