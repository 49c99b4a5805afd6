//! Our netlink encoding, byte for byte, against what `nft` itself sends for
//! the same ruleset written in nft syntax (captured with `--debug=mnl`).

mod common;

use common::*;
use programmer::NftProgrammer;
use testkit::netns::Netns;

/// Attribute tree for readable diffs.
fn tree(b: &[u8], depth: usize, out: &mut String) {
    let mut o = 0;
    while o + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[o], b[o + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[o + 2], b[o + 3]]);
        if len < 4 || o + len > b.len() {
            out.push_str(&format!("{:w$}<malformed {len}>\n", "", w = depth * 2));
            return;
        }
        let v = &b[o + 4..o + len];
        if ty & 0x8000 != 0 {
            out.push_str(&format!("{:w$}[{}] N\n", "", ty & 0x3fff, w = depth * 2));
            tree(v, depth + 1, out);
        } else {
            let hex: String = v.iter().map(|x| format!("{x:02x}")).collect();
            out.push_str(&format!("{:w$}[{}] {hex}\n", "", ty, w = depth * 2));
        }
        o += (len + 3) & !3;
    }
}

/// libnftnl numbers list elements 1, 2, 3…; the UAPI (and we) say
/// NFTA_LIST_ELEM (1) for each. Renumber runs of nested siblings typed
/// 1..=n to 1 on both sides, recursively.
fn normalize(b: &[u8]) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut o = 0;
    while o + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[o], b[o + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[o + 2], b[o + 3]]);
        if len < 4 || o + len > b.len() {
            return b.to_vec();
        }
        attrs.push((ty, b[o + 4..o + len].to_vec()));
        o += (len + 3) & !3;
    }
    let all_nested = attrs.len() >= 2 && attrs.iter().all(|(t, _)| t & 0x8000 != 0);
    let numbered = attrs
        .iter()
        .enumerate()
        .all(|(i, (t, _))| (t & 0x3fff) as usize == i + 1);
    let mut out = Vec::new();
    for (ty, v) in attrs {
        let ty = if all_nested && numbered { 0x8001 } else { ty };
        let v = if ty & 0x8000 != 0 { normalize(&v) } else { v };
        out.extend_from_slice(&((v.len() + 4) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        let n = v.len();
        out.extend_from_slice(&v);
        out.extend(std::iter::repeat_n(0u8, ((n + 3) & !3) - n));
    }
    out
}

/// nft 1.0.6 adds a `KEY_TYPEOF` userdata TLV (type 3) to `type a . b . c`
/// sets holding just the expression type and an empty nest; we do not
/// write it (nft lists the set the same without it: see roundtrip.rs), so
/// drop it from nft's NEWSET messages before comparing.
fn strip_set_typeof(msg_type: u16, attrs: &[u8]) -> Vec<u8> {
    if msg_type != 0x0a09 {
        return attrs.to_vec();
    }
    let mut out = Vec::new();
    let mut o = 0;
    while o + 4 <= attrs.len() {
        let len = u16::from_ne_bytes([attrs[o], attrs[o + 1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[o + 2], attrs[o + 3]]);
        let mut v = attrs[o + 4..o + len].to_vec();
        if ty == 13 {
            let mut kept = Vec::new();
            let mut i = 0;
            while i + 2 <= v.len() {
                let (t, l) = (v[i], v[i + 1] as usize);
                if t != 3 {
                    kept.extend_from_slice(&v[i..i + 2 + l]);
                }
                i += 2 + l;
            }
            v = kept;
        }
        out.extend_from_slice(&((v.len() + 4) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        let n = v.len();
        out.extend_from_slice(&v);
        out.extend(std::iter::repeat_n(0u8, ((n + 3) & !3) - n));
        o += (len + 3) & !3;
    }
    out
}

/// Sorts each run of `NEWSET`/`NEWSETELEM` messages by the set's name
/// (attribute 2 of both), keeping a set's messages in their order.
fn by_set_name<T>(msgs: &mut [T], msg: impl Fn(&T) -> (u16, &[u8])) {
    let is_set = |t: &T| matches!(msg(t).0, 0x0a09 | 0x0a0c);
    let name = |t: &T| -> Vec<u8> {
        let b = &msg(t).1[4..];
        let mut o = 0;
        while o + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[o], b[o + 1]]) as usize;
            if u16::from_ne_bytes([b[o + 2], b[o + 3]]) == 2 {
                return b[o + 4..o + len].to_vec();
            }
            o += (len.max(4) + 3) & !3;
        }
        Vec::new()
    };
    let mut i = 0;
    while i < msgs.len() {
        let start = i;
        while i < msgs.len() && is_set(&msgs[i]) {
            i += 1;
        }
        msgs[start..i].sort_by_cached_key(|m| name(m));
        i = i.max(start + 1);
    }
}

#[test]
fn sample_ruleset_encodes_like_nft() {
    if !nft_for("the oracle") {
        return;
    }
    let rs = sample_ruleset();
    let script = compiler::render_nft::render(&rs);
    let ns = Netns::enter("bytes").unwrap();
    let (stdout, _) = ns.nft_script(&["--debug=mnl"], &script).unwrap();
    let theirs = batch_only(parse_mnl(&stdout));

    let mut theirs = theirs;
    by_set_name(&mut theirs, |m| (m.msg_type, &m.payload));

    let p = NftProgrammer::new().unwrap();
    let tx = p.plan(&rs).unwrap();
    // We create a new table's sets most used first (nft: in the script's
    // order), with the same ids; compare them in name order.
    let mut ours: Vec<_> = tx.encoded().into_iter().zip(tx.steps()).collect();
    by_set_name(&mut ours, |(m, _)| (m.0, m.1));
    let (ours, steps): (Vec<_>, Vec<_>) = ours.into_iter().unzip();

    let mut mismatches = Vec::new();
    for (i, ((ty, payload), theirs)) in ours.iter().zip(theirs.iter()).enumerate() {
        let a = normalize(&payload[4..]);
        let b = normalize(&strip_set_typeof(theirs.msg_type, &theirs.payload[4..]));
        if *ty != theirs.msg_type || payload[..4] != theirs.payload[..4] || a != b {
            let (mut ta, mut tb) = (String::new(), String::new());
            tree(&a, 1, &mut ta);
            tree(&b, 1, &mut tb);
            mismatches.push(format!(
                "message {i} ({} {}): type ours {ty:#x} nft {:#x}\n--- ours\n{ta}--- nft\n{tb}",
                steps[i].0, steps[i].1, theirs.msg_type
            ));
        }
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "message count differs; steps: {steps:#?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} messages differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
