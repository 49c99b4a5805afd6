//! Reading tables back from the kernel: GET requests and dumps, decoded
//! into the IR by `decode.rs`.

use compiler::nft::{Table, TableFamily};
use netlink_packet_netfilter::nftables::{NfTablesMessage, TableAttribute};
use tracing::debug;

use crate::consts::*;
use crate::decode::{self, IrSet, KElem, KRule};
use crate::netlink::{self, Socket};
use crate::nla::Writer;

/// How often a read is retried when the ruleset changes underneath it.
const READ_ATTEMPTS: usize = 5;

/// How often a set's elements are dumped again when a dump repeats one.
const ELEMENT_READ_ATTEMPTS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {op}")]
    Netlink {
        op: &'static str,
        #[source]
        source: netlink::Error,
    },
    #[error(transparent)]
    Decode(#[from] decode::Error),
    #[error("the ruleset changed during each of {attempts} attempts to read it")]
    Unstable { attempts: usize },
    #[error("set {set}: each of {attempts} dumps of its elements repeated some (the kernel kept resizing its hash table)")]
    ElementsUnstable { set: String, attempts: usize },
}

fn request(t: u8, flags: u16, family: u8, attrs: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer::with_capacity(128);
    let off = w.begin_msg(msg_type(t), flags, family, 0);
    attrs(&mut w);
    w.end_msg(off);
    w.buf
}

/// Sends a request built by [`request`] and collects its replies; `op`
/// names it in the error.
fn query(
    sock: &mut Socket,
    op: &'static str,
    (t, flags, family): (u8, u16, u8),
    attrs: impl FnOnce(&mut Writer),
) -> Result<Vec<netlink::Reply>, Error> {
    let mut msg = request(t, flags, family, attrs);
    sock.request(&mut msg)
        .map_err(|source| Error::Netlink { op, source })
}

fn parse_all(replies: &[netlink::Reply]) -> Result<Vec<NfTablesMessage>, Error> {
    replies
        .iter()
        .map(|r| decode::parse(r).map_err(Error::from))
        .collect()
}

/// `NFT_MSG_GETGEN`: the ruleset generation, bumped by every commit.
pub fn gen_id(sock: &mut Socket) -> Result<u32, Error> {
    let replies = query(
        sock,
        "read the ruleset generation",
        (NFT_MSG_GETGEN, 0, 0),
        |_| {},
    )?;
    for m in parse_all(&replies)? {
        if let Some(id) = decode::gen_id(&m) {
            return Ok(id);
        }
    }
    Err(Error::Decode(decode::Error::MissingAttribute {
        what: "generation",
        attr: "NFTA_GEN_ID",
    }))
}

/// The names of the family's tables that are ours
/// ([`compiler::nft::is_our_table`]), sorted.
pub fn our_table_names(sock: &mut Socket, family: TableFamily) -> Result<Vec<String>, Error> {
    let replies = query(
        sock,
        "list tables",
        (NFT_MSG_GETTABLE, NLM_F_DUMP, family.nfproto()),
        |_| {},
    )?;
    let mut names = Vec::new();
    for m in parse_all(&replies)? {
        if let NfTablesMessage::NewTable(t) = m {
            names.extend(t.attributes.iter().filter_map(|a| match a {
                TableAttribute::Name(n) if compiler::nft::is_our_table(n) => Some(n.clone()),
                _ => None,
            }));
        }
    }
    names.sort();
    Ok(names)
}

/// Reads one table; `None` if it does not exist. Retries while the
/// generation changes during the read, so the result is one consistent
/// snapshot.
pub fn read_table(
    sock: &mut Socket,
    family: TableFamily,
    name: &str,
) -> Result<Option<Table>, Error> {
    for attempt in 1..=READ_ATTEMPTS {
        let before = gen_id(sock)?;
        let table = match read_table_once(sock, family, name) {
            Err(Error::Netlink {
                source: netlink::Error::DumpInterrupted,
                ..
            }) => {
                debug!(attempt, "dump interrupted, re-reading");
                continue;
            }
            r => r?,
        };
        if gen_id(sock)? == before {
            return Ok(table);
        }
        debug!(attempt, "ruleset changed during read-back, re-reading");
    }
    Err(Error::Unstable {
        attempts: READ_ATTEMPTS,
    })
}

fn read_table_once(
    sock: &mut Socket,
    family: TableFamily,
    name: &str,
) -> Result<Option<Table>, Error> {
    let fam = family.nfproto();
    let mut msg = request(NFT_MSG_GETTABLE, 0, fam, |w| {
        w.put_str(NFTA_TABLE_NAME, name)
    });
    match sock.request(&mut msg) {
        Ok(_) => {}
        Err(netlink::Error::Request { errno, .. }) if errno == libc::ENOENT => return Ok(None),
        Err(source) => {
            return Err(Error::Netlink {
                op: "read a table",
                source,
            })
        }
    }
    let mut table = Table::new(family, name);

    let replies = query(
        sock,
        "dump chains",
        (NFT_MSG_GETCHAIN, NLM_F_DUMP, fam),
        |_| {},
    )?;
    for m in parse_all(&replies)? {
        if let NfTablesMessage::NewChain(c) = m {
            let k = decode::chain(&c)?;
            if k.table == name {
                table.chains.insert(k.name.clone(), decode::ir_chain(&k));
            }
        }
    }

    let replies = query(sock, "dump sets", (NFT_MSG_GETSET, NLM_F_DUMP, fam), |w| {
        w.put_str(NFTA_SET_TABLE, name)
    })?;
    let mut ksets = Vec::new();
    for m in parse_all(&replies)? {
        if let NfTablesMessage::NewSet(s) = m {
            let k = decode::set(&s)?;
            if k.table == name {
                ksets.push(k);
            }
        }
    }
    for k in &ksets {
        if decode::set_shape(family, k) == decode::SetShape::Anonymous {
            continue;
        }
        let elems = read_whole_elements(sock, fam, name, &k.name)?;
        match decode::ir_set(family, k, &elems) {
            Some(IrSet::Set(s)) => {
                table.sets.insert(s.name.clone(), s);
            }
            Some(IrSet::Map(m)) => {
                table.maps.insert(m.name.clone(), m);
            }
            None => {}
        }
    }

    // One rule dump per chain: the kernel resumes a table-wide rule dump by
    // re-walking the table's rules from the start for every 32 KiB reply,
    // which is quadratic (3.1 s for 110,000 rules), while a dump filtered
    // by chain finds the chain by hash. The generation check around the
    // whole read keeps the per-chain dumps one consistent snapshot.
    let names: Vec<String> = table.chains.keys().cloned().collect();
    for chain in names {
        let rules = read_rules(sock, family, name, Some(&chain))?;
        if let Some(c) = table.chains.get_mut(&chain) {
            c.rules
                .extend(rules.iter().map(|r| decode::ir_rule(family, r)));
        }
    }
    Ok(Some(table))
}

/// A set's elements, dumped again until no element repeats.
///
/// Why: the kernel resizes a hash set's table in the background after it
/// grows or shrinks, and a dump that spans several replies resumes by
/// counting elements already sent. Across a resize that count lands
/// elsewhere in the new order: the dump repeats some elements and skips as
/// many others (measured: 100,000 pod addresses read back right after they
/// were written came back as 100,000 elements, 86,000 of them distinct).
/// A dump always yields as many elements as the set holds, so one without
/// a repeat is complete. Interval sets (ordered trees) never repeat.
fn read_whole_elements(
    sock: &mut Socket,
    fam: u8,
    table: &str,
    set: &str,
) -> Result<Vec<KElem>, Error> {
    for attempt in 1..=ELEMENT_READ_ATTEMPTS {
        let elems = read_elements(sock, fam, table, set)?;
        let mut seen = std::collections::HashSet::with_capacity(elems.len());
        if elems
            .iter()
            .all(|e| seen.insert((&e.key, &e.key_end, e.flags)))
        {
            return Ok(elems);
        }
        debug!(
            attempt,
            set, "a set's element dump repeated elements, re-reading"
        );
        // The resize runs in a kernel worker; give it time to finish.
        std::thread::sleep(std::time::Duration::from_millis(5 * attempt));
    }
    Err(Error::ElementsUnstable {
        set: set.to_owned(),
        attempts: ELEMENT_READ_ATTEMPTS as usize,
    })
}

fn read_elements(sock: &mut Socket, fam: u8, table: &str, set: &str) -> Result<Vec<KElem>, Error> {
    let what = (NFT_MSG_GETSETELEM, NLM_F_DUMP, fam);
    let replies = query(sock, "dump set elements", what, |w| {
        w.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        w.put_str(NFTA_SET_ELEM_LIST_SET, set);
    })?;
    let mut out = Vec::new();
    for r in &replies {
        decode::elements(r, &mut out)?;
    }
    Ok(out)
}

/// The rules of a table (or of one chain), in chain order.
pub fn read_rules(
    sock: &mut Socket,
    family: TableFamily,
    table: &str,
    chain: Option<&str>,
) -> Result<Vec<KRule>, Error> {
    let what = (NFT_MSG_GETRULE, NLM_F_DUMP, family.nfproto());
    let replies = query(sock, "dump rules", what, |w| {
        w.put_str(NFTA_RULE_TABLE, table);
        if let Some(c) = chain {
            w.put_str(NFTA_RULE_CHAIN, c);
        }
    })?;
    let mut out = Vec::new();
    for r in &replies {
        let k = decode::rule(r)?;
        if k.table == table && chain.is_none_or(|c| c == k.chain) {
            out.push(k);
        }
    }
    Ok(out)
}
