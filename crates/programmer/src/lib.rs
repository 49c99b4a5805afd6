//! Programs nftpolicy's nftables objects (`compiler::nft`) into the kernel
//! over `NETLINK_NETFILTER`, without libnftnl or the `nft` binary.
//!
//! * [`NftProgrammer::apply`] turns the desired ruleset into ONE atomic
//!   nf_tables transaction holding only the difference against the last
//!   committed state (see `plan.rs` for the order of operations).
//! * [`NftProgrammer::read_back`] decodes tables from the kernel into the
//!   same IR, so that `read_back == desired` after an apply.
//! * Only our tables in the `ip` and `ip6` families are ever written:
//!   [`compiler::nft::TABLE_NAME`], or with namespace groups one table per
//!   group, `nftpolicy-g<N>` ([`compiler::nft::is_our_table`]). A table of
//!   ours that the desired ruleset lacks (left by another group count) is
//!   deleted. The rest of the ruleset (kube-proxy's tables, say) is never
//!   touched, and the ruleset is never flushed.
//!
//! Canonical IR forms (what read-back produces, so what the compiler should
//! emit for `read_back == desired` to hold):
//! * `Match::Icmp` is preceded by `Match::L4Proto { proto: icmp/icmpv6 }`
//!   (as `Match::Port` is by a port protocol); without it the encoder adds
//!   the dependency nft would add, and read-back shows it.
//! * `Stmt::SetMark { clear, set }` has `clear & set == 0` (`meta mark set
//!   0x42` reads back as `{ clear: !0x42, set: 0x42 }`).
//! * Set elements are sorted (`SetElement`'s `Ord`) without duplicates,
//!   addresses have no host bits set, and each element is its own interval
//!   (adjacent elements are kept apart, not merged). The programmer keeps
//!   its committed state in this form, so an unsorted desired set is not
//!   mistaken for drift.
//!
//! A kernel rule that is not one of our encodings reads back as a marker
//! rule whose only content is a comment starting with
//! [`FOREIGN_RULE_PREFIX`]; it never equals a compiled rule, so the next
//! apply rewrites its chain. Likewise [`FOREIGN_SET_PREFIX`] for sets.

mod batch;
mod consts;
mod decode;
mod elements;
mod encode;
mod expr;
pub mod monitor;
mod netlink;
pub mod nflog;
mod nla;
mod plan;
mod readback;
mod rebuild;
pub mod trace;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use compiler::nft::{Elements, Ruleset, Table, TableFamily};
use tracing::{debug, info, warn};

pub use batch::Subject;
pub use decode::{FOREIGN_RULE_PREFIX, FOREIGN_SET_PREFIX};
pub use plan::Transaction;

/// Errors of the programmer's operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open the netfilter netlink socket")]
    Open(#[source] netlink::Error),
    #[error("invalid desired ruleset")]
    Plan(#[from] plan::Error),
    #[error("failed to send the transaction to the kernel")]
    Send(#[source] netlink::Error),
    /// The kernel rejected the transaction; nothing of it was applied and
    /// the previous ruleset is still in force.
    #[error("the kernel rejected the transaction at {object} ({kind}): {}{}",
        netlink::errno_text(*.errno, .message.as_deref()),
        if *.other_errors > 0 { format!(" (and {} more errors)", .other_errors) } else { String::new() })]
    Transaction {
        /// The object the failing message concerned, e.g. `rule #2 of chain
        /// ip nftpolicy c1 (comment "…")` or `elements of set ip nftpolicy
        /// s (element 198.18.0.0/16…)`.
        object: String,
        /// The failing message's kind, e.g. `"NEWRULE"`.
        kind: &'static str,
        /// Positive errno.
        errno: i32,
        /// The kernel's extended-ACK message, if any.
        message: Option<String>,
        /// How many other messages also failed.
        other_errors: usize,
    },
    /// Replies were lost: the transaction may or may not have committed.
    /// The programmer forgets its last committed state; the next `apply`
    /// re-reads the kernel first (or call [`NftProgrammer::adopt`]).
    #[error("the outcome of the transaction is unknown (kernel replies were lost); re-read the kernel state")]
    StateUnknown,
    /// An element delta names something we have not committed; apply the
    /// full ruleset instead.
    #[error("cannot apply set element changes: {object} is not in the committed state; apply the full ruleset")]
    NotCommitted { object: String },
    #[error("failed to read {family} table {table} back from the kernel")]
    ReadBack {
        family: &'static str,
        table: String,
        #[source]
        source: readback::Error,
    },
    #[error("failed to list the {family} tables")]
    ListTables {
        family: &'static str,
        #[source]
        source: readback::Error,
    },
    #[error("failed to read the ruleset generation")]
    Generation(#[source] readback::Error),
    #[error("failed to read the counters of chain {family} {table} {chain}")]
    ReadCounters {
        family: &'static str,
        table: String,
        chain: String,
        #[source]
        source: readback::Error,
    },
}

/// What one apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// nf_tables messages sent (without the batch framing); 0 when nothing
    /// changed and nothing was sent.
    pub messages: usize,
    /// Bytes of the batch.
    pub bytes: usize,
    /// Messages per kind, e.g. `"NEWSETELEM" → 3`.
    pub kinds: BTreeMap<&'static str, usize>,
    /// Time spent diffing and encoding.
    pub encode_time: Duration,
    /// Time from sendmsg to the last reply (the kernel's commit).
    pub kernel_time: Duration,
}

impl ApplyReport {
    /// The report of `tx`, planned and encoded since `started`, not yet sent.
    pub(crate) fn planned(tx: &Transaction, started: Instant) -> ApplyReport {
        ApplyReport {
            messages: tx.messages(),
            bytes: tx.bytes(),
            kinds: tx.kinds(),
            encode_time: started.elapsed(),
            kernel_time: Duration::ZERO,
        }
    }
}

/// One rule's counter, from [`NftProgrammer::read_counters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    /// Position of the rule in its chain.
    pub index: usize,
    /// The kernel's rule handle.
    pub handle: u64,
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// One of our tables: its family and name.
pub type TableKey = (TableFamily, String);

/// Our tables by family and name.
pub(crate) type Tables = BTreeMap<TableKey, Table>;

/// The key of table `t`.
pub(crate) fn key_of(t: &Table) -> TableKey {
    (t.family, t.name.clone())
}

/// Owns the netlink socket and the last committed state of our tables.
#[derive(Debug)]
pub struct NftProgrammer {
    sock: netlink::Socket,
    /// Our tables as last committed; `None` = unknown (not read yet, or a
    /// reply was lost), so the next apply reads the kernel first.
    committed: Option<Tables>,
    /// Ruleset generation right after our last commit or read, if nobody
    /// else committed in between; lets `has_drift` skip the read.
    committed_gen: Option<u32>,
}

impl NftProgrammer {
    /// Opens the socket in the current thread's network namespace. Nothing
    /// is read yet: the first [`apply`](Self::apply) adopts what is in the
    /// kernel (or call [`adopt`](Self::adopt) explicitly).
    pub fn new() -> Result<Self, Error> {
        Ok(NftProgrammer {
            sock: netlink::Socket::open().map_err(Error::Open)?,
            committed: None,
            committed_gen: None,
        })
    }

    /// Reads a table (chains, rules, sets, maps, elements) from the kernel
    /// and decodes it into the IR; `None` if it does not exist.
    pub fn read_back(
        &mut self,
        family: TableFamily,
        table_name: &str,
    ) -> Result<Option<Table>, Error> {
        readback::read_table(&mut self.sock, family, table_name).map_err(|source| Error::ReadBack {
            family: family.keyword(),
            table: table_name.to_owned(),
            source,
        })
    }

    /// Reads our tables back and takes them as the last committed state
    /// (at start-up, or after [`Error::StateUnknown`]).
    pub fn adopt(&mut self) -> Result<(), Error> {
        let (tables, gen) = self.read_ours()?;
        info!(
            tables = tables.len(),
            "adopted the kernel's nftpolicy tables"
        );
        self.committed = Some(tables);
        self.committed_gen = Some(gen);
        Ok(())
    }

    /// Our tables and the generation they were read at (consistent: the
    /// generation did not move during the read).
    fn read_ours(&mut self) -> Result<(Tables, u32), Error> {
        for _ in 0..5 {
            let gen = self.generation()?;
            let mut tables = BTreeMap::new();
            for family in [TableFamily::Ip, TableFamily::Ip6] {
                for name in self.our_table_names(family)? {
                    if let Some(t) = self.read_back(family, &name)? {
                        tables.insert((family, name), t);
                    }
                }
            }
            if self.generation()? == gen {
                return Ok((tables, gen));
            }
        }
        Err(Error::Generation(readback::Error::Unstable { attempts: 5 }))
    }

    /// The names of our tables the kernel holds in `family`.
    pub fn our_table_names(&mut self, family: TableFamily) -> Result<Vec<String>, Error> {
        readback::our_table_names(&mut self.sock, family).map_err(|source| Error::ListTables {
            family: family.keyword(),
            source,
        })
    }

    fn generation(&mut self) -> Result<u32, Error> {
        readback::gen_id(&mut self.sock).map_err(Error::Generation)
    }

    /// The transaction [`apply`](Self::apply) would send for `desired`,
    /// against the last committed state (empty if nothing was adopted yet).
    pub fn plan(&self, desired: &Ruleset) -> Result<Transaction, Error> {
        let empty = BTreeMap::new();
        Ok(plan::plan(
            self.committed.as_ref().unwrap_or(&empty),
            desired,
        )?)
    }

    /// Makes the kernel hold `desired` (our tables only) in ONE atomic
    /// transaction carrying the difference against the last committed
    /// state. On error nothing changed, in the kernel or here (except for
    /// [`Error::StateUnknown`]).
    ///
    /// A diff is only as good as the committed state: if someone changed
    /// our tables behind our back (deleted an element we now delete, say),
    /// the kernel rejects the transaction every time. After an
    /// [`Error::Transaction`], check [`has_drift`](Self::has_drift) and
    /// [`adopt`](Self::adopt) before retrying.
    pub fn apply(&mut self, desired: &Ruleset) -> Result<ApplyReport, Error> {
        let (mut tx, report) = self.planned(desired)?;
        if tx.is_empty() {
            return Ok(report);
        }
        self.send_transaction(&mut tx, report, |committed| {
            *committed = committed_form(desired);
        })
    }

    /// [`apply`](Self::apply), keeping `desired` itself as the committed
    /// state instead of a copy: for a caller that builds a ruleset only to
    /// apply it (the table groups' cut), so that two copies of it never
    /// exist at once.
    pub fn apply_owned(&mut self, desired: Ruleset) -> Result<ApplyReport, Error> {
        let (mut tx, report) = self.planned(&desired)?;
        if tx.is_empty() {
            return Ok(report);
        }
        self.send_transaction(&mut tx, report, move |committed| {
            *committed = into_committed_form(desired);
        })
    }

    /// The transaction for `desired` against the committed state (read
    /// from the kernel first if unknown), and its report so far.
    fn planned(&mut self, desired: &Ruleset) -> Result<(Transaction, ApplyReport), Error> {
        if self.committed.is_none() {
            self.adopt()?;
        }
        let t0 = Instant::now();
        let tx = self.plan(desired)?;
        let report = ApplyReport::planned(&tx, t0);
        if tx.is_empty() {
            debug!("desired ruleset equals the committed one; nothing to send");
        }
        Ok((tx, report))
    }

    /// Deletes our tables (both families, every group's) and nothing else
    /// — for switching to another backend. Tables that do not exist are
    /// not an error.
    pub fn remove_all(&mut self) -> Result<(), Error> {
        let t0 = Instant::now();
        let mut b = batch::Batch::new();
        self.destroy_ours(&mut b)?;
        b.finish();
        let mut tx = Transaction { batch: b };
        let report = ApplyReport::planned(&tx, t0);
        self.send_transaction(&mut tx, report, |committed| committed.clear())?;
        Ok(())
    }

    /// Whether the kernel's copy of our tables differs from the last
    /// committed state. Cheap when nothing was committed since our last
    /// look: one `NFT_MSG_GETGEN`; otherwise a read-back of our tables.
    pub fn has_drift(&mut self) -> Result<bool, Error> {
        if self.committed.is_none() {
            return Ok(true);
        }
        let gen = self.generation()?;
        if self.committed_gen == Some(gen) {
            return Ok(false);
        }
        let (tables, gen) = self.read_ours()?;
        let drift = self.committed.as_ref() != Some(&tables);
        if !drift {
            // Someone else committed (another table, say): remember this
            // generation so the next check is cheap again.
            self.committed_gen = Some(gen);
        }
        debug!(
            drift,
            "compared the kernel's tables with the committed state"
        );
        Ok(drift)
    }

    /// The netlink port id of the programmer's socket. nf_tables
    /// notifications of our own commits carry it, so a
    /// [`crate::monitor::Monitor`] can tell them from foreign changes.
    pub fn port_id(&self) -> Result<u32, Error> {
        self.sock.port_id().map_err(Error::Open)
    }

    /// Adds to `b` the destruction of every table of ours the kernel holds
    /// now, and of [`TABLE_NAME`](compiler::nft::TABLE_NAME) in both
    /// families in any case.
    pub(crate) fn destroy_ours(&mut self, b: &mut batch::Batch) -> Result<(), Error> {
        for family in [TableFamily::Ip, TableFamily::Ip6] {
            let mut names = self.our_table_names(family)?;
            if !names.iter().any(|n| n == compiler::nft::TABLE_NAME) {
                names.insert(0, compiler::nft::TABLE_NAME.to_owned());
            }
            for name in names {
                encode::destroy_table(b, family, &name);
            }
        }
        Ok(())
    }

    /// Our tables as last committed, or [`Error::NotCommitted`].
    fn committed_tables(&self) -> Result<&Tables, Error> {
        self.committed.as_ref().ok_or_else(nothing_committed)
    }

    /// Finishes `b` (encoded since `started`) and sends it, unless it is
    /// empty; see [`send_transaction`](Self::send_transaction).
    fn send_unless_empty(
        &mut self,
        mut b: batch::Batch,
        started: Instant,
        commit: impl FnOnce(&mut Tables),
    ) -> Result<ApplyReport, Error> {
        b.finish();
        let mut tx = Transaction { batch: b };
        let report = ApplyReport::planned(&tx, started);
        if tx.is_empty() {
            return Ok(report);
        }
        self.send_transaction(&mut tx, report, commit)
    }

    /// Sends `tx`; on commit lets `commit` update the committed state and
    /// remembers the generation (trusted only if ours was the only commit
    /// since we looked). On [`Error::Transaction`] nothing changed; on
    /// [`Error::StateUnknown`] the committed state is forgotten.
    pub(crate) fn send_transaction(
        &mut self,
        tx: &mut Transaction,
        mut report: ApplyReport,
        commit: impl FnOnce(&mut Tables),
    ) -> Result<ApplyReport, Error> {
        let gen_before = self.generation()?;
        let t1 = Instant::now();
        let outcome = crate::commit(&mut self.sock, tx);
        report.kernel_time = t1.elapsed();
        match outcome {
            Ok(acked) => {
                debug!(
                    messages = report.messages,
                    bytes = report.bytes,
                    acked,
                    ?report.kinds,
                    "transaction committed"
                );
                commit(self.committed.get_or_insert_with(Default::default));
                let gen_after = self.generation()?;
                self.committed_gen = (gen_after == gen_before.wrapping_add(1)).then_some(gen_after);
                Ok(report)
            }
            Err(e) => {
                if matches!(e, Error::StateUnknown) {
                    self.committed = None;
                    self.committed_gen = None;
                }
                Err(e)
            }
        }
    }

    /// How many different element lists the committed copies of set `set`
    /// in `family` (one per table of ours that has it) hold: 1 when every
    /// group's copy shares one list (`compiler::nft::Shared`).
    pub fn distinct_element_lists(&self, family: TableFamily, set: &str) -> usize {
        let mut lists: Vec<&Elements> = Vec::new();
        for ((f, _), t) in self.committed.iter().flatten() {
            if let Some(s) = t.sets.get(set).filter(|_| *f == family) {
                if !lists.iter().any(|l| l.shares(&s.elements)) {
                    lists.push(&s.elements);
                }
            }
        }
        lists.len()
    }

    /// Counters of the rules of one chain of one of our tables, in rule
    /// order (rules without a counter report 0).
    pub fn read_counters(
        &mut self,
        family: TableFamily,
        table: &str,
        chain: &str,
    ) -> Result<Vec<RuleCounter>, Error> {
        let rules =
            readback::read_rules(&mut self.sock, family, table, Some(chain)).map_err(|source| {
                Error::ReadCounters {
                    family: family.keyword(),
                    table: table.to_owned(),
                    chain: chain.to_owned(),
                    source,
                }
            })?;
        Ok(rules
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let (packets, bytes) = r
                    .exprs
                    .iter()
                    .find_map(|e| match e {
                        expr::Expr::Counter { packets, bytes } => Some((*packets, *bytes)),
                        _ => None,
                    })
                    .unwrap_or((0, 0));
                RuleCounter {
                    index,
                    handle: r.handle,
                    comment: r.comment.clone(),
                    packets,
                    bytes,
                }
            })
            .collect())
    }
}

/// `desired`'s tables in read-back form, by key: the committed state after
/// it is applied.
pub(crate) fn committed_form(desired: &Ruleset) -> Tables {
    into_committed_form(desired.clone())
}

/// [`committed_form`], taking the ruleset.
fn into_committed_form(desired: Ruleset) -> Tables {
    desired
        .tables
        .into_iter()
        .map(|mut t| {
            canonicalize(&mut t);
            (key_of(&t), t)
        })
        .collect()
}

/// `t` in the form read-back produces: set elements sorted and without
/// duplicates, addresses without host bits.
pub fn canonical(t: &Table) -> Table {
    let mut t = t.clone();
    canonicalize(&mut t);
    t
}

/// [`canonical`] in place.
fn canonicalize(t: &mut Table) {
    for s in t.sets.values_mut() {
        canonical_set(s);
    }
}

/// One set in read-back form (see [`canonical`]). A list that already is
/// (the compiler's always are) is left alone, so that it stays shared with
/// the copies it came from (`compiler::nft::Elements`).
pub(crate) fn canonical_set(s: &mut compiler::nft::Set) {
    use compiler::nft::SetElement;
    let host_bits = |e: &SetElement| matches!(e, SetElement::Net(n) if *n != n.trunc());
    let canonical = s.elements.windows(2).all(|w| w[0] < w[1]) && !s.elements.iter().any(host_bits);
    if canonical {
        return;
    }
    let elements: &mut Vec<SetElement> = &mut s.elements;
    for e in elements.iter_mut() {
        if let SetElement::Net(n) = e {
            *n = n.trunc();
        }
    }
    elements.sort_unstable();
    elements.dedup();
}

/// Sends `tx` on `sock` as one atomic transaction: `Ok(acked)` when the
/// kernel committed it (`acked`: BATCH_END was acknowledged),
/// [`Error::Transaction`] naming the first failing object when it was
/// rolled back, [`Error::StateUnknown`] when replies were lost.
pub(crate) fn commit(sock: &mut netlink::Socket, tx: &mut Transaction) -> Result<bool, Error> {
    // BATCH_END: without it the kernel would process nothing of the batch
    // and report no error either.
    tx.batch.finish();
    let offsets = tx.batch.offsets();
    match sock
        .send_batch(&mut tx.batch.w.buf, &offsets)
        .map_err(Error::Send)?
    {
        netlink::BatchOutcome::Committed { acked } => Ok(acked),
        netlink::BatchOutcome::Rejected(errors) => {
            let first = &errors[0];
            let object = describe_failure(tx, first);
            let kind = tx
                .batch
                .msgs
                .get(first.index)
                .map(|m| m.kind)
                .unwrap_or("?");
            warn!(%object, errno = first.errno, message = ?first.message, "transaction rejected");
            Err(Error::Transaction {
                object,
                kind,
                errno: first.errno,
                message: first.message.clone(),
                other_errors: errors.len() - 1,
            })
        }
        netlink::BatchOutcome::Unknown { errors_seen } => {
            warn!(
                errors = errors_seen.len(),
                "transaction outcome unknown; forgetting committed state"
            );
            Err(Error::StateUnknown)
        }
    }
}

/// Names the object a failing message concerned; for element messages,
/// the element the kernel's extended-ACK offset points at.
fn describe_failure(tx: &Transaction, e: &netlink::MessageError) -> String {
    if e.index >= tx.batch.msgs.len() {
        return format!("message #{} of the batch", e.index);
    }
    let subject = tx.batch.subject(e.index);
    let mut s = subject.to_string();
    if let (Subject::Elements { .. }, Some(off)) = (&subject, e.attr_offset) {
        if let Some(el) = element_at(tx.batch.message_bytes(e.index), off as usize) {
            s.push_str(&format!(" (element {el})"));
        }
    }
    s
}

/// Renders the set element whose attribute starts at `off` in `msg`.
fn element_at(msg: &[u8], off: usize) -> Option<String> {
    use crate::consts::*;
    let attr = msg.get(off..)?;
    let (_, value) = nla::AttrIter::new(attr).next()?;
    let mut key = None;
    let mut end = false;
    for (k, v) in nla::AttrIter::new(value) {
        match k {
            NFTA_SET_ELEM_KEY => {
                key = nla::AttrIter::new(v)
                    .find(|(t, _)| *t == NFTA_DATA_VALUE)
                    .map(|(_, v)| v)
            }
            NFTA_SET_ELEM_FLAGS => {
                end = v
                    .get(..4)
                    .is_some_and(|f| f[3] & NFT_SET_ELEM_INTERVAL_END as u8 != 0)
            }
            _ => {}
        }
    }
    let key = key?;
    let text = match key.len() {
        4 => std::net::Ipv4Addr::new(key[0], key[1], key[2], key[3]).to_string(),
        16 if key.iter().rev().take_while(|&&b| b == 0).count() > 0
            && key[0].is_ascii_alphanumeric() =>
        {
            format!("{:?}", String::from_utf8_lossy(key).trim_end_matches('\0'))
        }
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(key).ok()?).to_string(),
        2 => u16::from_be_bytes([key[0], key[1]]).to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    };
    Some(if end {
        format!("{text} (interval end)")
    } else {
        text
    })
}

/// [`Error::NotCommitted`] for our tables as a whole.
fn nothing_committed() -> Error {
    Error::NotCommitted {
        object: "our tables (nothing committed or adopted yet)".into(),
    }
}
