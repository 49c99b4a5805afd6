//! nftables objects → `nft -f` input text, as `nftpolicy render` prints it.
//! The same text is what the benchmark's "nft command line" column loads.

use std::fmt::Write;

use crate::nft::*;

/// The whole ruleset as `nft -f` input.
pub fn render(rs: &Ruleset) -> String {
    let mut out = String::new();
    for t in &rs.tables {
        render_table(t, &mut out);
    }
    out
}

pub fn render_table(t: &Table, out: &mut String) {
    let _ = writeln!(out, "table {} {} {{", t.family.keyword(), t.name);
    for s in t.sets.values() {
        render_set(t.family, s, out);
    }
    for m in t.maps.values() {
        let _ = writeln!(out, "\tmap {} {{", m.name);
        let key = match m.key {
            MapKey::IfName => "ifname",
            MapKey::Addr => addr_type(t.family),
        };
        let _ = writeln!(out, "\t\ttype {key} : verdict");
        if let Some(c) = &m.comment {
            let _ = writeln!(out, "\t\tcomment \"{c}\"");
        }
        if !m.elements.is_empty() {
            let elems: Vec<String> = m
                .elements
                .iter()
                .map(|(k, v)| match m.key {
                    MapKey::IfName => format!("\"{k}\" : {}", verdict(t.family, v)),
                    MapKey::Addr => format!("{k} : {}", verdict(t.family, v)),
                })
                .collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "));
        }
        let _ = writeln!(out, "\t}}");
    }
    for c in t.chains.values() {
        let _ = writeln!(out, "\tchain {} {{", c.name);
        if let Some(b) = &c.base {
            let _ = writeln!(
                out,
                "\t\ttype filter hook {} priority {}; policy {};",
                b.hook.keyword(),
                b.priority,
                match b.policy {
                    ChainPolicy::Accept => "accept",
                    ChainPolicy::Drop => "drop",
                }
            );
        }
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{}", rule(t.family, r));
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
}

fn addr_type(family: TableFamily) -> &'static str {
    match family {
        TableFamily::Ip => "ipv4_addr",
        TableFamily::Ip6 => "ipv6_addr",
    }
}

fn render_set(family: TableFamily, s: &Set, out: &mut String) {
    let addr = addr_type(family);
    let _ = writeln!(out, "\tset {} {{", s.name);
    match s.key {
        SetKey::Addr => {
            let _ = writeln!(out, "\t\ttype {addr}\n\t\tflags interval");
        }
        SetKey::Host => {
            let _ = writeln!(out, "\t\ttype {addr}");
        }
        SetKey::Port => {
            let _ = writeln!(out, "\t\ttype inet_service\n\t\tflags interval");
        }
        SetKey::NamedPort => {
            let _ = writeln!(out, "\t\ttype {addr} . inet_proto . inet_service");
        }
        SetKey::Mark => {
            let _ = writeln!(out, "\t\ttype mark");
        }
        SetKey::MarkPort => {
            let _ = writeln!(out, "\t\ttype mark . inet_proto . inet_service");
        }
    }
    if let Some(c) = &s.comment {
        let _ = writeln!(out, "\t\tcomment \"{c}\"");
    }
    if !s.elements.is_empty() {
        let elems: Vec<String> = s.elements.iter().map(element).collect();
        let mut line = String::new();
        for chunk in elems.chunks(8) {
            if !line.is_empty() {
                line.push_str(",\n\t\t\t     ");
            }
            line.push_str(&chunk.join(", "));
        }
        let _ = writeln!(out, "\t\telements = {{ {line} }}");
    }
    let _ = writeln!(out, "\t}}");
}

/// A set element as `nft -f` input writes it.
pub fn element(e: &SetElement) -> String {
    match e {
        SetElement::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
        SetElement::Net(n) => n.to_string(),
        SetElement::Ports { min, max } if min == max => min.to_string(),
        SetElement::Ports { min, max } => format!("{min}-{max}"),
        SetElement::NamedPort(ip, proto, port) => format!("{ip} . {} . {port}", proto_name(*proto)),
        SetElement::Mark(mark) => format!("{mark:#010x}"),
        SetElement::MarkPort(mark, proto, port) => {
            format!("{mark:#010x} . {} . {port}", proto_name(*proto))
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        n => n.to_string(),
    }
}

fn op(negate: bool) -> &'static str {
    if negate {
        "!= "
    } else {
        ""
    }
}

fn addr_kw(family: TableFamily, dir: Dir) -> String {
    format!(
        "{} {}",
        family.keyword(),
        match dir {
            Dir::Src => "saddr",
            Dir::Dst => "daddr",
        }
    )
}

fn port_kw(dir: Dir) -> &'static str {
    match dir {
        Dir::Src => "th sport",
        Dir::Dst => "th dport",
    }
}

pub fn match_text(family: TableFamily, m: &Match) -> String {
    match m {
        Match::IfName {
            dir,
            name,
            wildcard,
            negate,
        } => format!(
            "{} {}\"{name}{}\"",
            match dir {
                IfDir::In => "iifname",
                IfDir::Out => "oifname",
            },
            op(*negate),
            if *wildcard { "*" } else { "" }
        ),
        Match::CtState(s) => {
            let mut names = Vec::new();
            for (bit, name) in [
                (CtStates::INVALID, "invalid"),
                (CtStates::ESTABLISHED, "established"),
                (CtStates::RELATED, "related"),
                (CtStates::NEW, "new"),
            ] {
                if s.0 & bit.0 != 0 {
                    names.push(name);
                }
            }
            format!("ct state {}", names.join(","))
        }
        // The shortest form nft accepts for each case, so that `nft` turns
        // this text into the same expressions the programmer encodes (the
        // programmer's byte-level oracle test feeds it to `nft`).
        Match::Mark {
            mask: u32::MAX,
            value,
            negate,
        } => format!("meta mark {}{value:#010x}", op(*negate)),
        Match::Mark {
            mask,
            value,
            negate,
        } => format!(
            "meta mark & {mask:#010x} {} {value:#010x}",
            if *negate { "!=" } else { "==" }
        ),
        Match::L4Proto { proto, negate } => {
            format!("meta l4proto {}{}", op(*negate), proto_name(*proto))
        }
        Match::Addr {
            dir,
            target,
            negate,
        } => {
            let t = match target {
                AddrTarget::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
                AddrTarget::Net(n) => n.to_string(),
                AddrTarget::Set(s) => format!("@{s}"),
            };
            format!("{} {}{t}", addr_kw(family, *dir), op(*negate))
        }
        Match::Port {
            dir,
            target,
            negate,
        } => {
            let t = match target {
                PortTarget::Range { min, max } if min == max => min.to_string(),
                PortTarget::Range { min, max } => format!("{min}-{max}"),
                PortTarget::Set(s) => format!("@{s}"),
            };
            format!("{} {}{t}", port_kw(*dir), op(*negate))
        }
        Match::NamedPort { dir, set, negate } => format!(
            "{} . meta l4proto . {} {}@{set}",
            addr_kw(family, *dir),
            port_kw(*dir),
            op(*negate)
        ),
        Match::PeerPort { set, negate } => format!(
            "{} . meta l4proto . {} {}@{set}",
            addr_kw(family, Dir::Src),
            port_kw(Dir::Dst),
            op(*negate)
        ),
        Match::MarkLookup { mask, ports, set } => {
            if *ports {
                format!(
                    "meta mark & {mask:#010x} . meta l4proto . {} @{set}",
                    port_kw(Dir::Dst)
                )
            } else {
                format!("meta mark & {mask:#010x} @{set}")
            }
        }
        Match::Icmp {
            icmp_type,
            code,
            negate,
        } => {
            let kw = match family {
                TableFamily::Ip => "icmp",
                TableFamily::Ip6 => "icmpv6",
            };
            match (code, negate) {
                (None, _) => format!("{kw} type {}{icmp_type}", op(*negate)),
                (Some(c), false) => format!("{kw} type {icmp_type} {kw} code {c}"),
                // not (type and code): compare both bytes at once.
                (Some(c), true) => format!(
                    "@th,0,16 != {:#06x}",
                    (u16::from(*icmp_type) << 8) | u16::from(*c)
                ),
            }
        }
    }
}

fn verdict(family: TableFamily, v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::IfNameVmap { dir, map } => format!(
            "{} vmap @{map}",
            match dir {
                IfDir::In => "iifname",
                IfDir::Out => "oifname",
            }
        ),
        Verdict::AddrVmap { dir, map } => format!("{} vmap @{map}", addr_kw(family, *dir)),
    }
}

pub fn rule(family: TableFamily, r: &Rule) -> String {
    let mut parts: Vec<String> = r.matches.iter().map(|m| match_text(family, m)).collect();
    for s in &r.stmts {
        parts.push(match s {
            Stmt::Counter => "counter".into(),
            Stmt::SetMark { clear, set } => match (clear, set) {
                (0, s) => format!("meta mark set meta mark | {s:#010x}"),
                (c, 0) => format!("meta mark set meta mark & {:#010x}", !c),
                (c, s) if c | s == u32::MAX => format!("meta mark set {s:#010x}"),
                (c, s) => format!("meta mark set meta mark & {:#010x} | {s:#010x}", !c),
            },
            Stmt::Log {
                prefix,
                group,
                rate_per_second,
            } => {
                let mut t = String::new();
                if let Some(r) = rate_per_second {
                    t.push_str(&format!("limit rate {r}/second "));
                }
                t.push_str("log");
                if !prefix.is_empty() {
                    t.push_str(&format!(" prefix \"{prefix}\""));
                }
                if let Some(g) = group {
                    t.push_str(&format!(" group {g}"));
                }
                t
            }
        });
    }
    if let Some(v) = &r.verdict {
        parts.push(verdict(family, v));
    }
    if let Some(c) = &r.comment {
        parts.push(format!("comment \"{c}\""));
    }
    parts.join(" ")
}
