//! nf_tables rule expressions as typed values: the one description of an
//! expression that the encoder and the decoder share.
//!
//! `encode::rule_exprs` lowers an IR rule (`compiler::nft::Rule`) into a
//! sequence of [`Expr`]s and [`Expr::write`]s each (attributes in the order
//! libnftnl writes them, so the bytes are nft's own); `decode::rule` parses
//! a kernel rule's expressions back with [`Expr::parse`], and
//! `decode::decode_exprs` raises a sequence of them back to the IR. The two
//! directions meet in this type, and the tests below hold them to it:
//! every expression parses back to itself, and lowering then raising any
//! canonical IR rule gives the rule back, in memory and through the kernel.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use crate::consts::*;
use crate::nla::{be_u32, be_u64, c_str, AttrIter, Writer};

/// A short byte string held inline (comparison operands, masks, register
/// data): at most 16 bytes, the widest value our rules load (an IPv6
/// address, an interface name).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Data {
    len: u8,
    bytes: [u8; 16],
}

impl Data {
    /// `None` when `b` is longer than 16 bytes (no rule of ours carries
    /// such a value).
    pub fn new(b: &[u8]) -> Option<Data> {
        let mut bytes = [0u8; 16];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Data {
            len: b.len() as u8,
            bytes,
        })
    }

    /// For values the encoder builds, which are never longer.
    pub fn of(b: &[u8]) -> Data {
        Data::new(b).expect("at most 16 bytes")
    }
}

impl Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x")?;
        self.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One nf_tables expression, with the attributes we write or read.
/// Optional attributes are `Option`s: `None` is "not written" (and what a
/// kernel dump without the attribute parses as).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr<'a> {
    /// `meta load <key> => reg <dreg>`.
    MetaLoad { key: u32, dreg: u32 },
    /// `meta set <key> with reg <sreg>`.
    MetaSet { key: u32, sreg: u32 },
    /// `ct load <key> => reg <dreg>` (`direction`: original or reply only).
    CtLoad {
        key: u32,
        dreg: u32,
        direction: Option<u8>,
    },
    /// `cmp <op> reg <sreg> <data>`.
    Cmp { sreg: u32, op: u32, data: Data },
    /// `reg <dreg> = (reg <sreg> & <mask>) ^ <xor>` over `len` bytes. nft
    /// writes `op` for operations on values (`meta mark & …`), not for
    /// prefix masks or flag tests.
    Bitwise {
        sreg: u32,
        dreg: u32,
        op: Option<u32>,
        len: u32,
        mask: Data,
        xor: Data,
    },
    /// `payload load <len>b @ <base> + <offset> => reg <dreg>`.
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    /// `lookup reg <sreg> set <set> [=> reg <dreg>]`; `set_id` names a set
    /// created in the same batch.
    Lookup {
        sreg: u32,
        dreg: Option<u32>,
        set: Cow<'a, str>,
        set_id: Option<u32>,
        flags: Option<u32>,
    },
    /// `range <op> reg <sreg> <from> <to>`.
    Range {
        sreg: u32,
        op: u32,
        from: Data,
        to: Data,
    },
    /// `counter`; a fresh counter writes no values.
    Counter { packets: u64, bytes: u64 },
    /// `log [prefix …] [group …]` and what the kernel reports besides.
    Log {
        prefix: Option<Cow<'a, str>>,
        group: Option<u16>,
        snaplen: Option<u32>,
        qthreshold: Option<u16>,
        level: Option<u32>,
        flags: Option<u32>,
    },
    /// `limit rate <rate>/<unit> burst <burst>`.
    Limit {
        rate: u64,
        unit: u64,
        burst: u32,
        kind: u32,
        flags: u32,
    },
    /// `immediate reg 0 <verdict> [<chain>]`.
    Verdict {
        code: i32,
        chain: Option<Cow<'a, str>>,
    },
    /// `immediate reg <dreg> <data>`.
    Immediate { dreg: u32, data: Data },
    /// An expression we do not write (or one of ours with attributes we do
    /// not write): its name.
    Unknown(Cow<'a, str>),
}

impl Expr<'_> {
    /// The expression's kernel name (`NFTA_EXPR_NAME`).
    pub fn name(&self) -> &str {
        match self {
            Expr::MetaLoad { .. } | Expr::MetaSet { .. } => "meta",
            Expr::CtLoad { .. } => "ct",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Payload { .. } => "payload",
            Expr::Lookup { .. } => "lookup",
            Expr::Range { .. } => "range",
            Expr::Counter { .. } => "counter",
            Expr::Log { .. } => "log",
            Expr::Limit { .. } => "limit",
            Expr::Verdict { .. } | Expr::Immediate { .. } => "immediate",
            Expr::Unknown(n) => n,
        }
    }

    /// Appends the expression as one `NFTA_LIST_ELEM` of a rule's
    /// `NFTA_RULE_EXPRESSIONS`, attributes in libnftnl's order.
    pub fn write(&self, w: &mut Writer) {
        let elem = w.nest_start(NFTA_LIST_ELEM);
        w.put_str(NFTA_EXPR_NAME, self.name());
        let body = w.nest_start(NFTA_EXPR_DATA);
        match self {
            Expr::MetaLoad { key, dreg } => {
                w.put_u32_be(NFTA_META_KEY, *key);
                w.put_u32_be(NFTA_META_DREG, *dreg);
            }
            Expr::MetaSet { key, sreg } => {
                w.put_u32_be(NFTA_META_KEY, *key);
                w.put_u32_be(NFTA_META_SREG, *sreg);
            }
            Expr::CtLoad {
                key,
                dreg,
                direction,
            } => {
                w.put_u32_be(NFTA_CT_KEY, *key);
                w.put_u32_be(NFTA_CT_DREG, *dreg);
                if let Some(d) = direction {
                    w.put(NFTA_CT_DIRECTION, &[*d]);
                }
            }
            Expr::Cmp { sreg, op, data } => {
                w.put_u32_be(NFTA_CMP_SREG, *sreg);
                w.put_u32_be(NFTA_CMP_OP, *op);
                put_value(w, NFTA_CMP_DATA, data);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                op,
                len,
                mask,
                xor,
            } => {
                w.put_u32_be(NFTA_BITWISE_SREG, *sreg);
                w.put_u32_be(NFTA_BITWISE_DREG, *dreg);
                if let Some(op) = op {
                    w.put_u32_be(NFTA_BITWISE_OP, *op);
                }
                w.put_u32_be(NFTA_BITWISE_LEN, *len);
                put_value(w, NFTA_BITWISE_MASK, mask);
                put_value(w, NFTA_BITWISE_XOR, xor);
            }
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => {
                w.put_u32_be(NFTA_PAYLOAD_DREG, *dreg);
                w.put_u32_be(NFTA_PAYLOAD_BASE, *base);
                w.put_u32_be(NFTA_PAYLOAD_OFFSET, *offset);
                w.put_u32_be(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Lookup {
                sreg,
                dreg,
                set,
                set_id,
                flags,
            } => {
                w.put_u32_be(NFTA_LOOKUP_SREG, *sreg);
                if let Some(d) = dreg {
                    w.put_u32_be(NFTA_LOOKUP_DREG, *d);
                }
                w.put_str(NFTA_LOOKUP_SET, set);
                if let Some(id) = set_id {
                    w.put_u32_be(NFTA_LOOKUP_SET_ID, *id);
                }
                if let Some(f) = flags {
                    w.put_u32_be(NFTA_LOOKUP_FLAGS, *f);
                }
            }
            Expr::Range { sreg, op, from, to } => {
                w.put_u32_be(NFTA_RANGE_SREG, *sreg);
                w.put_u32_be(NFTA_RANGE_OP, *op);
                put_value(w, NFTA_RANGE_FROM_DATA, from);
                put_value(w, NFTA_RANGE_TO_DATA, to);
            }
            Expr::Counter { packets, bytes } => {
                if (*packets, *bytes) != (0, 0) {
                    w.put_u64_be(NFTA_COUNTER_BYTES, *bytes);
                    w.put_u64_be(NFTA_COUNTER_PACKETS, *packets);
                }
            }
            Expr::Log {
                prefix,
                group,
                snaplen,
                qthreshold,
                level,
                flags,
            } => {
                if let Some(p) = prefix {
                    w.put_str(NFTA_LOG_PREFIX, p);
                }
                if let Some(g) = group {
                    w.put_u16_be(NFTA_LOG_GROUP, *g);
                }
                if let Some(s) = snaplen {
                    w.put_u32_be(NFTA_LOG_SNAPLEN, *s);
                }
                if let Some(q) = qthreshold {
                    w.put_u16_be(NFTA_LOG_QTHRESHOLD, *q);
                }
                if let Some(l) = level {
                    w.put_u32_be(NFTA_LOG_LEVEL, *l);
                }
                if let Some(f) = flags {
                    w.put_u32_be(NFTA_LOG_FLAGS, *f);
                }
            }
            Expr::Limit {
                rate,
                unit,
                burst,
                kind,
                flags,
            } => {
                w.put_u64_be(NFTA_LIMIT_RATE, *rate);
                w.put_u64_be(NFTA_LIMIT_UNIT, *unit);
                w.put_u32_be(NFTA_LIMIT_BURST, *burst);
                w.put_u32_be(NFTA_LIMIT_TYPE, *kind);
                w.put_u32_be(NFTA_LIMIT_FLAGS, *flags);
            }
            Expr::Verdict { code, chain } => {
                w.put_u32_be(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                let d = w.nest_start(NFTA_IMMEDIATE_DATA);
                put_verdict(w, *code, chain.as_deref());
                w.nest_end(d);
            }
            Expr::Immediate { dreg, data } => {
                w.put_u32_be(NFTA_IMMEDIATE_DREG, *dreg);
                put_value(w, NFTA_IMMEDIATE_DATA, data);
            }
            Expr::Unknown(_) => {}
        }
        w.nest_end(body);
        w.nest_end(elem);
    }

    /// Parses one `NFTA_LIST_ELEM` of a rule's `NFTA_RULE_EXPRESSIONS`.
    pub fn parse_elem(elem: &[u8]) -> Expr<'static> {
        let mut name = String::new();
        let mut data: &[u8] = &[];
        for (k, v) in AttrIter::new(elem) {
            match k {
                NFTA_EXPR_NAME => name = c_str(v),
                NFTA_EXPR_DATA => data = v,
                _ => {}
            }
        }
        Expr::parse(&name, data)
    }

    /// Parses the `NFTA_EXPR_DATA` of an expression named `name`. What is
    /// not one of the shapes above (a payload write, a bitwise shift, a
    /// value longer than 16 bytes) becomes [`Expr::Unknown`].
    pub fn parse(name: &str, data: &[u8]) -> Expr<'static> {
        let a = Attrs::new(data);
        let parsed = match name {
            "meta" => match (
                a.u32(NFTA_META_KEY),
                a.u32(NFTA_META_DREG),
                a.u32(NFTA_META_SREG),
            ) {
                (Some(key), Some(dreg), None) => Some(Expr::MetaLoad { key, dreg }),
                (Some(key), None, Some(sreg)) => Some(Expr::MetaSet { key, sreg }),
                _ => None,
            },
            "cmp" => (|| {
                Some(Expr::Cmp {
                    sreg: a.u32(NFTA_CMP_SREG)?,
                    op: a.u32(NFTA_CMP_OP)?,
                    data: a.value(NFTA_CMP_DATA)?,
                })
            })(),
            "bitwise" if !a.has(NFTA_BITWISE_DATA) => (|| {
                Some(Expr::Bitwise {
                    sreg: a.u32(NFTA_BITWISE_SREG)?,
                    dreg: a.u32(NFTA_BITWISE_DREG)?,
                    op: a.u32(NFTA_BITWISE_OP),
                    len: a.u32(NFTA_BITWISE_LEN)?,
                    mask: a.value(NFTA_BITWISE_MASK)?,
                    xor: a.value(NFTA_BITWISE_XOR)?,
                })
            })(),
            "payload" if !a.has(NFTA_PAYLOAD_SREG) => (|| {
                Some(Expr::Payload {
                    dreg: a.u32(NFTA_PAYLOAD_DREG)?,
                    base: a.u32(NFTA_PAYLOAD_BASE)?,
                    offset: a.u32(NFTA_PAYLOAD_OFFSET)?,
                    len: a.u32(NFTA_PAYLOAD_LEN)?,
                })
            })(),
            "lookup" => (|| {
                Some(Expr::Lookup {
                    sreg: a.u32(NFTA_LOOKUP_SREG)?,
                    dreg: a.u32(NFTA_LOOKUP_DREG),
                    set: Cow::Owned(c_str(a.get(NFTA_LOOKUP_SET)?)),
                    set_id: a.u32(NFTA_LOOKUP_SET_ID),
                    flags: a.u32(NFTA_LOOKUP_FLAGS),
                })
            })(),
            "immediate" => (|| {
                let dreg = a.u32(NFTA_IMMEDIATE_DREG)?;
                let (k, v) = AttrIter::new(a.get(NFTA_IMMEDIATE_DATA)?).next()?;
                match (dreg, k) {
                    (NFT_REG_VERDICT, NFTA_DATA_VERDICT) => {
                        let (code, chain) = verdict_data(v)?;
                        Some(Expr::Verdict {
                            code,
                            chain: chain.map(Cow::Owned),
                        })
                    }
                    (_, NFTA_DATA_VALUE) => Some(Expr::Immediate {
                        dreg,
                        data: Data::new(v)?,
                    }),
                    _ => None,
                }
            })(),
            "ct" => (|| {
                Some(Expr::CtLoad {
                    key: a.u32(NFTA_CT_KEY)?,
                    dreg: a.u32(NFTA_CT_DREG)?,
                    direction: a.get(NFTA_CT_DIRECTION).and_then(|v| v.first().copied()),
                })
            })(),
            "counter" => Some(Expr::Counter {
                packets: a.get(NFTA_COUNTER_PACKETS).and_then(be_u64).unwrap_or(0),
                bytes: a.get(NFTA_COUNTER_BYTES).and_then(be_u64).unwrap_or(0),
            }),
            "range" => (|| {
                Some(Expr::Range {
                    sreg: a.u32(NFTA_RANGE_SREG)?,
                    op: a.u32(NFTA_RANGE_OP)?,
                    from: a.value(NFTA_RANGE_FROM_DATA)?,
                    to: a.value(NFTA_RANGE_TO_DATA)?,
                })
            })(),
            "log" => Some(Expr::Log {
                prefix: a.get(NFTA_LOG_PREFIX).map(|v| Cow::Owned(c_str(v))),
                group: a.u16(NFTA_LOG_GROUP),
                snaplen: a.u32(NFTA_LOG_SNAPLEN),
                qthreshold: a.u16(NFTA_LOG_QTHRESHOLD),
                level: a.u32(NFTA_LOG_LEVEL),
                flags: a.u32(NFTA_LOG_FLAGS),
            }),
            "limit" => (|| {
                Some(Expr::Limit {
                    rate: be_u64(a.get(NFTA_LIMIT_RATE)?)?,
                    unit: be_u64(a.get(NFTA_LIMIT_UNIT)?)?,
                    burst: a.u32(NFTA_LIMIT_BURST).unwrap_or(0),
                    kind: a.u32(NFTA_LIMIT_TYPE).unwrap_or(0),
                    flags: a.u32(NFTA_LIMIT_FLAGS).unwrap_or(0),
                })
            })(),
            _ => None,
        };
        parsed.unwrap_or_else(|| Expr::Unknown(Cow::Owned(name.to_owned())))
    }
}

/// `NFTA_DATA_VALUE` nested in attribute `attr`.
fn put_value(w: &mut Writer, attr: u16, value: &[u8]) {
    let n = w.nest_start(attr);
    w.put(NFTA_DATA_VALUE, value);
    w.nest_end(n);
}

/// `NFTA_DATA_VERDICT { CODE, [CHAIN] }`.
pub(crate) fn put_verdict(w: &mut Writer, code: i32, chain: Option<&str>) {
    let v = w.nest_start(NFTA_DATA_VERDICT);
    w.put_u32_be(NFTA_VERDICT_CODE, code as u32);
    if let Some(c) = chain {
        w.put_str(NFTA_VERDICT_CHAIN, c);
    }
    w.nest_end(v);
}

/// `NFTA_DATA_VERDICT` contents: code and chain.
pub(crate) fn verdict_data(v: &[u8]) -> Option<(i32, Option<String>)> {
    let mut code = None;
    let mut chain = None;
    for (k, x) in AttrIter::new(v) {
        match k {
            NFTA_VERDICT_CODE => code = be_u32(x).map(|c| c as i32),
            NFTA_VERDICT_CHAIN => chain = Some(c_str(x)),
            _ => {}
        }
    }
    code.map(|c| (c, chain))
}

/// The `NFTA_DATA_VALUE` inside a raw `NFTA_*_DATA` nest.
pub(crate) fn nested_value(v: &[u8]) -> Option<&[u8]> {
    AttrIter::new(v)
        .find(|(k, _)| *k == NFTA_DATA_VALUE)
        .map(|(_, v)| v)
}

/// An expression's attributes indexed by type (all expression attribute
/// types we read are < 16).
struct Attrs<'a>([Option<&'a [u8]>; 16]);

impl<'a> Attrs<'a> {
    fn new(data: &'a [u8]) -> Self {
        let mut a = [None; 16];
        for (k, v) in AttrIter::new(data) {
            if let Some(slot) = a.get_mut(k as usize) {
                *slot = Some(v);
            }
        }
        Attrs(a)
    }

    fn get(&self, k: u16) -> Option<&'a [u8]> {
        self.0.get(k as usize).copied().flatten()
    }

    fn u32(&self, k: u16) -> Option<u32> {
        be_u32(self.get(k)?)
    }

    fn u16(&self, k: u16) -> Option<u16> {
        Some(u16::from_be_bytes(self.get(k)?.get(..2)?.try_into().ok()?))
    }

    fn has(&self, k: u16) -> bool {
        self.get(k).is_some()
    }

    /// The `NFTA_DATA_VALUE` inside nested data attribute `k`.
    fn value(&self, k: u16) -> Option<Data> {
        Data::new(nested_value(self.get(k)?)?)
    }
}

#[cfg(test)]
mod tests {
    //! The encoder and the decoder agree: every expression parses back from
    //! its bytes, and lowering any canonical IR rule (see the crate docs)
    //! and raising it again gives the rule back — in memory for thousands of
    //! generated rules, and through the kernel (apply, read back) in a
    //! network namespace the test creates.

    use super::*;
    use crate::decode::decode_exprs;
    use crate::encode::rule_exprs;
    use compiler::nft::*;
    use ipnet::IpNet;

    /// xorshift64*: a seeded generator, so a failing case is reproducible
    /// from the seed printed with it.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn coin(&mut self) -> bool {
            self.below(2) == 0
        }
        fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
            &items[self.below(items.len() as u64) as usize]
        }
        /// A word of up to `max - 1` characters.
        fn word(&mut self, max: u64) -> String {
            let len = self.below(max);
            (0..len)
                .map(|_| *self.pick(b"abcdefghijklmnopqrstuvwxyz0123456789-") as char)
                .collect()
        }
    }

    const ADDR_SET: &str = "addrs";
    const PORT_SET: &str = "ports";
    const NAMED_SET: &str = "named";
    const MAP: &str = "dispatch";
    const MARK_SET: &str = "marks";
    const MARK_PORT_SET: &str = "mark-ports";
    const ADDR_MAP: &str = "by-addr";
    const TARGETS: [&str; 2] = ["target-a", "target-b"];

    fn dir(rng: &mut Rng) -> Dir {
        *rng.pick(&[Dir::Src, Dir::Dst])
    }

    fn if_dir(rng: &mut Rng) -> IfDir {
        *rng.pick(&[IfDir::In, IfDir::Out])
    }

    /// A network of `family` with a random prefix, host bits cleared.
    fn net(rng: &mut Rng, family: TableFamily) -> IpNet {
        let n: IpNet = if family.is_v6() {
            let bits = ((rng.next() as u128) << 64) | rng.next() as u128;
            let prefix = rng.below(129) as u8;
            ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(bits), prefix)
                .unwrap()
                .into()
        } else {
            let prefix = rng.below(33) as u8;
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(rng.next() as u32), prefix)
                .unwrap()
                .into()
        };
        n.trunc()
    }

    /// A rule in the canonical IR form (what read-back produces): matches,
    /// then statements, then the verdict; ICMP after its protocol; port
    /// matches never after an ICMP protocol match; marks set with
    /// `clear & set == 0`. `kernel`: only what a namespace can load (logs
    /// go to an NFLOG group).
    fn rule(rng: &mut Rng, family: TableFamily, kernel: bool) -> Rule {
        let mut matches = Vec::new();
        let icmp = if family.is_v6() { 58 } else { 1 };
        for _ in 0..rng.below(5) {
            let negate = rng.below(4) == 0;
            matches.push(match rng.below(8) {
                0 => Match::IfName {
                    dir: if_dir(rng),
                    name: format!("cali{}", rng.word(12)),
                    wildcard: rng.coin(),
                    negate,
                },
                1 => Match::CtState(CtStates(1 + rng.below(15) as u32)),
                2 => {
                    let mask = if rng.coin() {
                        u32::MAX
                    } else {
                        rng.next() as u32 | 1
                    };
                    Match::Mark {
                        mask,
                        value: rng.next() as u32 & mask,
                        negate,
                    }
                }
                3 => Match::Addr {
                    dir: dir(rng),
                    target: if rng.coin() {
                        AddrTarget::Net(net(rng, family))
                    } else {
                        AddrTarget::Set(ADDR_SET.into())
                    },
                    negate,
                },
                4 if rng.coin() => Match::PeerPort {
                    set: NAMED_SET.into(),
                    negate,
                },
                4 => Match::NamedPort {
                    dir: dir(rng),
                    set: NAMED_SET.into(),
                    negate,
                },
                5 => {
                    let ports = rng.coin();
                    Match::MarkLookup {
                        mask: rng.next() as u32 | 1,
                        ports,
                        set: if ports { MARK_PORT_SET } else { MARK_SET }.into(),
                    }
                }
                _ => Match::L4Proto {
                    proto: *rng.pick(&[6, 17, 132]),
                    negate,
                },
            });
        }
        match rng.below(3) {
            0 => {
                matches.push(Match::L4Proto {
                    proto: *rng.pick(&[6, 17]),
                    negate: false,
                });
                let (min, max) = (rng.below(65536) as u16, rng.below(65536) as u16);
                matches.push(Match::Port {
                    dir: dir(rng),
                    target: if rng.coin() {
                        PortTarget::Range {
                            min: min.min(max),
                            max: if rng.coin() {
                                min.min(max)
                            } else {
                                min.max(max)
                            },
                        }
                    } else {
                        PortTarget::Set(PORT_SET.into())
                    },
                    negate: rng.below(4) == 0,
                });
            }
            1 => {
                matches.push(Match::L4Proto {
                    proto: icmp,
                    negate: false,
                });
                matches.push(Match::Icmp {
                    icmp_type: rng.below(256) as u8,
                    code: rng.coin().then(|| rng.below(256) as u8),
                    negate: rng.below(4) == 0,
                });
            }
            _ => {}
        }
        let mut stmts = Vec::new();
        for _ in 0..rng.below(3) {
            stmts.push(match rng.below(3) {
                0 => Stmt::Counter,
                1 => {
                    let set = rng.next() as u32;
                    let clear = if rng.coin() {
                        !set
                    } else {
                        rng.next() as u32 & !set
                    };
                    Stmt::SetMark { clear, set }
                }
                _ => Stmt::Log {
                    prefix: if rng.coin() {
                        rng.word(30)
                    } else {
                        String::new()
                    },
                    group: (kernel || rng.coin()).then(|| rng.below(65536) as u16),
                    rate_per_second: rng.coin().then(|| 1 + rng.below(1000) as u32),
                },
            });
        }
        let verdict = match rng.below(8) {
            0 => None,
            1 => Some(Verdict::Accept),
            2 => Some(Verdict::Drop),
            3 => Some(Verdict::Return),
            4 => Some(Verdict::Jump(rng.pick(&TARGETS).to_string())),
            5 => Some(Verdict::Goto(rng.pick(&TARGETS).to_string())),
            6 => Some(Verdict::AddrVmap {
                dir: dir(rng),
                map: ADDR_MAP.into(),
            }),
            _ => Some(Verdict::IfNameVmap {
                dir: if_dir(rng),
                map: MAP.into(),
            }),
        };
        Rule {
            matches,
            stmts,
            verdict,
            comment: rng.coin().then(|| format!("c{}", rng.word(40))),
        }
    }

    /// `rule` lowered to expressions, written, parsed back one by one.
    fn lower_write_parse(family: TableFamily, rule: &Rule) -> Vec<Expr<'static>> {
        let mut exprs = Vec::new();
        rule_exprs(family, rule, &|_| None, &String::new, &mut |e| {
            exprs.push(write_parse(&e))
        })
        .expect("a canonical rule encodes");
        exprs
    }

    /// `e` written, then parsed back (which must give `e`).
    fn write_parse(e: &Expr<'_>) -> Expr<'static> {
        let mut w = Writer::default();
        e.write(&mut w);
        let (_, elem) = AttrIter::new(&w.buf).next().unwrap();
        let parsed = Expr::parse_elem(elem);
        assert_eq!(&parsed, e, "expression does not parse back from its bytes");
        parsed
    }

    #[test]
    fn every_expression_parses_back_from_its_bytes() {
        let samples = [
            Expr::CtLoad {
                key: NFT_CT_STATE,
                dreg: NFT_REG_1,
                direction: Some(1),
            },
            Expr::Counter {
                packets: 3,
                bytes: 180,
            },
            Expr::Log {
                prefix: Some("p".into()),
                group: Some(2),
                snaplen: Some(64),
                qthreshold: Some(1),
                level: Some(4),
                flags: Some(0),
            },
            Expr::Lookup {
                sreg: NFT_REG_1,
                dreg: Some(NFT_REG_VERDICT),
                set: "m".into(),
                set_id: Some(7),
                flags: Some(NFT_LOOKUP_F_INV),
            },
        ];
        for e in samples {
            write_parse(&e);
        }
    }

    #[test]
    fn lowering_then_raising_gives_every_canonical_rule_back() {
        for seed in 1..=3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for family in [TableFamily::Ip, TableFamily::Ip6] {
                let r = rule(&mut rng, family, false);
                let exprs = lower_write_parse(family, &r);
                let (matches, stmts, verdict) = decode_exprs(family, &exprs)
                    .unwrap_or_else(|| panic!("seed {seed}: {r:?} does not decode: {exprs:?}"));
                assert_eq!(
                    Rule {
                        matches,
                        stmts,
                        verdict,
                        comment: r.comment.clone(),
                    },
                    r,
                    "seed {seed}: {exprs:?}"
                );
            }
        }
    }

    #[test]
    fn generated_rules_round_trip_through_the_kernel() {
        let _ns = testkit::netns::Netns::enter("expr-rt").expect("a test netns (needs root)");
        let mut p = crate::NftProgrammer::new().unwrap();
        let mut rng = Rng(0x5eed);
        for round in 0..5 {
            let mut rs = Ruleset::default();
            for family in [TableFamily::Ip, TableFamily::Ip6] {
                let mut t = Table::new(family, TABLE_NAME);
                for (name, key) in [
                    (ADDR_SET, SetKey::Addr),
                    (PORT_SET, SetKey::Port),
                    (NAMED_SET, SetKey::NamedPort),
                    (MARK_SET, SetKey::Mark),
                    (MARK_PORT_SET, SetKey::MarkPort),
                ] {
                    t.sets.insert(
                        name.into(),
                        Set {
                            name: name.into(),
                            key,
                            elements: Vec::new().into(),
                            comment: None,
                        },
                    );
                }
                for (name, key) in [(MAP, MapKey::IfName), (ADDR_MAP, MapKey::Addr)] {
                    t.maps.insert(
                        name.into(),
                        VerdictMap {
                            name: name.into(),
                            key,
                            elements: Default::default(),
                            comment: None,
                        },
                    );
                }
                for name in TARGETS {
                    t.chains.insert(
                        name.into(),
                        Chain {
                            name: name.into(),
                            base: None,
                            rules: Vec::new().into(),
                        },
                    );
                }
                for c in 0..4 {
                    let name = format!("chain-{c}");
                    let rules = (0..25).map(|_| rule(&mut rng, family, true)).collect();
                    t.chains.insert(
                        name.clone(),
                        Chain {
                            name,
                            base: None,
                            rules,
                        },
                    );
                }
                rs.tables.push(t);
            }
            p.apply(&rs)
                .unwrap_or_else(|e| panic!("round {round}: the kernel refused: {e}"));
            for t in &rs.tables {
                let back = p.read_back(t.family, TABLE_NAME).unwrap().unwrap();
                for (name, chain) in &t.chains {
                    for (i, (got, want)) in
                        back.chains[name].rules.iter().zip(&chain.rules).enumerate()
                    {
                        assert_eq!(
                            got,
                            want,
                            "round {round}: {} chain {name} rule #{i}",
                            t.family.keyword()
                        );
                    }
                }
                assert_eq!(&back, t, "round {round}");
            }
        }
    }
}
