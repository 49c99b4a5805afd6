//! The last resort when diffs keep failing: replace our tables whole, in
//! one atomic transaction, whatever the kernel holds now.
//!
//! A diff is computed against what we believe the kernel holds; if someone
//! changed our tables in a way read-back cannot express, or a kernel quirk
//! makes the same diff fail every time, re-reading does not help. A
//! rebuild does not depend on the kernel's current contents: it destroys
//! every table of ours the kernel lists (`NFT_MSG_DESTROYTABLE`, no error
//! when one is gone meanwhile) and creates the desired ruleset from
//! scratch, in the same batch — so either the new ruleset is in force or, if the kernel rejects
//! anything, the old one still is. Chains are re-created, so rule counters
//! restart from zero.

use std::collections::BTreeMap;
use std::time::Instant;

use compiler::nft::Ruleset;
use tracing::info;

use crate::batch::{Batch, MsgMeta};
use crate::{committed_form, plan};
use crate::{ApplyReport, Error, NftProgrammer, Transaction};

impl NftProgrammer {
    /// Makes the kernel hold `desired` by destroying our tables and
    /// creating `desired` whole, in ONE atomic transaction (see the module
    /// docs). On success the committed state is `desired`; on
    /// [`Error::Transaction`] nothing changed in the kernel.
    pub fn rebuild(&mut self, desired: &Ruleset) -> Result<ApplyReport, Error> {
        let t0 = Instant::now();
        let create = plan::plan(&BTreeMap::new(), desired)?;
        let mut destroy = Batch::new();
        self.destroy_ours(&mut destroy)?;
        let mut tx = Transaction {
            batch: then(destroy, &create.batch),
        };
        let report = ApplyReport::planned(&tx, t0);
        let report = self.send_transaction(&mut tx, report, |committed| {
            *committed = committed_form(desired);
        })?;
        info!(
            messages = report.messages,
            bytes = report.bytes,
            "rebuilt our tables from scratch"
        );
        Ok(report)
    }
}

/// `b` (unfinished), then `create`'s messages (without its framing)
/// unchanged: their set ids and bytes do not depend on where in the batch
/// they sit.
fn then(mut b: Batch, create: &Batch) -> Batch {
    let msgs = &create.msgs;
    // msgs[0] is BATCH_BEGIN and the last one BATCH_END.
    if msgs.len() > 2 {
        let start = msgs[1].offset;
        let end = msgs[msgs.len() - 1].offset;
        let base = b.w.buf.len();
        b.w.buf.extend_from_slice(&create.w.buf[start..end]);
        for m in &msgs[1..msgs.len() - 1] {
            b.msgs.push(MsgMeta {
                offset: m.offset - start + base,
                ..m.clone()
            });
        }
    }
    b.finish();
    b
}
