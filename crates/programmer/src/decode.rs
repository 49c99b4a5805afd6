//! Kernel dump messages → IR (`compiler::nft`).
//!
//! Tables, chains, sets and the generation are parsed with
//! `netlink-packet-netfilter`'s typed messages. Rules and set elements —
//! the bulk of any read-back — are parsed with our own attribute iterator:
//! the crate (0.4.0) formats the whole remaining buffer into an
//! error-context string for every list entry it parses, which is quadratic
//! (3 s for 2,000 elements in a debug build, 1.2 s for 11,000 rules in a
//! release build; 8 ms and 84 ms without).
//!
//! Rule expressions are reduced to a small list ([`Expr`]) and matched
//! against exactly the expression sequences `encode.rs` writes (which are
//! nft's own). Anything else is not guessed at: an unrecognised rule becomes
//! a marker rule (see [`FOREIGN_RULE_PREFIX`]) that can never equal a
//! compiled rule, so the next apply rewrites its chain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use compiler::nft::{
    AddrTarget, BaseChain, Chain, ChainPolicy, CtStates, Dir, Hook, IfDir, MapKey, Match,
    PortTarget, Rule, Set, SetElement, SetKey, Stmt, TableFamily, Verdict, VerdictMap,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::ParseableParametrized;
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, GenAttribute, Hook as NlHook, NfTablesMessage, SetAttribute,
    SetMessage,
};

use crate::consts::*;
use crate::encode::{addr_offset, icmp_proto};
use crate::expr::{nested_value, verdict_data, Expr};
use crate::netlink::Reply;
use crate::nla::{be_u32, be_u64, c_str, AttrIter};

/// Comment prefix of the marker rule that stands for a rule we cannot
/// decode (written by someone else, or by a different version of us).
pub const FOREIGN_RULE_PREFIX: &str = "nftpolicy: foreign rule";
/// Comment prefix of the marker set that stands for a set or map whose type
/// we do not create.
pub const FOREIGN_SET_PREFIX: &str = "nftpolicy: foreign set";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to parse an nf_tables message of type {msg_type:#06x} from the kernel")]
    Parse {
        msg_type: u16,
        #[source]
        source: netlink_packet_core::DecodeError,
    },
    #[error(
        "the kernel replied with message type {0:#06x} where an nf_tables message was expected"
    )]
    UnexpectedMessage(u16),
    #[error("the kernel's {what} message lacks {attr}")]
    MissingAttribute {
        what: &'static str,
        attr: &'static str,
    },
}

/// Parses a reply into the typed nf_tables message.
pub fn parse(reply: &Reply) -> Result<NfTablesMessage, Error> {
    if reply.msg_type >> 8 != NFNL_SUBSYS_NFTABLES || reply.payload.len() < 4 {
        return Err(Error::UnexpectedMessage(reply.msg_type));
    }
    NfTablesMessage::parse_with_param(&reply.payload[4..], reply.msg_type as u8).map_err(|source| {
        Error::Parse {
            msg_type: reply.msg_type,
            source,
        }
    })
}

// ---------------------------------------------------------------------------
// Generation

pub fn gen_id(msg: &NfTablesMessage) -> Option<u32> {
    match msg {
        NfTablesMessage::NewGen(g) | NfTablesMessage::GetGen(g) => {
            g.attributes.iter().find_map(|a| match a {
                GenAttribute::Id(id) => Some(*id),
                _ => None,
            })
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Chains

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KChain {
    pub table: String,
    pub name: String,
    /// (hook number, priority, policy, chain type) for base chains.
    pub base: Option<(u32, i32, u32, String)>,
}

pub fn chain(msg: &ChainMessage) -> Result<KChain, Error> {
    let mut table = None;
    let mut name = None;
    let mut hooknum = None;
    let mut prio = 0i32;
    let mut policy = NF_ACCEPT as u32;
    let mut ty = String::new();
    for a in &msg.attributes {
        match a {
            ChainAttribute::Table(t) => table = Some(t.clone()),
            ChainAttribute::Name(n) => name = Some(n.clone()),
            ChainAttribute::Policy(p) => policy = *p,
            ChainAttribute::Type(t) => ty = t.clone(),
            ChainAttribute::Hook(hooks) => {
                for h in hooks {
                    match h {
                        NlHook::Number(n) => hooknum = Some(u32::from(*n)),
                        NlHook::Priority(p) => prio = *p as i32,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(KChain {
        table: table.ok_or(Error::MissingAttribute {
            what: "chain",
            attr: "NFTA_CHAIN_TABLE",
        })?,
        name: name.ok_or(Error::MissingAttribute {
            what: "chain",
            attr: "NFTA_CHAIN_NAME",
        })?,
        base: hooknum.map(|h| (h, prio, policy, ty)),
    })
}

/// IR chain (without rules) for a kernel chain. Base chains we cannot
/// express (other hooks or types) get a foreign marker rule so they never
/// compare equal to a compiled chain.
pub fn ir_chain(k: &KChain) -> Chain {
    let mut chain = Chain {
        name: k.name.clone(),
        base: None,
        rules: Vec::new().into(),
    };
    if let Some((hooknum, priority, policy, ty)) = &k.base {
        let hook = match hooknum {
            1 => Some(Hook::Input),
            2 => Some(Hook::Forward),
            3 => Some(Hook::Output),
            _ => None,
        };
        let policy = match *policy as i32 {
            NF_ACCEPT => Some(ChainPolicy::Accept),
            NF_DROP => Some(ChainPolicy::Drop),
            _ => None,
        };
        match (hook, policy, ty.as_str()) {
            (Some(hook), Some(policy), "filter") => {
                chain.base = Some(BaseChain {
                    hook,
                    priority: *priority,
                    policy,
                })
            }
            _ => chain.rules.push(foreign_marker(format!(
                "base chain type {ty} hook {hooknum} priority {priority}"
            ))),
        }
    }
    chain
}

fn foreign_marker(what: String) -> Rule {
    Rule {
        comment: Some(format!("{FOREIGN_RULE_PREFIX}: {what}")),
        ..Rule::default()
    }
}

// ---------------------------------------------------------------------------
// Sets

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KSet {
    pub table: String,
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: Option<u32>,
    pub userdata: Vec<u8>,
}

pub fn set(msg: &SetMessage) -> Result<KSet, Error> {
    let mut s = KSet::default();
    let mut have_name = false;
    for a in &msg.attributes {
        match a {
            SetAttribute::Table(t) => s.table = t.clone(),
            SetAttribute::Name(n) => {
                s.name = n.clone();
                have_name = true;
            }
            SetAttribute::Flags(f) => s.flags = f.bits(),
            SetAttribute::KeyType(t) => s.key_type = *t,
            SetAttribute::KeyLen(l) => s.key_len = *l,
            SetAttribute::DataType(t) => s.data_type = Some(*t),
            SetAttribute::UserData(u) => s.userdata = u.clone(),
            _ => {}
        }
    }
    if !have_name {
        return Err(Error::MissingAttribute {
            what: "set",
            attr: "NFTA_SET_NAME",
        });
    }
    Ok(s)
}

/// The comment TLV (`NFTNL_UDATA_*_COMMENT`) of a userdata blob.
pub(crate) fn udata_comment(udata: &[u8], tlv_type: u8) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (t, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if t == tlv_type {
            let s = value.split(|&c| c == 0).next().unwrap_or(&[]);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

/// What kind of IR object a kernel set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetShape {
    Set(SetKey),
    VerdictMap(MapKey),
    Anonymous,
    Foreign,
}

pub fn set_shape(family: TableFamily, k: &KSet) -> SetShape {
    if k.flags & NFT_SET_ANONYMOUS != 0 {
        return SetShape::Anonymous;
    }
    if k.flags & NFT_SET_MAP != 0 {
        let key = [MapKey::IfName, MapKey::Addr].into_iter().find(|key| {
            let (t, len, _) = crate::encode::map_key_spec(family, *key);
            k.key_type == t && k.key_len == len
        });
        return match key {
            Some(key) if k.data_type == Some(NFT_DATA_VERDICT) => SetShape::VerdictMap(key),
            _ => SetShape::Foreign,
        };
    }
    for key in [
        SetKey::Addr,
        SetKey::Host,
        SetKey::Port,
        SetKey::NamedPort,
        SetKey::Mark,
        SetKey::MarkPort,
    ] {
        let (t, len, flags, _) = crate::encode::set_key_spec(family, key);
        if k.key_type == t && k.key_len == len && k.flags == flags && k.data_type.is_none() {
            return SetShape::Set(key);
        }
    }
    SetShape::Foreign
}

// ---------------------------------------------------------------------------
// Elements

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KElem {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub flags: u32,
    pub verdict: Option<(i32, Option<String>)>,
    /// Map data we do not understand.
    pub other_data: bool,
}

/// Decodes the elements of one `NEWSETELEM` dump message.
///
/// Parsed with our own attribute iterator rather than the crate's typed
/// `SetElementMessage`: the crate formats the whole remaining buffer into
/// an error-context string for every list element it parses, which makes
/// parsing a message quadratic in its size (3 s for 2,000 elements in a
/// debug build).
pub fn elements(reply: &Reply, out: &mut Vec<KElem>) -> Result<(), Error> {
    if reply.msg_type != msg_type(NFT_MSG_NEWSETELEM) || reply.payload.len() < 4 {
        return Err(Error::UnexpectedMessage(reply.msg_type));
    }
    for (kind, list) in AttrIter::new(&reply.payload[4..]) {
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in AttrIter::new(list) {
            let mut e = KElem::default();
            for (k, v) in AttrIter::new(elem) {
                match k {
                    NFTA_SET_ELEM_KEY => e.key = nested_value(v).unwrap_or_default().to_vec(),
                    NFTA_SET_ELEM_KEY_END => e.key_end = nested_value(v).map(<[u8]>::to_vec),
                    NFTA_SET_ELEM_FLAGS => e.flags = be_u32(v).unwrap_or(0),
                    NFTA_SET_ELEM_DATA => match AttrIter::new(v).next() {
                        Some((NFTA_DATA_VERDICT, verdict)) => e.verdict = verdict_data(verdict),
                        _ => e.other_data = true,
                    },
                    _ => {}
                }
            }
            out.push(e);
        }
    }
    Ok(())
}

fn ir_verdict(code: i32, chain: Option<String>) -> Option<Verdict> {
    Some(match (code, chain) {
        (NF_ACCEPT, None) => Verdict::Accept,
        (NF_DROP, None) => Verdict::Drop,
        (NFT_RETURN, None) => Verdict::Return,
        (NFT_JUMP, Some(c)) => Verdict::Jump(c),
        (NFT_GOTO, Some(c)) => Verdict::Goto(c),
        _ => return None,
    })
}

fn uint(bytes: &[u8]) -> u128 {
    bytes.iter().fold(0u128, |acc, &b| (acc << 8) | b as u128)
}

/// Rebuilds the `[start, end)` intervals of an interval set from its
/// elements (any order: the rbtree backend dumps them in descending order).
/// End elements that close nothing (nft's zero element) are skipped; a
/// start without an end runs to the end of the key space.
fn kernel_intervals(elems: &[KElem], width: usize) -> Option<Vec<(u128, u128)>> {
    let max: u128 = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (width * 8)) - 1
    };
    let mut sorted: Vec<(u128, bool)> = Vec::with_capacity(elems.len());
    for e in elems {
        if e.key.len() != width || e.key_end.is_some() {
            return None;
        }
        sorted.push((uint(&e.key), e.flags & NFT_SET_ELEM_INTERVAL_END == 0));
    }
    // At equal keys the end of one interval sorts before the start of the
    // next (false < true).
    sorted.sort_unstable();
    let mut out = Vec::with_capacity(sorted.len() / 2);
    let mut open: Option<u128> = None;
    for (key, is_start) in sorted {
        if is_start {
            if let Some(s) = open.take() {
                // Two starts in a row: the first never ended.
                out.push((s, key.checked_sub(1)?));
            }
            open = Some(key);
        } else if let Some(s) = open.take() {
            if key <= s {
                return None;
            }
            out.push((s, key - 1));
        }
    }
    if let Some(s) = open {
        out.push((s, max));
    }
    Some(out)
}

/// The fewest CIDRs covering exactly `[first, last]` (inclusive).
pub fn range_to_cidrs(first: u128, last: u128, v6: bool) -> Vec<IpNet> {
    let bits: u32 = if v6 { 128 } else { 32 };
    let mut out = Vec::new();
    let mut start = first;
    loop {
        // Largest aligned block starting at `start` that fits.
        let align = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        let mut size_bits = align;
        while size_bits > 0 {
            let span_last = if size_bits == 128 {
                u128::MAX
            } else {
                start + ((1u128 << size_bits) - 1)
            };
            if span_last <= last && span_last >= start {
                break;
            }
            size_bits -= 1;
        }
        let prefix = (bits - size_bits) as u8;
        // `prefix` ≤ `bits` by construction, so these never fail.
        let net = if v6 {
            Ipv6Net::new(Ipv6Addr::from(start), prefix)
                .ok()
                .map(IpNet::V6)
        } else {
            Ipv4Net::new(Ipv4Addr::from(start as u32), prefix)
                .ok()
                .map(IpNet::V4)
        };
        out.extend(net);
        let span_last = if size_bits == 128 {
            u128::MAX
        } else {
            start + ((1u128 << size_bits) - 1)
        };
        if span_last >= last {
            break;
        }
        start = span_last + 1;
    }
    out
}

/// IR elements of an Addr/Port set, sorted as `SetElement`'s `Ord` does.
pub fn interval_set_elements(
    family: TableFamily,
    key: SetKey,
    elems: &[KElem],
) -> Option<Vec<SetElement>> {
    let width = crate::encode::interval_width(family, key);
    let ivs = kernel_intervals(elems, width)?;
    let mut out = Vec::with_capacity(ivs.len());
    for (first, last) in ivs {
        match key {
            SetKey::Addr => out.extend(
                range_to_cidrs(first, last, family.is_v6())
                    .into_iter()
                    .map(SetElement::Net),
            ),
            SetKey::Port => out.push(SetElement::Ports {
                min: first as u16,
                max: last as u16,
            }),
            _ => return None,
        }
    }
    out.sort_unstable();
    Some(out)
}

/// IR elements of a host set: one address each, as host nets.
pub fn host_elements(family: TableFamily, elems: &[KElem]) -> Option<Vec<SetElement>> {
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        if e.flags != 0 || e.key_end.is_some() {
            return None;
        }
        let addr = addr_from_key(family, &e.key)?;
        out.push(SetElement::Net(IpNet::from(addr)));
    }
    out.sort_unstable();
    Some(out)
}

pub fn named_port_elements(family: TableFamily, elems: &[KElem]) -> Option<Vec<SetElement>> {
    let alen = if family.is_v6() { 16 } else { 4 };
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        let k = &e.key;
        if k.len() != alen + 8 || k[alen + 1..alen + 4] != [0, 0, 0] || k[alen + 6..] != [0, 0] {
            return None;
        }
        let addr = if family.is_v6() {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&k[..16]).ok()?))
        } else {
            IpAddr::V4(Ipv4Addr::new(k[0], k[1], k[2], k[3]))
        };
        out.push(SetElement::NamedPort(
            addr,
            k[alen],
            u16::from_be_bytes([k[alen + 4], k[alen + 5]]),
        ));
    }
    out.sort_unstable();
    Some(out)
}

/// An address of the table's family from a key's bytes.
fn addr_from_key(family: TableFamily, k: &[u8]) -> Option<IpAddr> {
    Some(match (family, k.len()) {
        (TableFamily::Ip, 4) => IpAddr::V4(Ipv4Addr::new(k[0], k[1], k[2], k[3])),
        (TableFamily::Ip6, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(k).ok()?)),
        _ => return None,
    })
}

/// IR elements of a mark set (`Mark` or `MarkPort`).
pub fn mark_elements(key: SetKey, elems: &[KElem]) -> Option<Vec<SetElement>> {
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        let k = &e.key;
        if e.flags != 0 || e.key_end.is_some() || k.len() < 4 {
            return None;
        }
        let mark = ne_u32(&k[..4])?;
        out.push(match key {
            SetKey::Mark if k.len() == 4 => SetElement::Mark(mark),
            SetKey::MarkPort if k.len() == 12 && k[5..8] == [0, 0, 0] && k[10..] == [0, 0] => {
                SetElement::MarkPort(mark, k[4], u16::from_be_bytes([k[8], k[9]]))
            }
            _ => return None,
        });
    }
    out.sort_unstable();
    Some(out)
}

fn ifname_from_key(k: &[u8]) -> Option<String> {
    if k.len() != IFNAMSIZ {
        return None;
    }
    let n = k.iter().position(|&c| c == 0)?;
    if n == 0 || k[n..].iter().any(|&c| c != 0) {
        return None;
    }
    String::from_utf8(k[..n].to_vec()).ok()
}

/// Builds the IR set or map for a kernel set and its elements. Shapes we
/// never create come back as a marker set (see [`FOREIGN_SET_PREFIX`]).
pub enum IrSet {
    Set(Set),
    Map(VerdictMap),
}

pub fn ir_set(family: TableFamily, k: &KSet, elems: &[KElem]) -> Option<IrSet> {
    let comment = udata_comment(&k.userdata, NFTNL_UDATA_SET_COMMENT);
    let foreign = |why: &str| {
        IrSet::Set(Set {
            name: k.name.clone(),
            key: SetKey::Addr,
            elements: Default::default(),
            comment: Some(format!(
                "{FOREIGN_SET_PREFIX}: {why} (flags {:#x}, key type {:#x}, key len {})",
                k.flags, k.key_type, k.key_len
            )),
        })
    };
    match set_shape(family, k) {
        SetShape::Anonymous => None,
        SetShape::Foreign => Some(foreign("type")),
        SetShape::VerdictMap(key) => {
            let mut map = VerdictMap {
                name: k.name.clone(),
                key,
                elements: Default::default(),
                comment,
            };
            for e in elems {
                let name = match key {
                    MapKey::IfName => ifname_from_key(&e.key),
                    MapKey::Addr => addr_from_key(family, &e.key).map(|a| a.to_string()),
                };
                let verdict = e.verdict.clone().and_then(|(c, ch)| ir_verdict(c, ch));
                match (name, verdict) {
                    (Some(n), Some(v)) => {
                        map.elements.insert(n, v);
                    }
                    _ => return Some(foreign("element")),
                }
            }
            Some(IrSet::Map(map))
        }
        SetShape::Set(key) => {
            let elements = match key {
                SetKey::NamedPort => named_port_elements(family, elems),
                SetKey::Host => host_elements(family, elems),
                SetKey::Mark | SetKey::MarkPort => mark_elements(key, elems),
                _ => interval_set_elements(family, key, elems),
            };
            match elements {
                Some(elements) => Some(IrSet::Set(Set {
                    name: k.name.clone(),
                    key,
                    elements: elements.into(),
                    comment,
                })),
                None => Some(foreign("element")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Rules

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KRule {
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub exprs: Vec<Expr<'static>>,
    pub comment: Option<String>,
}

/// Decodes one `NEWRULE` dump message.
///
/// Parsed with our own attribute iterator, like elements: the crate's
/// list parsers format the remaining buffer into an error-context string
/// per list entry, which made reading back 11,000 rules take 1.2 s in a
/// release build (most of it in `fmt`).
pub fn rule(reply: &Reply) -> Result<KRule, Error> {
    if reply.msg_type != msg_type(NFT_MSG_NEWRULE) || reply.payload.len() < 4 {
        return Err(Error::UnexpectedMessage(reply.msg_type));
    }
    let mut r = KRule {
        table: String::new(),
        chain: String::new(),
        handle: 0,
        exprs: Vec::new(),
        comment: None,
    };
    for (kind, v) in AttrIter::new(&reply.payload[4..]) {
        match kind {
            NFTA_RULE_TABLE => r.table = c_str(v),
            NFTA_RULE_CHAIN => r.chain = c_str(v),
            NFTA_RULE_HANDLE => r.handle = be_u64(v).unwrap_or(0),
            NFTA_RULE_EXPRESSIONS => {
                for (_, e) in AttrIter::new(v) {
                    r.exprs.push(Expr::parse_elem(e));
                }
            }
            NFTA_RULE_USERDATA => r.comment = udata_comment(v, NFTNL_UDATA_RULE_COMMENT),
            _ => {}
        }
    }
    if r.chain.is_empty() {
        return Err(Error::MissingAttribute {
            what: "rule",
            attr: "NFTA_RULE_CHAIN",
        });
    }
    Ok(r)
}

/// IR rule for a kernel rule: the decoded rule, or a foreign marker.
pub fn ir_rule(family: TableFamily, k: &KRule) -> Rule {
    match decode_exprs(family, &k.exprs) {
        Some((matches, stmts, verdict)) => Rule {
            matches,
            stmts,
            verdict,
            comment: k.comment.clone(),
        },
        None => {
            let names: Vec<&str> = k.exprs.iter().map(Expr::name).collect();
            let mut what = format!("handle {} [{}]", k.handle, names.join(" "));
            if let Some(c) = &k.comment {
                what.push_str(&format!(" comment {c:?}"));
            }
            foreign_marker(what)
        }
    }
}

pub(crate) type Decoded = (Vec<Match>, Vec<Stmt>, Option<Verdict>);

/// Recognises exactly the expression sequences `encode::rule_exprs` writes.
pub(crate) fn decode_exprs(family: TableFamily, e: &[Expr]) -> Option<Decoded> {
    let mut matches = Vec::new();
    let mut stmts = Vec::new();
    let mut verdict = None;
    let icmp_proto = icmp_proto(family);
    let mut l4: Option<u8> = None;
    let mut i = 0;
    // Matches come first, then statements, then the verdict.
    let push_match = |stmts: &Vec<Stmt>, matches: &mut Vec<Match>, m: Match| -> Option<()> {
        if !stmts.is_empty() {
            return None;
        }
        matches.push(m);
        Some(())
    };
    while i < e.len() {
        if verdict.is_some() {
            return None;
        }
        match &e[i] {
            Expr::MetaLoad {
                key,
                dreg: NFT_REG_1,
            } if *key == NFT_META_IIFNAME || *key == NFT_META_OIFNAME => {
                let dir = if *key == NFT_META_IIFNAME {
                    IfDir::In
                } else {
                    IfDir::Out
                };
                match e.get(i + 1)? {
                    Expr::Cmp {
                        sreg: NFT_REG_1,
                        op,
                        data,
                    } => {
                        let negate = neg(*op)?;
                        let (name, wildcard) = if data.len() == IFNAMSIZ {
                            (ifname_from_key(data)?, false)
                        } else if !data.is_empty() && data.len() < IFNAMSIZ && !data.contains(&0) {
                            (String::from_utf8(data.to_vec()).ok()?, true)
                        } else {
                            return None;
                        };
                        push_match(
                            &stmts,
                            &mut matches,
                            Match::IfName {
                                dir,
                                name,
                                wildcard,
                                negate,
                            },
                        )?;
                        i += 2;
                    }
                    Expr::Lookup {
                        sreg: NFT_REG_1,
                        dreg: Some(NFT_REG_VERDICT),
                        set,
                        flags: None | Some(0),
                        ..
                    } => {
                        verdict = Some(Verdict::IfNameVmap {
                            dir,
                            map: set.to_string(),
                        });
                        i += 2;
                    }
                    _ => return None,
                }
            }
            Expr::CtLoad {
                key: NFT_CT_STATE,
                dreg: NFT_REG_1,
                direction: None,
            } => {
                let Expr::Bitwise {
                    sreg: NFT_REG_1,
                    dreg: NFT_REG_1,
                    len: 4,
                    mask,
                    xor,
                    op: None | Some(NFT_BITWISE_BOOL),
                } = e.get(i + 1)?
                else {
                    return None;
                };
                let Expr::Cmp {
                    sreg: NFT_REG_1,
                    op: NFT_CMP_NEQ,
                    data,
                } = e.get(i + 2)?
                else {
                    return None;
                };
                if xor[..] != [0; 4] || data[..] != [0; 4] {
                    return None;
                }
                push_match(
                    &stmts,
                    &mut matches,
                    Match::CtState(CtStates(ne_u32(mask)?)),
                )?;
                i += 3;
            }
            Expr::MetaLoad {
                key: NFT_META_MARK,
                dreg: NFT_REG_1,
            } => match e.get(i + 1)? {
                Expr::Cmp {
                    sreg: NFT_REG_1,
                    op,
                    data,
                } => {
                    let m = Match::Mark {
                        mask: u32::MAX,
                        value: ne_u32(data)?,
                        negate: neg(*op)?,
                    };
                    push_match(&stmts, &mut matches, m)?;
                    i += 2;
                }
                Expr::Bitwise {
                    sreg: NFT_REG_1,
                    dreg: NFT_REG_1,
                    len: 4,
                    mask,
                    xor,
                    op: None | Some(NFT_BITWISE_BOOL),
                } => match e.get(i + 2)? {
                    Expr::Cmp {
                        sreg: NFT_REG_1,
                        op,
                        data,
                    } if xor[..] == [0; 4] => {
                        let m = Match::Mark {
                            mask: ne_u32(mask)?,
                            value: ne_u32(data)?,
                            negate: neg(*op)?,
                        };
                        push_match(&stmts, &mut matches, m)?;
                        i += 3;
                    }
                    Expr::MetaSet {
                        key: NFT_META_MARK,
                        sreg: NFT_REG_1,
                    } => {
                        // Canonical form: `clear` and `set` disjoint, as
                        // the compiler writes them (see the crate docs).
                        let set = ne_u32(xor)?;
                        stmts.push(Stmt::SetMark {
                            clear: !ne_u32(mask)? & !set,
                            set,
                        });
                        i += 3;
                    }
                    next if xor[..] == [0; 4] => {
                        let (ports, used) = mark_lookup_ports(next, e.get(i + 3))?;
                        let (set, negate) = set_lookup(e.get(i + 2 + used)?)?;
                        if negate {
                            return None;
                        }
                        let m = Match::MarkLookup {
                            mask: ne_u32(mask)?,
                            ports,
                            set,
                        };
                        push_match(&stmts, &mut matches, m)?;
                        i += 3 + used;
                    }
                    _ => return None,
                },
                _ => return None,
            },
            Expr::Immediate {
                dreg: NFT_REG_1,
                data,
            } => {
                let Expr::MetaSet {
                    key: NFT_META_MARK,
                    sreg: NFT_REG_1,
                } = e.get(i + 1)?
                else {
                    return None;
                };
                let set = ne_u32(data)?;
                stmts.push(Stmt::SetMark { clear: !set, set });
                i += 2;
            }
            Expr::MetaLoad {
                key: NFT_META_L4PROTO,
                dreg: NFT_REG_1,
            } => {
                let Expr::Cmp {
                    sreg: NFT_REG_1,
                    op,
                    data,
                } = e.get(i + 1)?
                else {
                    return None;
                };
                if data.len() != 1 {
                    return None;
                }
                let negate = neg(*op)?;
                if !negate {
                    l4 = Some(data[0]);
                }
                push_match(
                    &stmts,
                    &mut matches,
                    Match::L4Proto {
                        proto: data[0],
                        negate,
                    },
                )?;
                i += 2;
            }
            Expr::Payload {
                dreg: NFT_REG_1,
                base: NFT_PAYLOAD_NETWORK_HEADER,
                offset,
                len,
            } => {
                let dir = addr_dir(family, *offset)?;
                let (_, alen) = addr_offset(family, dir);
                let len = *len as usize;
                if let Some(Expr::Lookup {
                    sreg: NFT_REG_1,
                    dreg: Some(NFT_REG_VERDICT),
                    set,
                    flags: None | Some(0),
                    ..
                }) = e.get(i + 1)
                {
                    if len != alen {
                        return None;
                    }
                    verdict = Some(Verdict::AddrVmap {
                        dir,
                        map: set.to_string(),
                    });
                    i += 2;
                    continue;
                }
                let (m, used) = decode_addr(family, dir, alen, len, &e[i + 1..])?;
                push_match(&stmts, &mut matches, m)?;
                i += 1 + used;
            }
            Expr::Payload {
                dreg: NFT_REG_1,
                base: NFT_PAYLOAD_TRANSPORT_HEADER,
                offset,
                len,
            } => {
                if l4 == Some(icmp_proto) && *offset == 0 {
                    let Expr::Cmp {
                        sreg: NFT_REG_1,
                        op,
                        data,
                    } = e.get(i + 1)?
                    else {
                        return None;
                    };
                    let (icmp_type, code) = match (*len, data.len()) {
                        (1, 1) => (data[0], None),
                        (2, 2) => (data[0], Some(data[1])),
                        _ => return None,
                    };
                    let m = Match::Icmp {
                        icmp_type,
                        code,
                        negate: neg(*op)?,
                    };
                    push_match(&stmts, &mut matches, m)?;
                    i += 2;
                } else {
                    if *len != 2 {
                        return None;
                    }
                    let dir = match offset {
                        0 => Dir::Src,
                        2 => Dir::Dst,
                        _ => return None,
                    };
                    let (m, used) = decode_port(dir, &e[i + 1..])?;
                    push_match(&stmts, &mut matches, m)?;
                    i += 1 + used;
                }
            }
            Expr::Counter { .. } => {
                stmts.push(Stmt::Counter);
                i += 1;
            }
            Expr::Limit {
                rate,
                unit: 1,
                burst: NFT_LIMIT_DEFAULT_BURST,
                kind: NFT_LIMIT_PKTS,
                flags: 0,
            } => {
                let (prefix, group) = plain_log(e.get(i + 1)?)?;
                stmts.push(Stmt::Log {
                    prefix,
                    group,
                    rate_per_second: Some(u32::try_from(*rate).ok()?),
                });
                i += 2;
            }
            log @ Expr::Log { .. } => {
                let (prefix, group) = plain_log(log)?;
                stmts.push(Stmt::Log {
                    prefix,
                    group,
                    rate_per_second: None,
                });
                i += 1;
            }
            Expr::Verdict { code, chain } => {
                verdict = Some(ir_verdict(*code, chain.as_deref().map(str::to_owned))?);
                i += 1;
            }
            _ => return None,
        }
    }
    Some((matches, stmts, verdict))
}

/// A log statement as nft writes `log [prefix …] [group N]`: its prefix and
/// group. Anything beyond nft's defaults (the kernel reports snaplen and
/// queue threshold 0 for NFLOG, level 4 and flags 0 for the kernel log) is
/// a log we did not write.
fn plain_log(e: &Expr) -> Option<(String, Option<u16>)> {
    let Expr::Log {
        prefix,
        group,
        snaplen,
        qthreshold,
        level,
        flags,
    } = e
    else {
        return None;
    };
    let default = snaplen.unwrap_or(0) == 0
        && qthreshold.unwrap_or(0) == 0
        && flags.unwrap_or(0) == 0
        && level.is_none_or(|l| l == NFT_LOG_DEFAULT_LEVEL);
    default.then(|| (prefix.as_deref().unwrap_or_default().to_owned(), *group))
}

fn neg(op: u32) -> Option<bool> {
    match op {
        NFT_CMP_EQ => Some(false),
        NFT_CMP_NEQ => Some(true),
        _ => None,
    }
}

fn ne_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.try_into().ok()?))
}

fn addr_dir(family: TableFamily, offset: u32) -> Option<Dir> {
    [Dir::Src, Dir::Dst]
        .into_iter()
        .find(|d| addr_offset(family, *d).0 == offset)
}

fn ipnet_from(family: TableFamily, bytes: &[u8], prefix: u8) -> Option<IpNet> {
    let mut full = [0u8; 16];
    full[..bytes.len()].copy_from_slice(bytes);
    Some(if family.is_v6() {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(full), prefix).ok()?)
    } else {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(full[0], full[1], full[2], full[3]), prefix).ok()?)
    })
}

/// After `payload load <len>b @ network header + <addr offset>`: a CIDR
/// (cmp, or bitwise + cmp), a set lookup, or a named-port concatenation.
/// Returns the match and how many expressions after the load it used.
fn decode_addr(
    family: TableFamily,
    dir: Dir,
    alen: usize,
    len: usize,
    rest: &[Expr],
) -> Option<(Match, usize)> {
    if len < alen {
        // Byte-aligned prefix shorter than the address.
        let Expr::Cmp {
            sreg: NFT_REG_1,
            op,
            data,
        } = rest.first()?
        else {
            return None;
        };
        if data.len() != len || len == 0 {
            return None;
        }
        let net = ipnet_from(family, data, (len * 8) as u8)?;
        return Some((
            Match::Addr {
                dir,
                target: AddrTarget::Net(net),
                negate: neg(*op)?,
            },
            1,
        ));
    }
    if len != alen {
        return None;
    }
    match rest.first()? {
        Expr::Cmp {
            sreg: NFT_REG_1,
            op,
            data,
        } if data.len() == alen => {
            let net = ipnet_from(family, data, (alen * 8) as u8)?;
            Some((
                Match::Addr {
                    dir,
                    target: AddrTarget::Net(net),
                    negate: neg(*op)?,
                },
                1,
            ))
        }
        Expr::Bitwise {
            sreg: NFT_REG_1,
            dreg: NFT_REG_1,
            len: blen,
            mask,
            xor,
            op: None | Some(NFT_BITWISE_BOOL),
        } if *blen as usize == alen && mask.len() == alen && xor.iter().all(|&b| b == 0) => {
            let prefix = mask_prefix(mask)?;
            let Expr::Cmp {
                sreg: NFT_REG_1,
                op,
                data,
            } = rest.get(1)?
            else {
                return None;
            };
            if data.len() != alen {
                return None;
            }
            let net = ipnet_from(family, data, prefix)?;
            if net.trunc() != net {
                return None;
            }
            Some((
                Match::Addr {
                    dir,
                    target: AddrTarget::Net(net),
                    negate: neg(*op)?,
                },
                2,
            ))
        }
        lookup @ Expr::Lookup { .. } => set_match(lookup, |set, negate| Match::Addr {
            dir,
            target: AddrTarget::Set(set),
            negate,
        }),
        Expr::MetaLoad {
            key: NFT_META_L4PROTO,
            dreg: proto_reg,
        } if *proto_reg == crate::encode::named_port_regs(alen).0 => {
            let Expr::Payload {
                dreg: port_reg,
                base: NFT_PAYLOAD_TRANSPORT_HEADER,
                offset: port_off,
                len: 2,
            } = rest.get(1)?
            else {
                return None;
            };
            if *port_reg != crate::encode::named_port_regs(alen).1 {
                return None;
            }
            let (set, negate) = set_lookup(rest.get(2)?)?;
            if *port_off == crate::encode::port_offset(dir) {
                Some((Match::NamedPort { dir, set, negate }, 3))
            } else if dir == Dir::Src && *port_off == crate::encode::port_offset(Dir::Dst) {
                Some((Match::PeerPort { set, negate }, 3))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// After `meta mark & mask` in register 1: whether `meta l4proto` and the
/// destination port follow (`Match::MarkLookup` with `ports`), and how
/// many expressions that takes before the lookup.
fn mark_lookup_ports(next: &Expr, after: Option<&Expr>) -> Option<(bool, usize)> {
    let (proto_reg, port_reg) = crate::encode::named_port_regs(4);
    match next {
        Expr::Lookup { .. } => Some((false, 0)),
        Expr::MetaLoad {
            key: NFT_META_L4PROTO,
            dreg,
        } if *dreg == proto_reg => match after? {
            Expr::Payload {
                dreg,
                base: NFT_PAYLOAD_TRANSPORT_HEADER,
                offset,
                len: 2,
            } if *dreg == port_reg && *offset == crate::encode::port_offset(Dir::Dst) => {
                Some((true, 2))
            }
            _ => None,
        },
        _ => None,
    }
}

/// A set lookup (see [`set_lookup`]) as the match `matched` makes of the
/// set's name and negation.
fn set_match(e: &Expr, matched: impl FnOnce(String, bool) -> Match) -> Option<(Match, usize)> {
    let (set, negate) = set_lookup(e)?;
    Some((matched(set, negate), 1))
}

/// A set lookup of register 1 that matches (or, inverted, does not match)
/// without mapping to a verdict: the set's name and whether it is negated.
fn set_lookup(e: &Expr) -> Option<(String, bool)> {
    let Expr::Lookup {
        sreg: NFT_REG_1,
        dreg: None,
        set,
        flags,
        ..
    } = e
    else {
        return None;
    };
    let negate = match flags.unwrap_or(0) {
        0 => false,
        NFT_LOOKUP_F_INV => true,
        _ => return None,
    };
    Some((set.to_string(), negate))
}

/// Prefix length of a contiguous network mask.
fn mask_prefix(mask: &[u8]) -> Option<u8> {
    let mut ones = 0u32;
    let mut seen_zero = false;
    for &b in mask {
        if seen_zero {
            if b != 0 {
                return None;
            }
            continue;
        }
        let lead = b.leading_ones();
        // The byte must be `lead` ones followed by zeros.
        if lead < 8 && b << lead != 0 {
            return None;
        }
        ones += lead;
        seen_zero = lead < 8;
    }
    u8::try_from(ones).ok()
}

/// After `payload load 2b @ transport header + 0|2`.
fn decode_port(dir: Dir, rest: &[Expr]) -> Option<(Match, usize)> {
    let port = |d: &[u8]| -> Option<u16> { Some(u16::from_be_bytes(d.try_into().ok()?)) };
    match rest.first()? {
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_GTE,
            data,
        } => {
            let min = port(data)?;
            let Expr::Cmp {
                sreg: NFT_REG_1,
                op: NFT_CMP_LTE,
                data,
            } = rest.get(1)?
            else {
                return None;
            };
            let max = port(data)?;
            Some((
                Match::Port {
                    dir,
                    target: PortTarget::Range { min, max },
                    negate: false,
                },
                2,
            ))
        }
        Expr::Cmp {
            sreg: NFT_REG_1,
            op,
            data,
        } => {
            let p = port(data)?;
            Some((
                Match::Port {
                    dir,
                    target: PortTarget::Range { min: p, max: p },
                    negate: neg(*op)?,
                },
                1,
            ))
        }
        Expr::Range {
            sreg: NFT_REG_1,
            op,
            from,
            to,
        } => {
            let negate = match *op {
                NFT_RANGE_EQ => false,
                NFT_RANGE_NEQ => true,
                _ => return None,
            };
            Some((
                Match::Port {
                    dir,
                    target: PortTarget::Range {
                        min: port(from)?,
                        max: port(to)?,
                    },
                    negate,
                },
                1,
            ))
        }
        lookup @ Expr::Lookup { .. } => set_match(lookup, |set, negate| Match::Port {
            dir,
            target: PortTarget::Set(set),
            negate,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_decomposition() {
        let v4 = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap()) as u128;
        assert_eq!(
            range_to_cidrs(v4("198.18.0.0"), v4("198.18.255.255"), false),
            vec![n("198.18.0.0/16")]
        );
        assert_eq!(
            range_to_cidrs(0, u32::MAX as u128, false),
            vec![n("0.0.0.0/0")]
        );
        assert_eq!(
            range_to_cidrs(v4("198.18.0.1"), v4("198.18.0.6"), false),
            vec![
                n("198.18.0.1/32"),
                n("198.18.0.2/31"),
                n("198.18.0.4/31"),
                n("198.18.0.6/32")
            ]
        );
        assert_eq!(range_to_cidrs(0, u128::MAX, true), vec![n("::/0")]);
        assert_eq!(
            range_to_cidrs(1u128 << 127, u128::MAX, true),
            vec![n("8000::/1")]
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask_prefix(&[0xff, 0xf0, 0, 0]), Some(12));
        assert_eq!(mask_prefix(&[0, 0, 0, 0]), Some(0));
        assert_eq!(mask_prefix(&[0xff; 16]), Some(128));
        assert_eq!(mask_prefix(&[0xff, 0x0f, 0, 0]), None);
    }

    #[test]
    fn intervals_from_kernel_order() {
        let el = |k: [u8; 4], end: bool| KElem {
            key: k.to_vec(),
            flags: if end { NFT_SET_ELEM_INTERVAL_END } else { 0 },
            ..KElem::default()
        };
        let cases = [
            // Descending, with nft's zero element and an open interval.
            (
                [
                    el([128, 0, 0, 0], false),
                    el([100, 128, 0, 0], true),
                    el([100, 64, 0, 0], false),
                    el([0, 0, 0, 0], true),
                ],
                ["100.64.0.0/10", "128.0.0.0/1"],
            ),
            // Adjacent intervals stay apart.
            (
                [
                    el([198, 18, 0, 0], false),
                    el([198, 18, 1, 0], true),
                    el([198, 18, 1, 0], false),
                    el([198, 18, 2, 0], true),
                ],
                ["198.18.0.0/24", "198.18.1.0/24"],
            ),
        ];
        for (elems, want) in cases {
            let got = interval_set_elements(TableFamily::Ip, SetKey::Addr, &elems).unwrap();
            let want: Vec<_> = want.iter().map(|w| SetElement::Net(n(w))).collect();
            assert_eq!(got, want);
        }
    }
}
