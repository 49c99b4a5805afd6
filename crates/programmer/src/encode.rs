//! IR (`compiler::nft`) → nf_tables netlink messages.
//!
//! Every encoding here mirrors what `nft` 1.0.x itself sends for the same
//! rule written in nft syntax (attribute order, register choice, optional
//! attributes), so that `nft list ruleset` prints our objects in its normal
//! syntax. The byte-for-byte comparison lives in `tests/nft_bytes.rs`. Known,
//! deliberate differences: list elements are numbered `NFTA_LIST_ELEM` (1) as
//! the UAPI says, where libnftnl numbers them 1, 2, 3…; the kernel ignores
//! the type.

use std::net::IpAddr;

use compiler::nft::{
    AddrTarget, Chain, ChainPolicy, Dir, IfDir, MapKey, Match, PortTarget, Rule, Set, SetElement,
    SetKey, Stmt, TableFamily, Verdict, VerdictMap,
};
use ipnet::IpNet;

use std::borrow::Cow;

use crate::batch::{Batch, Subject};
use crate::consts::*;
use crate::expr::{put_verdict, Data, Expr};
use crate::nla::Writer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{object}: interface name {name:?} does not fit IFNAMSIZ (at most 15 bytes, a wildcard prefix at least 1)")]
    InterfaceName { object: String, name: String },
    #[error("{object}: key {key:?} is not an address of a table of family {family} as it prints (198.18.0.1, fd00:198:18::1)")]
    MapKey {
        object: String,
        key: String,
        family: &'static str,
    },
    #[error("{object}: {value} does not belong to a table of family {family}")]
    AddressFamily {
        object: String,
        value: String,
        family: &'static str,
    },
    #[error("{object}: comment of {len} bytes; nft accepts at most {NFTNL_UDATA_COMMENT_MAXLEN}")]
    CommentTooLong { object: String, len: usize },
    #[error("{object}: log prefix of {len} bytes; the kernel accepts at most 127")]
    LogPrefixTooLong { object: String, len: usize },
    #[error("{object}: name {name:?} is empty or longer than {} bytes", NFT_NAME_MAXLEN - 1)]
    Name { object: String, name: String },
    #[error("{object}: port range {min}-{max} is empty")]
    EmptyPortRange { object: String, min: u16, max: u16 },
    #[error("{object}: element {element:?} does not fit a set keyed by {key:?}")]
    ElementKind {
        object: String,
        element: SetElement,
        key: SetKey,
    },
    #[error("{object}: verdict map elements must be accept, drop, return, jump or goto, not {verdict:?}")]
    MapVerdict { object: String, verdict: Verdict },
    #[error("{object}: an attribute nest exceeds 64 KiB")]
    TooLarge { object: String },
}

fn check_name(object: impl FnOnce() -> String, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() >= NFT_NAME_MAXLEN || name.contains('\0') {
        return Err(Error::Name {
            object: object(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn check_comment(object: impl FnOnce() -> String, comment: &Option<String>) -> Result<(), Error> {
    if let Some(c) = comment {
        if c.len() > NFTNL_UDATA_COMMENT_MAXLEN {
            return Err(Error::CommentTooLong {
                object: object(),
                len: c.len(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tables and chains

pub fn new_table(b: &mut Batch, family: TableFamily, name: &str) {
    b.begin(NFT_MSG_NEWTABLE, NLM_F_CREATE, family);
    b.w.put_str(NFTA_TABLE_NAME, name);
    b.w.put_u32_be(NFTA_TABLE_FLAGS, 0);
    b.end();
}

/// `DESTROYTABLE`: deletes the table and everything in it; unlike DELTABLE
/// it is not an error when the table does not exist.
pub fn destroy_table(b: &mut Batch, family: TableFamily, name: &str) {
    b.begin(NFT_MSG_DESTROYTABLE, 0, family);
    b.w.put_str(NFTA_TABLE_NAME, name);
    b.end();
}

/// `NEWCHAIN` with `NLM_F_CREATE`: creates the chain, or, for an existing
/// base chain with the same hook and priority, updates its policy.
pub fn new_chain(
    b: &mut Batch,
    family: TableFamily,
    table: &str,
    chain: &Chain,
) -> Result<(), Error> {
    check_name(|| format!("chain {}", chain.name), &chain.name)?;
    b.begin(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family);
    b.w.put_str(NFTA_CHAIN_TABLE, table);
    b.w.put_str(NFTA_CHAIN_NAME, &chain.name);
    if let Some(base) = &chain.base {
        b.w.put_str(NFTA_CHAIN_TYPE, "filter");
        let policy = match base.policy {
            ChainPolicy::Accept => NF_ACCEPT,
            ChainPolicy::Drop => NF_DROP,
        };
        b.w.put_u32_be(NFTA_CHAIN_POLICY, policy as u32);
        let hook = b.w.nest_start(NFTA_CHAIN_HOOK);
        b.w.put_u32_be(NFTA_HOOK_HOOKNUM, base.hook.number());
        b.w.put_u32_be(NFTA_HOOK_PRIORITY, base.priority as u32);
        b.w.nest_end(hook);
    }
    b.end();
    Ok(())
}

pub fn del_chain(b: &mut Batch, family: TableFamily, table: &str, chain: &str) {
    by_name(
        b,
        NFT_MSG_DELCHAIN,
        family,
        [(NFTA_CHAIN_TABLE, table), (NFTA_CHAIN_NAME, chain)],
    );
}

/// `DELRULE` naming only the chain: deletes all its rules (`flush chain`).
pub fn flush_chain(b: &mut Batch, family: TableFamily, table: &str, chain: &str) {
    by_name(
        b,
        NFT_MSG_DELRULE,
        family,
        [(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)],
    );
}

/// A message that names its object and nothing else (a deletion).
fn by_name(b: &mut Batch, t: u8, family: TableFamily, names: [(u16, &str); 2]) {
    b.begin(t, 0, family);
    for (attr, name) in names {
        b.w.put_str(attr, name);
    }
    b.end();
}

// ---------------------------------------------------------------------------
// Rules

/// Where a new rule goes in its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// After the chain's last rule (`NLM_F_APPEND`).
    End,
    /// Right before the rule with this kernel handle (`NFTA_RULE_POSITION`
    /// without `NLM_F_APPEND`).
    Before(u64),
}

/// Deletes the rule with kernel handle `handle` from `chain` (`DELRULE`).
pub fn del_rule(b: &mut Batch, family: TableFamily, table: &str, chain: &str, handle: u64) {
    b.begin(NFT_MSG_DELRULE, 0, family);
    b.w.put_str(NFTA_RULE_TABLE, table);
    b.w.put_str(NFTA_RULE_CHAIN, chain);
    b.w.put_u64_be(NFTA_RULE_HANDLE, handle);
    b.end();
}

/// Adds one rule, #`index` of its chain, at `place` (`NEWRULE`); with
/// `nftrace`, followed by `meta nftrace set 1` (for `nftpolicy explain
/// --kernel`; not an IR statement, as it never belongs in a compiled
/// ruleset).
#[allow(clippy::too_many_arguments)]
pub fn new_rule(
    b: &mut Batch,
    family: TableFamily,
    table: &str,
    chain: &str,
    index: usize,
    rule: &Rule,
    place: Place,
    nftrace: bool,
) -> Result<(), Error> {
    let subject = || Subject::Rule {
        family,
        table: table.to_owned(),
        chain: chain.to_owned(),
        index,
        comment: rule.comment.clone(),
    };
    let object = || subject().to_string();
    check_comment(object, &rule.comment)?;
    let start = b.w.len();
    let flags = match place {
        Place::End => NLM_F_CREATE | NLM_F_APPEND,
        Place::Before(_) => NLM_F_CREATE,
    };
    b.begin_rule(NFT_MSG_NEWRULE, flags, family, index);
    b.w.put_str(NFTA_RULE_TABLE, table);
    b.w.put_str(NFTA_RULE_CHAIN, chain);
    if let Place::Before(handle) = place {
        b.w.put_u64_be(NFTA_RULE_POSITION, handle);
    }
    let (w, set_ids) = b.writer_and_set_ids();
    let exprs = w.nest_start(NFTA_RULE_EXPRESSIONS);
    let set_id = |set: &str| set_ids.get(&family)?.get(table)?.get(set).copied();
    if let Err(e) = rule_exprs(family, rule, &set_id, &object, &mut |e| e.write(w)) {
        b.abandon();
        debug_assert_eq!(b.w.len(), start);
        return Err(e);
    }
    if nftrace {
        Expr::Immediate {
            dreg: NFT_REG_1,
            data: Data::of(&[1]),
        }
        .write(w);
        Expr::MetaSet {
            key: NFT_META_NFTRACE,
            sreg: NFT_REG_1,
        }
        .write(w);
    }
    w.nest_end(exprs);
    if let Some(c) = &rule.comment {
        put_udata_comment(&mut b.w, NFTA_RULE_USERDATA, NFTNL_UDATA_RULE_COMMENT, c);
    }
    if b.w.overflowed() {
        b.abandon();
        return Err(Error::TooLarge { object: object() });
    }
    b.end();
    Ok(())
}

/// A one-TLV userdata attribute holding a NUL-terminated comment, the
/// format libnftnl uses (type u8, length u8, value).
fn put_udata_comment(w: &mut Writer, attr: u16, tlv_type: u8, comment: &str) {
    let mut v = Vec::with_capacity(comment.len() + 3);
    v.push(tlv_type);
    v.push((comment.len() + 1) as u8);
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    w.put(attr, &v);
}

fn meta_load<'r>(key: u32, dreg: u32) -> Expr<'r> {
    Expr::MetaLoad { key, dreg }
}

fn cmp<'r>(op: u32, data: &[u8]) -> Expr<'r> {
    Expr::Cmp {
        sreg: NFT_REG_1,
        op,
        data: Data::of(data),
    }
}

/// `reg1 = (reg1 & mask) ^ xor`; `with_op` as nft writes it for
/// operations on values (not for prefix masks or flag tests).
fn bitwise<'r>(mask: &[u8], xor: &[u8], with_op: bool) -> Expr<'r> {
    Expr::Bitwise {
        sreg: NFT_REG_1,
        dreg: NFT_REG_1,
        op: with_op.then_some(NFT_BITWISE_BOOL),
        len: mask.len() as u32,
        mask: Data::of(mask),
        xor: Data::of(xor),
    }
}

/// Loads `len` bytes of the network header at `offset` (an address or
/// its prefix) into register 1.
fn address_load<'r>(offset: u32, len: usize) -> Expr<'r> {
    payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32, NFT_REG_1)
}

fn payload<'r>(base: u32, offset: u32, len: u32, dreg: u32) -> Expr<'r> {
    Expr::Payload {
        dreg,
        base,
        offset,
        len,
    }
}

fn lookup<'r>(set: &'r str, set_id: Option<u32>, negate: bool) -> Expr<'r> {
    Expr::Lookup {
        sreg: NFT_REG_1,
        dreg: None,
        set: Cow::Borrowed(set),
        set_id,
        flags: negate.then_some(NFT_LOOKUP_F_INV),
    }
}

/// Register 1 looked up in verdict map `map`: its element's verdict is the
/// rule's.
fn vmap_lookup<'r>(map: &'r str, set_id: Option<u32>) -> Expr<'r> {
    Expr::Lookup {
        sreg: NFT_REG_1,
        dreg: Some(NFT_REG_VERDICT),
        set: Cow::Borrowed(map),
        set_id,
        flags: None,
    }
}

/// `ip <addr>addr . meta l4proto . th <port>port @set` for
/// `(addr, port)` directions: a named port, or (source address,
/// destination port) a fused lookup. Each field of the concatenation
/// starts on a 32-bit register.
fn concat_lookup<'r>(
    out: &mut dyn FnMut(Expr<'r>),
    family: TableFamily,
    (addr_dir, port_dir): (Dir, Dir),
    set: &'r str,
    set_id: Option<u32>,
    negate: bool,
) {
    let (offset, alen) = addr_offset(family, addr_dir);
    let (proto_reg, port_reg) = named_port_regs(alen);
    out(address_load(offset, alen));
    out(meta_load(NFT_META_L4PROTO, proto_reg));
    out(payload(
        NFT_PAYLOAD_TRANSPORT_HEADER,
        port_offset(port_dir),
        2,
        port_reg,
    ));
    out(lookup(set, set_id, negate));
}

/// Lowers `rule` to the expressions nft writes for it, in order, handing
/// each to `out`. `set_id` gives the batch id of a set created in the same
/// transaction. The inverse is `decode::decode_exprs`.
pub(crate) fn rule_exprs<'r>(
    family: TableFamily,
    rule: &'r Rule,
    set_id: &dyn Fn(&str) -> Option<u32>,
    object: &dyn Fn() -> String,
    out: &mut dyn FnMut(Expr<'r>),
) -> Result<(), Error> {
    // The protocol the packet is known to have, from an earlier
    // `meta l4proto X` match: ICMP matches need it as a dependency, and nft
    // omits the dependency when the rule already has it.
    let mut l4: Option<u8> = None;
    for m in &rule.matches {
        match m {
            Match::IfName {
                dir,
                name,
                wildcard,
                negate,
            } => {
                let ok = name.len() < IFNAMSIZ
                    && !name.contains('\0')
                    && (!wildcard || !name.is_empty());
                if !ok {
                    return Err(Error::InterfaceName {
                        object: object(),
                        name: name.clone(),
                    });
                }
                out(meta_load(ifname_key(*dir), NFT_REG_1));
                if *wildcard {
                    out(cmp(cmp_op(*negate), name.as_bytes()));
                } else {
                    out(cmp(cmp_op(*negate), &ifname_bytes(name)));
                }
            }
            Match::CtState(states) => {
                out(Expr::CtLoad {
                    key: NFT_CT_STATE,
                    dreg: NFT_REG_1,
                    direction: None,
                });
                // ct state is host-endian in the register (netlink.md).
                out(bitwise(&states.0.to_ne_bytes(), &[0; 4], false));
                out(cmp(NFT_CMP_NEQ, &[0; 4]));
            }
            Match::Mark {
                mask,
                value,
                negate,
            } => {
                out(meta_load(NFT_META_MARK, NFT_REG_1));
                if *mask != u32::MAX {
                    out(bitwise(&mask.to_ne_bytes(), &[0; 4], true));
                }
                out(cmp(cmp_op(*negate), &value.to_ne_bytes()));
            }
            Match::L4Proto { proto, negate } => {
                out(meta_load(NFT_META_L4PROTO, NFT_REG_1));
                out(cmp(cmp_op(*negate), &[*proto]));
                if !negate {
                    l4 = Some(*proto);
                }
            }
            Match::Addr {
                dir,
                target,
                negate,
            } => {
                let (offset, alen) = addr_offset(family, *dir);
                match target {
                    AddrTarget::Net(net) => {
                        let (bytes, prefix) =
                            net_bytes(family, net).ok_or_else(|| Error::AddressFamily {
                                object: object(),
                                value: net.to_string(),
                                family: family.keyword(),
                            })?;
                        let prefix = prefix as usize;
                        let op = cmp_op(*negate);
                        if prefix == alen * 8 || (prefix > 0 && prefix.is_multiple_of(8)) {
                            // Byte-aligned prefix: nft loads just those bytes.
                            let n = prefix / 8;
                            out(address_load(offset, n));
                            out(cmp(op, &bytes[..n]));
                        } else {
                            out(address_load(offset, alen));
                            let mask = prefix_mask(prefix, alen);
                            out(bitwise(&mask[..alen], &[0u8; 16][..alen], false));
                            out(cmp(op, &bytes[..alen]));
                        }
                    }
                    AddrTarget::Set(set) => {
                        out(address_load(offset, alen));
                        out(lookup(set, set_id(set), *negate));
                    }
                }
            }
            Match::Port {
                dir,
                target,
                negate,
            } => {
                let offset = port_offset(*dir);
                out(payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2, NFT_REG_1));
                match target {
                    PortTarget::Range { min, max } => {
                        if min > max {
                            return Err(Error::EmptyPortRange {
                                object: object(),
                                min: *min,
                                max: *max,
                            });
                        }
                        let (lo, hi) = (min.to_be_bytes(), max.to_be_bytes());
                        if min == max {
                            out(cmp(cmp_op(*negate), &lo));
                        } else if !negate {
                            out(cmp(NFT_CMP_GTE, &lo));
                            out(cmp(NFT_CMP_LTE, &hi));
                        } else {
                            out(Expr::Range {
                                sreg: NFT_REG_1,
                                op: NFT_RANGE_NEQ,
                                from: Data::of(&lo),
                                to: Data::of(&hi),
                            });
                        }
                    }
                    PortTarget::Set(set) => out(lookup(set, set_id(set), *negate)),
                }
            }
            Match::NamedPort { dir, set, negate } => {
                concat_lookup(out, family, (*dir, *dir), set, set_id(set), *negate);
            }
            Match::PeerPort { set, negate } => {
                concat_lookup(out, family, (Dir::Src, Dir::Dst), set, set_id(set), *negate);
            }
            Match::MarkLookup { mask, ports, set } => {
                out(meta_load(NFT_META_MARK, NFT_REG_1));
                out(bitwise(&mask.to_ne_bytes(), &[0; 4], true));
                if *ports {
                    let (proto_reg, port_reg) = named_port_regs(4);
                    out(meta_load(NFT_META_L4PROTO, proto_reg));
                    out(payload(
                        NFT_PAYLOAD_TRANSPORT_HEADER,
                        port_offset(Dir::Dst),
                        2,
                        port_reg,
                    ));
                }
                out(lookup(set, set_id(set), false));
            }
            Match::Icmp {
                icmp_type,
                code,
                negate,
            } => {
                let proto = icmp_proto(family);
                if l4 != Some(proto) {
                    out(meta_load(NFT_META_L4PROTO, NFT_REG_1));
                    out(cmp(NFT_CMP_EQ, &[proto]));
                    l4 = Some(proto);
                }
                let op = cmp_op(*negate);
                match code {
                    None => {
                        out(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1));
                        out(cmp(op, &[*icmp_type]));
                    }
                    Some(code) => {
                        out(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2, NFT_REG_1));
                        out(cmp(op, &[*icmp_type, *code]));
                    }
                }
            }
        }
    }
    for s in &rule.stmts {
        match s {
            Stmt::Counter => out(Expr::Counter {
                packets: 0,
                bytes: 0,
            }),
            Stmt::SetMark { clear, set } => {
                let keep = !(clear | set);
                if keep == 0 {
                    // `meta mark set 0x…`: nothing of the old mark survives.
                    out(Expr::Immediate {
                        dreg: NFT_REG_1,
                        data: Data::of(&set.to_ne_bytes()),
                    });
                } else {
                    out(meta_load(NFT_META_MARK, NFT_REG_1));
                    out(bitwise(&keep.to_ne_bytes(), &set.to_ne_bytes(), true));
                }
                out(Expr::MetaSet {
                    key: NFT_META_MARK,
                    sreg: NFT_REG_1,
                });
            }
            Stmt::Log {
                prefix,
                group,
                rate_per_second,
            } => {
                if prefix.len() > 127 || prefix.contains('\0') {
                    return Err(Error::LogPrefixTooLong {
                        object: object(),
                        len: prefix.len(),
                    });
                }
                if let Some(rate) = rate_per_second {
                    out(Expr::Limit {
                        rate: *rate as u64,
                        unit: 1,
                        burst: NFT_LIMIT_DEFAULT_BURST,
                        kind: NFT_LIMIT_PKTS,
                        flags: 0,
                    });
                }
                out(Expr::Log {
                    prefix: (!prefix.is_empty()).then_some(Cow::Borrowed(prefix.as_str())),
                    group: *group,
                    snaplen: None,
                    qthreshold: None,
                    level: None,
                    flags: None,
                });
            }
        }
    }
    match &rule.verdict {
        None => {}
        Some(Verdict::AddrVmap { dir, map }) => {
            let (offset, alen) = addr_offset(family, *dir);
            out(address_load(offset, alen));
            out(vmap_lookup(map, set_id(map)));
        }
        Some(Verdict::IfNameVmap { dir, map }) => {
            out(meta_load(ifname_key(*dir), NFT_REG_1));
            out(vmap_lookup(map, set_id(map)));
        }
        Some(v) => {
            let (code, chain) = verdict_code(v).ok_or_else(|| Error::MapVerdict {
                object: object(),
                verdict: v.clone(),
            })?;
            out(Expr::Verdict {
                code,
                chain: chain.map(Cow::Borrowed),
            });
        }
    }
    Ok(())
}

/// `IPPROTO_ICMP` / `IPPROTO_ICMPV6`: the protocol of the family's ICMP.
pub(crate) fn icmp_proto(family: TableFamily) -> u8 {
    if family.is_v6() {
        IPPROTO_ICMPV6
    } else {
        IPPROTO_ICMP
    }
}

/// The register holding the 32-bit slot `slot` of the register file, named
/// as nft names it: the 128-bit `NFT_REG_n` when the slot starts one, else
/// `NFT_REG32_nn`.
fn reg_for_slot(slot: u32) -> u32 {
    if slot.is_multiple_of(4) {
        NFT_REG_1 + slot / 4
    } else {
        NFT_REG32_00 + slot
    }
}

/// Registers of the protocol and port fields of a named-port
/// concatenation after an address of `alen` bytes loaded into `NFT_REG_1`:
/// (9, 10) for IPv4, (`NFT_REG_2`, 13) for IPv6.
pub fn named_port_regs(alen: usize) -> (u32, u32) {
    let slot = (alen / 4) as u32;
    (reg_for_slot(slot), reg_for_slot(slot + 1))
}

/// Verdict code and chain for an immediate/map verdict; `None` for a vmap
/// dispatch, which is not a verdict value.
pub fn verdict_code(v: &Verdict) -> Option<(i32, Option<&str>)> {
    Some(match v {
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Jump(c) => (NFT_JUMP, Some(c.as_str())),
        Verdict::Goto(c) => (NFT_GOTO, Some(c.as_str())),
        Verdict::IfNameVmap { .. } | Verdict::AddrVmap { .. } => return None,
    })
}

fn ifname_key(dir: IfDir) -> u32 {
    match dir {
        IfDir::In => NFT_META_IIFNAME,
        IfDir::Out => NFT_META_OIFNAME,
    }
}

pub fn ifname_bytes(name: &str) -> [u8; IFNAMSIZ] {
    let mut b = [0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

fn cmp_op(negate: bool) -> u32 {
    if negate {
        NFT_CMP_NEQ
    } else {
        NFT_CMP_EQ
    }
}

/// (payload offset in the network header, address length) for
/// `ip saddr`/`ip daddr`/`ip6 saddr`/`ip6 daddr`.
pub fn addr_offset(family: TableFamily, dir: Dir) -> (u32, usize) {
    match (family, dir) {
        (TableFamily::Ip, Dir::Src) => (12, 4),
        (TableFamily::Ip, Dir::Dst) => (16, 4),
        (TableFamily::Ip6, Dir::Src) => (8, 16),
        (TableFamily::Ip6, Dir::Dst) => (24, 16),
    }
}

/// `th sport` / `th dport`.
pub fn port_offset(dir: Dir) -> u32 {
    match dir {
        Dir::Src => 0,
        Dir::Dst => 2,
    }
}

/// The network address (host bits cleared) as bytes, and the prefix
/// length; `None` if the address is not of the table's family.
fn net_bytes(family: TableFamily, net: &IpNet) -> Option<([u8; 16], u8)> {
    let mut out = [0u8; 16];
    match (family, net.trunc()) {
        (TableFamily::Ip, IpNet::V4(n)) => {
            out[..4].copy_from_slice(&n.network().octets());
            Some((out, n.prefix_len()))
        }
        (TableFamily::Ip6, IpNet::V6(n)) => {
            out.copy_from_slice(&n.network().octets());
            Some((out, n.prefix_len()))
        }
        _ => None,
    }
}

fn prefix_mask(prefix: usize, alen: usize) -> [u8; 16] {
    let mut m = [0u8; 16];
    for (i, byte) in m.iter_mut().enumerate().take(alen) {
        let bits = prefix.saturating_sub(i * 8).min(8);
        *byte = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    m
}

// ---------------------------------------------------------------------------
// Sets and maps

/// Key type, key length, flags and key byte order of a set, as nft declares
/// them (so `nft list` prints `type ipv4_addr`, `type inet_service`, …).
pub fn set_key_spec(family: TableFamily, key: SetKey) -> (u32, u32, u32, u32) {
    let v6 = family.is_v6();
    match key {
        SetKey::Addr => (
            if v6 { TYPE_IP6ADDR } else { TYPE_IPADDR },
            if v6 { 16 } else { 4 },
            NFT_SET_INTERVAL,
            BYTEORDER_BIG_ENDIAN,
        ),
        SetKey::Host => (
            if v6 { TYPE_IP6ADDR } else { TYPE_IPADDR },
            if v6 { 16 } else { 4 },
            0,
            BYTEORDER_BIG_ENDIAN,
        ),
        SetKey::Port => (TYPE_INET_SERVICE, 2, NFT_SET_INTERVAL, BYTEORDER_BIG_ENDIAN),
        SetKey::NamedPort => (
            concat_type(&[
                if v6 { TYPE_IP6ADDR } else { TYPE_IPADDR },
                TYPE_INET_PROTOCOL,
                TYPE_INET_SERVICE,
            ]),
            if v6 { 24 } else { 12 },
            0,
            // Mixed byte orders: nft records "invalid".
            BYTEORDER_INVALID,
        ),
        // The packet mark is a host-endian number.
        SetKey::Mark => (TYPE_MARK, 4, 0, BYTEORDER_HOST_ENDIAN),
        SetKey::MarkPort => (
            concat_type(&[TYPE_MARK, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            12,
            0,
            BYTEORDER_INVALID,
        ),
    }
}

fn udata_u32(v: &mut Vec<u8>, t: u8, value: u32) {
    v.push(t);
    v.push(4);
    v.extend_from_slice(&value.to_ne_bytes());
}

fn udata_comment(v: &mut Vec<u8>, t: u8, c: &str) {
    v.push(t);
    v.push((c.len() + 1) as u8);
    v.extend_from_slice(c.as_bytes());
    v.push(0);
}

/// `NEWSET` for a named set (no elements: see [`elements`]).
///
/// Concatenated (named-port) sets are plain hash sets: nft sends no
/// `NFTA_SET_DESC_CONCAT` for them (it does only for interval
/// concatenations, which the IR has none of), and neither do we.
pub fn new_set(b: &mut Batch, family: TableFamily, table: &str, set: &Set) -> Result<(), Error> {
    let (key_type, key_len, flags, byteorder) = set_key_spec(family, set.key);
    new_set_message(
        b,
        family,
        table,
        SetHeader {
            what: "set",
            name: &set.name,
            comment: &set.comment,
            flags,
            key: (key_type, key_len),
            data: None,
            udata: &[(NFTNL_UDATA_SET_KEYBYTEORDER, byteorder)],
        },
    )
}

/// Key type, length and byte order of a verdict map.
pub fn map_key_spec(family: TableFamily, key: MapKey) -> (u32, u32, u32) {
    match key {
        MapKey::IfName => (TYPE_IFNAME, IFNAMSIZ as u32, BYTEORDER_HOST_ENDIAN),
        MapKey::Addr => {
            let (t, len, _, order) = set_key_spec(family, SetKey::Host);
            (t, len, order)
        }
    }
}

/// `NEWSET` for a verdict map `ifname : verdict` or `ipv4_addr : verdict`.
/// The key byte order userdata (host, as for strings) is what makes
/// `nft list` print interface names as names rather than `""`
/// (netlink.md).
pub fn new_map(
    b: &mut Batch,
    family: TableFamily,
    table: &str,
    map: &VerdictMap,
) -> Result<(), Error> {
    let (key_type, key_len, byteorder) = map_key_spec(family, map.key);
    new_set_message(
        b,
        family,
        table,
        SetHeader {
            what: "map",
            name: &map.name,
            comment: &map.comment,
            flags: NFT_SET_MAP,
            key: (key_type, key_len),
            data: Some((NFT_DATA_VERDICT, 0)),
            udata: &[
                (NFTNL_UDATA_SET_KEYBYTEORDER, byteorder),
                (NFTNL_UDATA_SET_DATABYTEORDER, BYTEORDER_INVALID),
                (NFTNL_UDATA_SET_DATA_INTERVAL, 0),
            ],
        },
    )
}

/// What a `NEWSET` of a set or a map says.
struct SetHeader<'a> {
    /// `set` or `map`, for errors.
    what: &'static str,
    name: &'a str,
    comment: &'a Option<String>,
    flags: u32,
    /// Key type and length.
    key: (u32, u32),
    /// Data type and length, for a map.
    data: Option<(u32, u32)>,
    /// `u32` userdata TLVs, before the comment.
    udata: &'a [(u8, u32)],
}

/// `NEWSET`, attributes in nft's order.
fn new_set_message(
    b: &mut Batch,
    family: TableFamily,
    table: &str,
    h: SetHeader<'_>,
) -> Result<(), Error> {
    let object = || format!("{} {}", h.what, h.name);
    check_name(object, h.name)?;
    check_comment(object, h.comment)?;
    let id = b.alloc_set_id(family, table, h.name);
    b.begin(NFT_MSG_NEWSET, NLM_F_CREATE, family);
    b.w.put_str(NFTA_SET_TABLE, table);
    b.w.put_str(NFTA_SET_NAME, h.name);
    b.w.put_u32_be(NFTA_SET_FLAGS, h.flags);
    b.w.put_u32_be(NFTA_SET_KEY_TYPE, h.key.0);
    b.w.put_u32_be(NFTA_SET_KEY_LEN, h.key.1);
    if let Some((data_type, data_len)) = h.data {
        b.w.put_u32_be(NFTA_SET_DATA_TYPE, data_type);
        b.w.put_u32_be(NFTA_SET_DATA_LEN, data_len);
    }
    b.w.put_u32_be(NFTA_SET_ID, id);
    let mut ud = Vec::with_capacity(24);
    for (t, v) in h.udata {
        udata_u32(&mut ud, *t, *v);
    }
    if let Some(c) = h.comment {
        udata_comment(&mut ud, NFTNL_UDATA_SET_COMMENT, c);
    }
    b.w.put(NFTA_SET_USERDATA, &ud);
    b.end();
    Ok(())
}

pub fn del_set(b: &mut Batch, family: TableFamily, table: &str, set: &str) {
    by_name(
        b,
        NFT_MSG_DELSET,
        family,
        [(NFTA_SET_TABLE, table), (NFTA_SET_NAME, set)],
    );
}

// ---------------------------------------------------------------------------
// Elements

/// A half-open interval `[start, end)` of an interval set's key space;
/// `end == None` runs to the end of the key space (no end element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    pub start: u128,
    pub end: Option<u128>,
}

/// Key width in bytes of an interval set: 4 (IPv4), 16 (IPv6) or 2 (port).
pub fn interval_width(family: TableFamily, key: SetKey) -> usize {
    match key {
        SetKey::Addr if family.is_v6() => 16,
        SetKey::Addr => 4,
        SetKey::Port => 2,
        SetKey::Host | SetKey::NamedPort | SetKey::Mark | SetKey::MarkPort => 0,
    }
}

/// The IR elements of an Addr/Port set as sorted intervals, one per
/// element (adjacent elements stay separate intervals, so that reading
/// them back gives the same element list).
pub fn intervals(family: TableFamily, set: &Set) -> Result<Vec<Interval>, Error> {
    let width = interval_width(family, set.key);
    let max: u128 = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (width * 8)) - 1
    };
    let mut out = Vec::with_capacity(set.elements.len());
    for e in &set.elements {
        let (first, last) = match (set.key, e) {
            (SetKey::Addr, SetElement::Net(net)) => match (family, net) {
                (TableFamily::Ip, IpNet::V4(n)) => (
                    u32::from(n.network()) as u128,
                    u32::from(n.broadcast()) as u128,
                ),
                (TableFamily::Ip6, IpNet::V6(n)) => {
                    (u128::from(n.network()), u128::from(n.broadcast()))
                }
                _ => {
                    return Err(Error::AddressFamily {
                        object: format!("set {}", set.name),
                        value: net.to_string(),
                        family: family.keyword(),
                    })
                }
            },
            (SetKey::Port, SetElement::Ports { min, max }) => {
                if min > max {
                    return Err(Error::EmptyPortRange {
                        object: format!("set {}", set.name),
                        min: *min,
                        max: *max,
                    });
                }
                (*min as u128, *max as u128)
            }
            _ => {
                return Err(Error::ElementKind {
                    object: format!("set {}", set.name),
                    element: e.clone(),
                    key: set.key,
                })
            }
        };
        out.push(Interval {
            start: first,
            end: if last == max { None } else { Some(last + 1) },
        });
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// nft adds an interval-end element at key 0 when the first interval does
/// not start at 0 (historically needed by the rbtree backend). We do the
/// same, so the kernel holds what nft would have written.
pub fn needs_zero_end(sorted: &[Interval]) -> bool {
    sorted.first().is_some_and(|i| i.start != 0)
}

/// One element as written to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElem {
    key: [u8; 24],
    key_len: u8,
    pub interval_end: bool,
    /// Start of an interval running to the end of the key space.
    pub open: bool,
    /// Map data: verdict code and chain.
    pub verdict: Option<(i32, Option<String>)>,
}

impl RawElem {
    pub fn new(key: &[u8]) -> RawElem {
        let mut k = [0u8; 24];
        k[..key.len()].copy_from_slice(key);
        RawElem {
            key: k,
            key_len: key.len() as u8,
            interval_end: false,
            open: false,
            verdict: None,
        }
    }

    pub fn key(&self) -> &[u8] {
        &self.key[..self.key_len as usize]
    }
}

fn uint_bytes(v: u128, width: usize) -> [u8; 16] {
    let be = v.to_be_bytes();
    let mut out = [0u8; 16];
    out[..width].copy_from_slice(&be[16 - width..]);
    out
}

/// Raw elements for intervals: `[zero end]`, then start (+ end) per interval.
pub fn interval_elems(width: usize, ivs: &[Interval], zero_end: bool) -> Vec<RawElem> {
    let mut out = Vec::with_capacity(ivs.len() * 2 + 1);
    if zero_end {
        let mut e = RawElem::new(&[0u8; 16][..width]);
        e.interval_end = true;
        out.push(e);
    }
    for iv in ivs {
        let mut s = RawElem::new(&uint_bytes(iv.start, width)[..width]);
        match iv.end {
            Some(end) => {
                out.push(s);
                let mut e = RawElem::new(&uint_bytes(end, width)[..width]);
                e.interval_end = true;
                out.push(e);
            }
            None => {
                s.open = true;
                out.push(s);
            }
        }
    }
    out
}

/// Key bytes of a named-port element: address, protocol and port, each
/// field padded to 4 bytes (netlink.md).
pub fn named_port_key(family: TableFamily, e: &SetElement) -> Option<([u8; 24], usize)> {
    let SetElement::NamedPort(addr, proto, port) = e else {
        return None;
    };
    let mut k = [0u8; 24];
    let alen = match (family, addr) {
        (TableFamily::Ip, IpAddr::V4(a)) => {
            k[..4].copy_from_slice(&a.octets());
            4
        }
        (TableFamily::Ip6, IpAddr::V6(a)) => {
            k[..16].copy_from_slice(&a.octets());
            16
        }
        _ => return None,
    };
    k[alen] = *proto;
    k[alen + 4..alen + 6].copy_from_slice(&port.to_be_bytes());
    Some((k, alen + 8))
}

/// The key of a host set's element: the address of a host net of the
/// table's family.
pub fn host_key(family: TableFamily, e: &SetElement) -> Option<([u8; 24], usize)> {
    let SetElement::Net(net) = e else {
        return None;
    };
    if net.prefix_len() != net.max_prefix_len() {
        return None;
    }
    let mut k = [0u8; 24];
    let len = match (family, net.addr()) {
        (TableFamily::Ip, IpAddr::V4(a)) => {
            k[..4].copy_from_slice(&a.octets());
            4
        }
        (TableFamily::Ip6, IpAddr::V6(a)) => {
            k[..16].copy_from_slice(&a.octets());
            16
        }
        _ => return None,
    };
    Some((k, len))
}

/// The key of a mark set's element: the mark (host byte order, as the
/// kernel's register holds it), with protocol and port (each field padded
/// to 4 bytes) in a `MarkPort` set.
pub fn mark_key(_: TableFamily, e: &SetElement) -> Option<([u8; 24], usize)> {
    let mut k = [0u8; 24];
    match e {
        SetElement::Mark(mark) => {
            k[..4].copy_from_slice(&mark.to_ne_bytes());
            Some((k, 4))
        }
        SetElement::MarkPort(mark, proto, port) => {
            k[..4].copy_from_slice(&mark.to_ne_bytes());
            k[4] = *proto;
            k[8..10].copy_from_slice(&port.to_be_bytes());
            Some((k, 12))
        }
        _ => None,
    }
}

/// Elements of a set without intervals (named-port, host and mark sets):
/// one key each.
pub fn plain_elems<'a>(
    family: TableFamily,
    key: SetKey,
    set: &str,
    elems: impl IntoIterator<Item = &'a SetElement>,
) -> Result<Vec<RawElem>, Error> {
    let key_of = match key {
        SetKey::Host => host_key,
        SetKey::Mark | SetKey::MarkPort => mark_key,
        _ => named_port_key,
    };
    elems
        .into_iter()
        .map(|e| match key_of(family, e) {
            Some((k, len)) => Ok(RawElem::new(&k[..len])),
            None => Err(Error::ElementKind {
                object: format!("set {set}"),
                element: e.clone(),
                key,
            }),
        })
        .collect()
}

/// An element of verdict map `map`: its key (an interface name, or an
/// address of the table's family, as text) and verdict.
pub fn map_elem(
    family: TableFamily,
    map: &VerdictMap,
    key: &str,
    verdict: &Verdict,
) -> Result<RawElem, Error> {
    let object = || format!("map {}", map.name);
    let (code, chain) = verdict_code(verdict).ok_or_else(|| Error::MapVerdict {
        object: object(),
        verdict: verdict.clone(),
    })?;
    let mut e = match map.key {
        MapKey::IfName => {
            if key.is_empty() || key.len() >= IFNAMSIZ || key.contains('\0') {
                return Err(Error::InterfaceName {
                    object: object(),
                    name: key.to_owned(),
                });
            }
            RawElem::new(&ifname_bytes(key))
        }
        MapKey::Addr => {
            // Only the spelling read-back gives: another one ("::ffff:…",
            // leading zeros) would read back as a different key.
            let addr = key.parse::<IpAddr>().ok().filter(|a| a.to_string() == key);
            let host = addr.map(|a| SetElement::Net(IpNet::from(a)));
            match host.as_ref().and_then(|h| host_key(family, h)) {
                Some((k, len)) => RawElem::new(&k[..len]),
                None => {
                    return Err(Error::MapKey {
                        object: object(),
                        key: key.to_owned(),
                        family: family.keyword(),
                    })
                }
            }
        }
    };
    e.verdict = Some((code, chain.map(str::to_owned)));
    Ok(e)
}

/// Largest `NFTA_SET_ELEM_LIST_ELEMENTS` nest we write: the 16-bit
/// attribute length caps it at 64 KiB (≈ 2,000 IPv4 interval elements or
/// ≈ 1,000 concatenations per message), keep a margin.
const ELEMENTS_NEST_LIMIT: usize = 60_000;

/// `NEWSETELEM`/`DELSETELEM` messages for `elems`, split so each message's
/// element nest stays under 64 KiB.
pub fn elements(
    b: &mut Batch,
    t: u8,
    family: TableFamily,
    table: &str,
    set: &str,
    elems: &[RawElem],
) -> Result<(), Error> {
    if elems.is_empty() {
        return Ok(());
    }
    let delete = t == NFT_MSG_DELSETELEM;
    let set_id = b.set_id(family, table, set);
    let begin = |b: &mut Batch| -> usize {
        b.begin(t, if delete { 0 } else { NLM_F_CREATE }, family);
        b.w.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.w.put_str(NFTA_SET_ELEM_LIST_SET, set);
        if let Some(id) = set_id {
            b.w.put_u32_be(NFTA_SET_ELEM_LIST_SET_ID, id);
        }
        b.w.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS)
    };
    let mut nest = begin(b);
    let mut in_msg = 0usize;
    for e in elems {
        let pos = b.w.len();
        write_elem(&mut b.w, e, delete);
        if b.w.len() - nest > ELEMENTS_NEST_LIMIT && in_msg > 0 {
            b.w.truncate(pos);
            b.w.nest_end(nest);
            b.end();
            nest = begin(b);
            in_msg = 0;
            write_elem(&mut b.w, e, delete);
        }
        in_msg += 1;
    }
    b.w.nest_end(nest);
    b.end();
    if b.w.overflowed() {
        return Err(Error::TooLarge {
            object: format!("elements of set {set}"),
        });
    }
    Ok(())
}

fn write_elem(w: &mut Writer, e: &RawElem, delete: bool) {
    let el = w.nest_start(NFTA_LIST_ELEM);
    if e.interval_end {
        w.put_u32_be(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
    }
    let k = w.nest_start(NFTA_SET_ELEM_KEY);
    w.put(NFTA_DATA_VALUE, e.key());
    w.nest_end(k);
    if !delete {
        if let Some((code, chain)) = &e.verdict {
            let d = w.nest_start(NFTA_SET_ELEM_DATA);
            put_verdict(w, *code, chain.as_deref());
            w.nest_end(d);
        }
        if e.open {
            let mut ud = Vec::with_capacity(6);
            udata_u32(
                &mut ud,
                NFTNL_UDATA_SET_ELEM_FLAGS,
                NFTNL_SET_ELEM_F_INTERVAL_OPEN,
            );
            w.put(NFTA_SET_ELEM_USERDATA, &ud);
        }
    }
    w.nest_end(el);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a rejected message is reported as: read back from the bytes
    /// of each kind of message we send (the batch keeps no names).
    #[test]
    fn each_message_names_its_object() {
        let mut b = Batch::new();
        let (f, t) = (TableFamily::Ip6, "nftpolicy-g2");
        new_table(&mut b, f, t);
        let chain = Chain {
            name: "cali-pi-x".into(),
            base: None,
            rules: Vec::new().into(),
        };
        new_chain(&mut b, f, t, &chain).unwrap();
        let rule = Rule {
            verdict: Some(Verdict::Accept),
            comment: Some("Policy x ingress rule 3".into()),
            ..Default::default()
        };
        new_rule(&mut b, f, t, "cali-pi-x", 7, &rule, Place::End, false).unwrap();
        let plain = Rule {
            verdict: Some(Verdict::Drop),
            ..Default::default()
        };
        new_rule(&mut b, f, t, "cali-pi-x", 8, &plain, Place::End, false).unwrap();
        let set = Set {
            name: "cali60s-abc".into(),
            key: SetKey::Host,
            elements: vec![SetElement::Net("fd00:198:18::1/128".parse().unwrap())].into(),
            comment: None,
        };
        new_set(&mut b, f, t, &set).unwrap();
        let raw = plain_elems(f, set.key, &set.name, set.elements.iter()).unwrap();
        elements(&mut b, NFT_MSG_NEWSETELEM, f, t, "cali60s-abc", &raw).unwrap();
        del_rule(&mut b, f, t, "cali-pi-x", 12);
        flush_chain(&mut b, f, t, "cali-pi-y");
        del_chain(&mut b, f, t, "cali-pi-y");
        del_set(&mut b, f, t, "cali60s-old");
        destroy_table(&mut b, TableFamily::Ip, "nftpolicy-g1");
        b.finish();
        let subjects: Vec<String> = (0..b.msgs.len())
            .map(|i| b.subject(i).to_string())
            .collect();
        assert_eq!(
            subjects,
            [
                "the batch framing",
                "table ip6 nftpolicy-g2",
                "chain ip6 nftpolicy-g2 cali-pi-x",
                "rule #7 of chain ip6 nftpolicy-g2 cali-pi-x (comment \"Policy x ingress rule 3\")",
                "rule #8 of chain ip6 nftpolicy-g2 cali-pi-x",
                "set ip6 nftpolicy-g2 cali60s-abc",
                "elements of set ip6 nftpolicy-g2 cali60s-abc",
                "chain ip6 nftpolicy-g2 cali-pi-x",
                "chain ip6 nftpolicy-g2 cali-pi-y",
                "chain ip6 nftpolicy-g2 cali-pi-y",
                "set ip6 nftpolicy-g2 cali60s-old",
                "table ip nftpolicy-g1",
                "the batch framing",
            ]
        );
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(&prefix_mask(12, 4)[..4], &[0xff, 0xf0, 0, 0]);
        assert_eq!(&prefix_mask(0, 4)[..4], &[0, 0, 0, 0]);
        assert_eq!(
            &prefix_mask(47, 16)[..6],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]
        );
    }

    #[test]
    fn intervals_and_zero_element() {
        let set = Set {
            name: "s".into(),
            key: SetKey::Addr,
            elements: vec![
                SetElement::Net("198.18.0.0/16".parse().unwrap()),
                SetElement::Net("128.0.0.0/1".parse().unwrap()),
            ]
            .into(),
            comment: None,
        };
        let ivs = intervals(TableFamily::Ip, &set).unwrap();
        assert_eq!(
            ivs,
            vec![
                Interval {
                    start: 0x8000_0000,
                    end: None
                },
                Interval {
                    start: 0xc612_0000,
                    end: Some(0xc613_0000)
                },
            ]
        );
        assert!(needs_zero_end(&ivs));
        let raw = interval_elems(4, &ivs, true);
        assert_eq!(raw.len(), 4);
        assert!(raw[0].interval_end && raw[0].key() == [0, 0, 0, 0]);
        assert!(raw[1].open);
        assert_eq!(raw[3].key(), &[198, 19, 0, 0]);
    }

    /// An address-keyed map's key must be an address of the table's family
    /// spelled as read-back spells it; anything else is refused, naming
    /// the map and the key.
    #[test]
    fn address_map_keys_are_checked() {
        let map = VerdictMap {
            name: "peers".into(),
            key: MapKey::Addr,
            elements: Default::default(),
            comment: None,
        };
        let jump = Verdict::Jump("c".into());
        let ok = map_elem(TableFamily::Ip, &map, "198.18.0.1", &jump).unwrap();
        assert_eq!(ok.key(), &[198, 18, 0, 1]);
        assert!(map_elem(TableFamily::Ip6, &map, "fd00:198:18::1", &jump).is_ok());
        for (family, key) in [
            (TableFamily::Ip, "fd00:198:18::1"),
            (TableFamily::Ip6, "198.18.0.1"),
            (TableFamily::Ip6, "fd00:198:18:0::1"),
            (TableFamily::Ip, "cali1234"),
        ] {
            let e = map_elem(family, &map, key, &jump).unwrap_err().to_string();
            assert!(e.contains("map peers") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn named_port_key_layout() {
        let (k, n) = named_port_key(
            TableFamily::Ip,
            &SetElement::NamedPort("198.18.0.1".parse().unwrap(), 6, 80),
        )
        .unwrap();
        assert_eq!(&k[..n], &[198, 18, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
    }
}
