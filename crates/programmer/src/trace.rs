//! Kernel packet tracing for `nftpolicy explain --kernel`: marks packets
//! matching a filter with `meta nftrace set 1` and reads the kernel's trace
//! events (`NFT_MSG_TRACE` on the `NFNLGRP_NFTRACE` netlink group), which
//! name every chain and rule a marked packet went through and its verdict.
//!
//! The marking rule lives in a table of its own, [`TRACE_TABLE`], in a base
//! chain at priority -300 (before our filter chains at 0), not in table
//! `nftpolicy`: the agent's drift check compares that table with what it
//! committed and would delete a foreign chain there in the middle of a
//! trace. The trace table is created in one small transaction and destroyed
//! in another when the session ends (also on drop); nothing else changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use compiler::nft::{
    AddrTarget, BaseChain, Chain, ChainPolicy, CtStates, Dir, Hook, Match, PortTarget, Rule,
    TableFamily,
};

use crate::batch::Batch;
use crate::consts::*;
use crate::netlink::{self, NlMsg, Received, Socket};
use crate::nla::{be_u32, be_u64, c_str, AttrIter};
use crate::Transaction;

/// The table holding the marking chain while a trace runs.
pub const TRACE_TABLE: &str = "nftpolicy-trace";
/// The marking chain: hook forward, before our filter chains.
pub const TRACE_CHAIN: &str = "trace-FORWARD";
pub const TRACE_PRIORITY: i32 = -300;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Subscribing to trace events, receiving them, or opening the socket
    /// that installs the trace rule.
    #[error(transparent)]
    Socket(#[from] netlink::Error),
    #[error("failed to change the trace table {TRACE_TABLE}")]
    Commit(#[source] crate::Error),
    #[error("invalid trace rule")]
    Encode(#[source] crate::encode::Error),
}

/// Which packets to trace: new connections from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceFilter {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    pub dst_port: Option<u16>,
}

impl TraceFilter {
    pub fn family(&self) -> TableFamily {
        if self.src.is_ipv6() {
            TableFamily::Ip6
        } else {
            TableFamily::Ip
        }
    }

    /// The marking rule's matches. `ct state new`: the first packet of a
    /// connection is the one policy decides; later ones only meet the
    /// "established" shortcut.
    fn rule(&self) -> Rule {
        let mut matches = vec![
            Match::CtState(CtStates::NEW),
            Match::L4Proto {
                proto: self.protocol,
                negate: false,
            },
            Match::Addr {
                dir: Dir::Src,
                target: AddrTarget::Net(self.src.into()),
                negate: false,
            },
            Match::Addr {
                dir: Dir::Dst,
                target: AddrTarget::Net(self.dst.into()),
                negate: false,
            },
        ];
        if let Some(p) = self.dst_port {
            matches.push(Match::Port {
                dir: Dir::Dst,
                target: PortTarget::Range { min: p, max: p },
                negate: false,
            });
        }
        Rule {
            matches,
            stmts: vec![],
            verdict: None,
            comment: Some("nftpolicy explain --kernel".into()),
        }
    }
}

/// What a trace event reports (`NFT_TRACETYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceKind {
    /// A rule matched (its verdict may be "continue").
    Rule,
    /// The packet fell off the end of a regular chain.
    Return,
    /// The packet fell off the end of a base chain: its policy applies.
    Policy,
    Other(u32),
}

/// One kernel trace event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// The same for every event of one packet's walk.
    pub id: u32,
    pub kind: TraceKind,
    pub family: u8,
    pub table: String,
    pub chain: String,
    pub rule_handle: Option<u64>,
    /// Verdict code (`NF_DROP` 0, `NF_ACCEPT` 1, `NFT_JUMP` -3, …).
    pub verdict: Option<i32>,
    /// Target chain of a jump or goto.
    pub verdict_chain: Option<String>,
    /// Base chain policy, for [`TraceKind::Policy`].
    pub policy: Option<u32>,
}

impl TraceEvent {
    /// `accept`/`drop` if this event ends the packet's walk through its
    /// table; `None` otherwise.
    pub fn final_verdict(&self) -> Option<&'static str> {
        let code = match self.kind {
            TraceKind::Policy => self.policy.map(|p| p as i32).or(self.verdict)?,
            TraceKind::Rule => self.verdict?,
            _ => return None,
        };
        match code {
            NF_ACCEPT => Some("accept"),
            NF_DROP => Some("drop"),
            _ => None,
        }
    }

    /// A short description of the verdict: `jump cali-FORWARD`, `drop`, …
    pub fn verdict_text(&self) -> String {
        let name = match self.verdict {
            None => return String::new(),
            Some(NF_ACCEPT) => "accept",
            Some(NF_DROP) => "drop",
            Some(NFT_CONTINUE) => "continue",
            Some(NFT_JUMP) => "jump",
            Some(NFT_GOTO) => "goto",
            Some(NFT_RETURN) => "return",
            Some(_) => "?",
        };
        match &self.verdict_chain {
            Some(c) => format!("{name} {c}"),
            None => name.to_owned(),
        }
    }
}

/// A running trace: the marking rule is installed and events are read
/// until [`TraceSession::stop`] (or drop) removes it.
#[derive(Debug)]
pub struct TraceSession {
    events: Socket,
    nft: Socket,
    family: TableFamily,
    installed: bool,
    /// Events read so far, by trace id, in order of arrival.
    by_id: BTreeMap<u32, Vec<TraceEvent>>,
    /// Trace ids in order of their first event.
    order: Vec<u32>,
}

impl TraceSession {
    /// Subscribes to trace events, then installs the marking rule (in this
    /// order, so that no event of a marked packet is missed).
    pub fn start(filter: TraceFilter) -> Result<TraceSession, TraceError> {
        let events = Socket::subscribe(NFNLGRP_NFTRACE)?;
        let nft = Socket::open()?;
        let mut s = TraceSession {
            events,
            nft,
            family: filter.family(),
            installed: false,
            by_id: BTreeMap::new(),
            order: Vec::new(),
        };
        let family = s.family;
        let mut b = Batch::new();
        // A table left by an interrupted session goes first: its rule
        // would trace other packets.
        crate::encode::destroy_table(&mut b, family, TRACE_TABLE);
        crate::encode::new_table(&mut b, family, TRACE_TABLE);
        crate::encode::new_chain(
            &mut b,
            family,
            TRACE_TABLE,
            &Chain {
                name: TRACE_CHAIN.into(),
                base: Some(BaseChain {
                    hook: Hook::Forward,
                    priority: TRACE_PRIORITY,
                    policy: ChainPolicy::Accept,
                }),
                rules: vec![].into(),
            },
        )
        .map_err(TraceError::Encode)?;
        crate::encode::new_rule(
            &mut b,
            family,
            TRACE_TABLE,
            TRACE_CHAIN,
            0,
            &filter.rule(),
            crate::encode::Place::End,
            true,
        )
        .map_err(TraceError::Encode)?;
        s.installed = true; // from here on, drop tries to remove it
        s.send(b)?;
        Ok(s)
    }

    fn send(&mut self, b: Batch) -> Result<(), TraceError> {
        crate::commit(&mut self.nft, &mut Transaction { batch: b }).map_err(TraceError::Commit)?;
        Ok(())
    }

    /// Removes the marking rule's table.
    pub fn stop(mut self) -> Result<(), TraceError> {
        self.remove()
    }

    fn remove(&mut self) -> Result<(), TraceError> {
        if !self.installed {
            return Ok(());
        }
        self.installed = false;
        let mut b = Batch::new();
        crate::encode::destroy_table(&mut b, self.family, TRACE_TABLE);
        self.send(b)
    }

    /// Waits up to `timeout` for events and returns those that arrived
    /// (possibly none).
    pub fn next_events(&mut self, timeout: Duration) -> Result<Vec<TraceEvent>, TraceError> {
        let mut out = Vec::new();
        if !self.events.wait_readable(timeout)? {
            return Ok(out);
        }
        loop {
            match self.events.receive()? {
                Received::Empty => break,
                // Overrun: events were lost; the walk of that packet is
                // incomplete, but later packets still trace.
                Received::Overrun => continue,
                Received::Datagram(n) => out.extend(
                    self.events
                        .messages(n)
                        .filter_map(Result::ok)
                        .filter_map(|m| decode_trace(&m)),
                ),
            }
        }
        Ok(out)
    }

    /// Reads events until one traced packet's walk through `tables` ends:
    /// dropped (in any table), or accepted in each of them. Returns
    /// that packet's events (all tables, in order); `None` if none did
    /// within `timeout`. A packet walks the hook's base chains of every
    /// table in turn, so with several tables of ours (namespace groups) an
    /// accept in the first is not yet the packet's fate.
    pub fn wait_for_packet(
        &mut self,
        tables: &[String],
        timeout: Duration,
    ) -> Result<Option<Vec<TraceEvent>>, TraceError> {
        let deadline = Instant::now() + timeout;
        loop {
            for id in &self.order {
                let events = &self.by_id[id];
                let ended =
                    |e: &&TraceEvent| tables.contains(&e.table) && e.final_verdict().is_some();
                // A drop in any table (another's too) ends the packet.
                let dropped = events.iter().any(|e| e.final_verdict() == Some("drop"));
                let all_ended = !tables.is_empty()
                    && tables
                        .iter()
                        .all(|t| events.iter().filter(ended).any(|e| &e.table == t));
                if dropped || all_ended {
                    return Ok(Some(events.clone()));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            for e in self.next_events(left)? {
                if !self.by_id.contains_key(&e.id) {
                    self.order.push(e.id);
                }
                self.by_id.entry(e.id).or_default().push(e);
            }
        }
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "failed to remove the trace table {TRACE_TABLE}");
        }
    }
}

/// One `NFT_MSG_TRACE` message; `None` for other messages and without an
/// id or type.
fn decode_trace(msg: &NlMsg<'_>) -> Option<TraceEvent> {
    if msg.msg_type != msg_type(NFT_MSG_TRACE) {
        return None;
    }
    let (family, attrs) = msg.nfgen()?;
    let mut e = TraceEvent {
        id: 0,
        kind: TraceKind::Other(0),
        family,
        table: String::new(),
        chain: String::new(),
        rule_handle: None,
        verdict: None,
        verdict_chain: None,
        policy: None,
    };
    let (mut id, mut kind) = (None, None);
    for (t, v) in AttrIter::new(attrs) {
        match t {
            NFTA_TRACE_TABLE => e.table = c_str(v),
            NFTA_TRACE_CHAIN => e.chain = c_str(v),
            NFTA_TRACE_RULE_HANDLE => e.rule_handle = be_u64(v),
            NFTA_TRACE_TYPE => kind = be_u32(v),
            NFTA_TRACE_ID => id = be_u32(v),
            NFTA_TRACE_POLICY => e.policy = be_u32(v),
            NFTA_TRACE_VERDICT => {
                for (vt, vv) in AttrIter::new(v) {
                    match vt {
                        NFTA_VERDICT_CODE => e.verdict = be_u32(vv).map(|c| c as i32),
                        NFTA_VERDICT_CHAIN => e.verdict_chain = Some(c_str(vv)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    e.id = id?;
    e.kind = match kind? {
        NFT_TRACETYPE_POLICY => TraceKind::Policy,
        NFT_TRACETYPE_RETURN => TraceKind::Return,
        NFT_TRACETYPE_RULE => TraceKind::Rule,
        k => TraceKind::Other(k),
    };
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nla::Writer;

    /// Installing and removing really change the kernel (a batch the kernel
    /// silently ignores, one without BATCH_END say, would pass unnoticed
    /// everywhere but in a real trace).
    #[test]
    fn a_session_installs_its_table_and_removes_it() {
        let _ns = testkit::netns::Netns::enter("trace-table").expect("a test netns (needs root)");
        let filter = TraceFilter {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            protocol: 6,
            dst_port: Some(80),
        };
        let mut p = crate::NftProgrammer::new().unwrap();
        let session = TraceSession::start(filter).unwrap();
        let table = p.read_back(TableFamily::Ip, TRACE_TABLE).unwrap();
        let chain = &table.expect("the trace table is installed").chains[TRACE_CHAIN];
        assert_eq!(chain.rules.len(), 1, "{chain:?}");
        session.stop().unwrap();
        assert_eq!(p.read_back(TableFamily::Ip, TRACE_TABLE).unwrap(), None);
    }

    #[test]
    fn decodes_a_rule_event_with_a_jump() {
        let mut w = Writer::default();
        let m = w.begin_msg(msg_type(NFT_MSG_TRACE), 0, 2, 0);
        w.put_str(NFTA_TRACE_TABLE, "nftpolicy");
        w.put_str(NFTA_TRACE_CHAIN, "filter-FORWARD");
        w.put_u64_be(NFTA_TRACE_RULE_HANDLE, 7);
        w.put_u32_be(NFTA_TRACE_TYPE, NFT_TRACETYPE_RULE);
        let v = w.nest_start(NFTA_TRACE_VERDICT);
        w.put_u32_be(NFTA_VERDICT_CODE, NFT_JUMP as u32);
        w.put_str(NFTA_VERDICT_CHAIN, "cali-FORWARD");
        w.nest_end(v);
        w.put_u32_be(NFTA_TRACE_ID, 0xdead);
        w.end_msg(m);
        let events: Vec<TraceEvent> = netlink::NlMsgIter::new(&w.buf)
            .filter_map(|m| decode_trace(&m.unwrap()))
            .collect();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.id, e.kind, e.family), (0xdead, TraceKind::Rule, 2));
        assert_eq!(e.chain, "filter-FORWARD");
        assert_eq!(e.rule_handle, Some(7));
        assert_eq!(e.verdict_text(), "jump cali-FORWARD");
        assert_eq!(e.final_verdict(), None);
    }
}
