//! Shared by the integration tests: a sample IR using every match,
//! statement and verdict kind (a golden file, `golden/sample-ruleset.yaml`)
//! and a parser for `nft --debug=mnl` output. The oracle tests feed `nft`
//! the compiler's nft text (`compiler::render_nft`), which knows nothing of
//! the netlink encoder.

#![allow(dead_code)]

use compiler::nft::*;
use programmer::NftProgrammer;
use testkit::netns::Netns;

/// Enters a fresh namespace and opens a programmer in it.
pub fn setup(tag: &str) -> (Netns, NftProgrammer) {
    let ns = Netns::enter(tag).expect("create test netns (needs root and iproute2)");
    let p = NftProgrammer::new().expect("open netlink socket");
    (ns, p)
}

/// Whether the `nft` binary is there for what the test uses it for
/// (`role`); says so on stderr when it is not.
pub fn nft_for(role: &str) -> bool {
    let ok = testkit::netns::nft_available();
    if !ok {
        eprintln!("skipping: the nft binary ({role}) is not installed");
    }
    ok
}

/// [`setup`], with [`sample_ruleset`] applied; returns it.
pub fn setup_sample(tag: &str) -> (Netns, NftProgrammer, Ruleset) {
    let (ns, mut p) = setup(tag);
    let rs = sample_ruleset();
    p.apply(&rs).unwrap();
    (ns, p, rs)
}

/// Both of our tables as the kernel holds them.
pub fn snapshot(p: &mut NftProgrammer) -> (Option<Table>, Option<Table>) {
    (
        p.read_back(TableFamily::Ip, TABLE_NAME).unwrap(),
        p.read_back(TableFamily::Ip6, TABLE_NAME).unwrap(),
    )
}

/// `rs` in read-back form (see `programmer::canonical`).
pub fn canonical(rs: &Ruleset) -> Ruleset {
    Ruleset {
        tables: rs.tables.iter().map(programmer::canonical).collect(),
    }
}

/// What someone else does behind our back: deletes an element of the
/// sample ruleset's `ip` set `addrs` with `nft`.
pub fn delete_an_element(ns: &Netns) {
    ns.nft(&[
        "delete",
        "element",
        "ip",
        TABLE_NAME,
        "addrs",
        "{ 198.19.1.0/24 }",
    ])
    .unwrap();
}

/// The `family` table of `rs`.
/// The kernel's rejection of a transaction: the failing message's kind,
/// the errno and the object it names; panics on any other error.
#[track_caller]
pub fn rejected(err: &programmer::Error) -> (&'static str, i32, String) {
    match err {
        programmer::Error::Transaction {
            kind,
            errno,
            object,
            ..
        } => (kind, *errno, object.clone()),
        other => panic!("expected the kernel to reject the transaction, got {other:?}"),
    }
}

pub fn table_mut(rs: &mut Ruleset, family: TableFamily) -> &mut Table {
    rs.tables
        .iter_mut()
        .find(|t| t.family == family)
        .expect("the ruleset has a table of that family")
}

pub fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

pub fn rule(
    matches: Vec<Match>,
    stmts: Vec<Stmt>,
    verdict: Option<Verdict>,
    comment: &str,
) -> Rule {
    Rule {
        matches,
        stmts,
        verdict,
        comment: (!comment.is_empty()).then(|| comment.to_owned()),
    }
}

pub fn chain(name: &str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.to_owned(),
        base: None,
        rules: rules.into(),
    }
}

pub fn base_chain(
    name: &str,
    hook: Hook,
    priority: i32,
    policy: ChainPolicy,
    rules: Vec<Rule>,
) -> Chain {
    Chain {
        name: name.to_owned(),
        base: Some(BaseChain {
            hook,
            priority,
            policy,
        }),
        rules: rules.into(),
    }
}

pub fn l4(proto: u8) -> Match {
    Match::L4Proto {
        proto,
        negate: false,
    }
}

pub fn dport(min: u16, max: u16, negate: bool) -> Match {
    Match::Port {
        dir: Dir::Dst,
        target: PortTarget::Range { min, max },
        negate,
    }
}

pub fn addr(dir: Dir, s: &str, negate: bool) -> Match {
    Match::Addr {
        dir,
        target: AddrTarget::Net(net(s)),
        negate,
    }
}

pub fn addr_set(dir: Dir, s: &str, negate: bool) -> Match {
    Match::Addr {
        dir,
        target: AddrTarget::Set(s.to_owned()),
        negate,
    }
}

pub fn ifname(dir: IfDir, name: &str, wildcard: bool, negate: bool) -> Match {
    Match::IfName {
        dir,
        name: name.to_owned(),
        wildcard,
        negate,
    }
}

/// A ruleset of both families using every IR construct (every match,
/// statement and verdict kind, every set key, intervals to the end of the
/// key space, a verdict map, base chains): the golden file
/// `tests/golden/sample-ruleset.yaml`.
pub fn sample_ruleset() -> Ruleset {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/sample-ruleset.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `family` table of [`sample_ruleset`].
pub fn sample_table(family: TableFamily) -> Table {
    sample_ruleset()
        .tables
        .into_iter()
        .find(|t| t.family == family)
        .expect("both families")
}

// ---------------------------------------------------------------------------
// `nft --debug=mnl` output → messages

/// One message of the batch nft sent: netlink type and payload (nfgenmsg
/// and attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MnlMsg {
    pub msg_type: u16,
    pub payload: Vec<u8>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Rebuilds the raw bytes of every message `nft --debug=mnl` printed.
pub fn parse_mnl(text: &str) -> Vec<MnlMsg> {
    let text = strip_ansi(text);
    let lines: Vec<&str> = text.lines().collect();
    let mut msgs: Vec<MnlMsg> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        if l.contains("message length") {
            let t: Vec<&str> = lines[i + 1].split('|').map(str::trim).collect();
            msgs.push(MnlMsg {
                msg_type: t[1].parse().unwrap(),
                payload: Vec::new(),
            });
            i += 4;
            continue;
        }
        if l.contains("|len |flags| type|") && cells.len() > 3 {
            let len: u16 = cells[1].parse().unwrap();
            let flags = cells[2];
            let mut ty: u16 = cells[3].parse().unwrap();
            if flags.contains('N') {
                ty |= 0x8000;
            }
            if flags.contains('B') {
                ty |= 0x4000;
            }
            let m = msgs.last_mut().unwrap();
            m.payload.extend_from_slice(&len.to_ne_bytes());
            m.payload.extend_from_slice(&ty.to_ne_bytes());
        } else if (l.contains("|      data      |") || l.contains("|  extra header  |"))
            && !msgs.is_empty()
        {
            let bytes: Vec<u8> = cells[1]
                .split_whitespace()
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect();
            msgs.last_mut().unwrap().payload.extend_from_slice(&bytes);
        }
        i += 1;
    }
    msgs
}

/// The messages between BATCH_BEGIN and BATCH_END.
pub fn batch_only(msgs: Vec<MnlMsg>) -> Vec<MnlMsg> {
    let mut out = Vec::new();
    let mut inside = false;
    for m in msgs {
        match m.msg_type {
            0x10 => inside = true,
            0x11 => inside = false,
            _ if inside => out.push(m),
            _ => {}
        }
    }
    out
}
