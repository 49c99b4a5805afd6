//! A batch under construction: the encoded bytes plus, per message, its
//! offset and kind. A kernel error names only a sequence number; the
//! object it concerns (chain, set, rule) is read back from that message's
//! own bytes ([`Batch::subject`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use compiler::nft::TableFamily;

use crate::consts::*;
use crate::decode::udata_comment;
use crate::nla::{c_str, AttrIter, Writer, NLMSG_HDRLEN};

/// The object a message concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Batch,
    Table {
        family: TableFamily,
        table: String,
    },
    Chain {
        family: TableFamily,
        table: String,
        chain: String,
    },
    Rule {
        family: TableFamily,
        table: String,
        chain: String,
        /// Position of the rule in its chain (0-based).
        index: usize,
        comment: Option<String>,
    },
    Set {
        family: TableFamily,
        table: String,
        set: String,
    },
    Elements {
        family: TableFamily,
        table: String,
        set: String,
    },
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Batch => write!(f, "the batch framing"),
            Subject::Table { family, table } => write!(f, "table {} {table}", family.keyword()),
            Subject::Chain {
                family,
                table,
                chain,
            } => {
                write!(f, "chain {} {table} {chain}", family.keyword())
            }
            Subject::Rule {
                family,
                table,
                chain,
                index,
                comment,
            } => {
                write!(
                    f,
                    "rule #{index} of chain {} {table} {chain}",
                    family.keyword()
                )?;
                if let Some(c) = comment {
                    write!(f, " (comment {c:?})")?;
                }
                Ok(())
            }
            Subject::Set { family, table, set } => {
                write!(f, "set {} {table} {set}", family.keyword())
            }
            Subject::Elements { family, table, set } => {
                write!(f, "elements of set {} {table} {set}", family.keyword())
            }
        }
    }
}

/// What the batch keeps of each message besides its bytes. The object a
/// message concerns is not kept: the message names it (table, chain or
/// set attributes, a rule's comment), so [`Batch::subject`] reads it back
/// from the bytes when an error or a test asks. A cold transaction has
/// 25,000+ messages at 10,000 policies; a `Subject` with its strings per
/// message cost about 5 MiB of the agent's peak memory.
#[derive(Debug, Clone)]
pub struct MsgMeta {
    pub offset: usize,
    pub kind: &'static str,
    /// A `NEWRULE`'s position in its chain (0-based); the bytes do not say.
    pub(crate) rule_index: u32,
}

impl MsgMeta {
    /// `BATCH_BEGIN` or `BATCH_END`.
    pub fn is_framing(&self) -> bool {
        self.kind.starts_with("BATCH_")
    }
}

/// `NFTA_SET_ID`s of the sets created in a batch, per family and table
/// (the groups' tables have sets of the same names).
pub type SetIds = HashMap<TableFamily, HashMap<String, HashMap<String, u32>>>;

/// An encoded transaction: `BATCH_BEGIN`, the messages, `BATCH_END`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub w: Writer,
    pub msgs: Vec<MsgMeta>,
    /// `NFTA_SET_ID`s of sets created in this batch, per family: rules and
    /// element messages that refer to them carry the id as nft does.
    set_ids: SetIds,
    next_set_id: u32,
    /// Ids given out by `reserve_set_ids` (per family, table and set),
    /// not yet used by a `NEWSET`.
    reserved: HashMap<(TableFamily, String, String), u32>,
    open: Option<usize>,
    finished: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let mut b = Batch {
            w: Writer::with_capacity(4096),
            msgs: Vec::new(),
            set_ids: HashMap::new(),
            next_set_id: 1,
            reserved: HashMap::new(),
            open: None,
            finished: false,
        };
        let off =
            b.w.begin_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.w.end_msg(off);
        b.msgs.push(MsgMeta {
            offset: off,
            kind: "BATCH_BEGIN",
            rule_index: 0,
        });
        b
    }

    /// Starts an nf_tables message; attributes follow via `self.w`, the
    /// first of them naming the object (see [`subject`](Self::subject)).
    pub fn begin(&mut self, t: u8, flags: u16, family: TableFamily) {
        self.begin_rule(t, flags, family, 0);
    }

    /// [`begin`](Self::begin) for a `NEWRULE`, the rule #`index` of its
    /// chain.
    pub fn begin_rule(&mut self, t: u8, flags: u16, family: TableFamily, index: usize) {
        debug_assert!(self.open.is_none(), "message left open");
        let off = self
            .w
            .begin_msg(msg_type(t), NLM_F_REQUEST | flags, family.nfproto(), 0);
        self.msgs.push(MsgMeta {
            offset: off,
            kind: msg_kind(t),
            rule_index: u32::try_from(index).unwrap_or(u32::MAX),
        });
        self.open = Some(off);
    }

    /// The object message `index` concerns, read from its attributes.
    pub fn subject(&self, index: usize) -> Subject {
        let meta = &self.msgs[index];
        let msg = self.message_bytes(index);
        if meta.is_framing() || msg.len() < NLMSG_HDRLEN + 4 {
            return Subject::Batch;
        }
        let t = (u16::from_ne_bytes([msg[4], msg[5]]) & 0xff) as u8;
        let family = if msg[NLMSG_HDRLEN] == NFPROTO_IPV6 {
            TableFamily::Ip6
        } else {
            TableFamily::Ip
        };
        // Every object-naming attribute we send: 1 is the table in each
        // kind of message; the object's own name is 2 (rule: its chain;
        // set; element list: its set) or 3 (chain).
        let (mut table, mut second, mut third, mut comment) = (None, None, None, None);
        for (k, v) in AttrIter::new(&msg[NLMSG_HDRLEN + 4..]) {
            match k {
                1 => table = Some(c_str(v)),
                2 => second = Some(v),
                3 => third = Some(v),
                NFTA_RULE_USERDATA if t == NFT_MSG_NEWRULE => {
                    comment = udata_comment(v, NFTNL_UDATA_RULE_COMMENT)
                }
                _ => {}
            }
        }
        let table = table.unwrap_or_default();
        let name = |v: Option<&[u8]>| v.map(c_str).unwrap_or_default();
        match t {
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => Subject::Chain {
                family,
                table,
                chain: name(third),
            },
            NFT_MSG_NEWRULE => Subject::Rule {
                family,
                table,
                chain: name(second),
                index: meta.rule_index as usize,
                comment,
            },
            // A rule deleted by handle, or a chain flushed: the chain.
            NFT_MSG_DELRULE => Subject::Chain {
                family,
                table,
                chain: name(second),
            },
            NFT_MSG_NEWSET | NFT_MSG_DELSET => Subject::Set {
                family,
                table,
                set: name(second),
            },
            NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM => Subject::Elements {
                family,
                table,
                set: name(second),
            },
            _ => Subject::Table { family, table },
        }
    }

    pub fn end(&mut self) {
        if let Some(off) = self.open.take() {
            self.w.end_msg(off);
        }
    }

    /// Drops the message being written (used when a chunk turns out empty).
    pub fn abandon(&mut self) {
        if let Some(off) = self.open.take() {
            self.w.truncate(off);
            self.msgs.pop();
        }
    }

    pub fn alloc_set_id(&mut self, family: TableFamily, table: &str, set: &str) -> u32 {
        let id = match self
            .reserved
            .remove(&(family, table.to_owned(), set.to_owned()))
        {
            Some(id) => id,
            None => {
                self.next_set_id += 1;
                self.next_set_id - 1
            }
        };
        self.set_ids
            .entry(family)
            .or_default()
            .entry(table.to_owned())
            .or_default()
            .insert(set.to_owned(), id);
        id
    }

    /// Numbers the sets `names` (to be created in this batch, in any
    /// order) in the order given, as nft would number them created in that
    /// order: a table's sets are created most used first (see
    /// `plan::by_references`), their ids stay in name order.
    pub fn reserve_set_ids<'a>(
        &mut self,
        family: TableFamily,
        table: &str,
        names: impl Iterator<Item = &'a str>,
    ) {
        for name in names {
            self.reserved.insert(
                (family, table.to_owned(), name.to_owned()),
                self.next_set_id,
            );
            self.next_set_id += 1;
        }
    }

    /// The writer and the set ids at once (to write a rule whose lookups
    /// name sets of this batch).
    pub fn writer_and_set_ids(&mut self) -> (&mut Writer, &SetIds) {
        (&mut self.w, &self.set_ids)
    }

    pub fn set_id(&self, family: TableFamily, table: &str, set: &str) -> Option<u32> {
        self.set_ids.get(&family)?.get(table)?.get(set).copied()
    }

    /// Appends `BATCH_END`. Idempotent.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.end();
        let off = self
            .w
            .begin_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.w.end_msg(off);
        self.msgs.push(MsgMeta {
            offset: off,
            kind: "BATCH_END",
            rule_index: 0,
        });
        self.finished = true;
    }

    /// nf_tables messages between the framing.
    pub fn message_count(&self) -> usize {
        self.msgs
            .len()
            .saturating_sub(if self.finished { 2 } else { 1 })
    }

    pub fn kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for msg in &self.msgs {
            if !msg.is_framing() {
                *m.entry(msg.kind).or_insert(0) += 1;
            }
        }
        m
    }

    pub fn offsets(&self) -> Vec<usize> {
        self.msgs.iter().map(|m| m.offset).collect()
    }

    /// The bytes of message `index` (for error reporting).
    pub fn message_bytes(&self, index: usize) -> &[u8] {
        let start = self.msgs[index].offset;
        let end = self
            .msgs
            .get(index + 1)
            .map(|m| m.offset)
            .unwrap_or(self.w.len());
        &self.w.buf[start..end]
    }
}
