//! A batch under construction: the encoded bytes plus, per message, what
//! kind it is and which object it concerns (so a kernel error, which names
//! only a sequence number, can be mapped back to a chain, set or rule).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use compiler::nft::TableFamily;

use crate::consts::*;
use crate::nla::Writer;

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

#[derive(Debug, Clone)]
pub struct MsgMeta {
    pub offset: usize,
    pub kind: &'static str,
    pub subject: Subject,
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
            subject: Subject::Batch,
        });
        b
    }

    /// Starts an nf_tables message; attributes follow via `self.w`.
    pub fn begin(&mut self, t: u8, flags: u16, family: TableFamily, subject: Subject) {
        debug_assert!(self.open.is_none(), "message left open");
        let off = self
            .w
            .begin_msg(msg_type(t), NLM_F_REQUEST | flags, family.nfproto(), 0);
        self.msgs.push(MsgMeta {
            offset: off,
            kind: msg_kind(t),
            subject,
        });
        self.open = Some(off);
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
            subject: Subject::Batch,
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
            if msg.subject != Subject::Batch {
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
