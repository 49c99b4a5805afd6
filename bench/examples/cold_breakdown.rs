//! Where cold programming spends its kernel time (issue: kernel-object
//! budget): `cargo run --release -p bench --example cold_breakdown --
//! POLICIES PODS [CHUNK] [--ways one,kind,largest,chunked,intervals]`.
//!
//! Compiles the benchmark's synthetic cluster (as `cargo xtask bench`
//! builds it at this scale) for the node under test
//! (printing the compile's time) and programs it several ways (all, or the
//! ones `--ways` names), each into a fresh network namespace, printing the
//! kernel's time (sendmsg to the last reply, from the programmer's own
//! report) and the messages of every transaction:
//!
//! 1. `one`: **one transaction**, as the agent does;
//! 2. `kind`: **by object kind**, one transaction each: empty sets, then
//!    their elements, then chains (no rules) and verdict maps, then rules
//!    (the sets are created before any rule exists, so in name order, not
//!    most used first as in one transaction);
//! 3. `largest`: as `kind`, with the elements of each table's largest set
//!    in a transaction of their own;
//! 4. `chunked`: **sets in chunks** of CHUNK (default 1,000) per
//!    transaction, then the rest at once — does splitting the set creation
//!    help the cost that grows with the number of sets?
//! 5. `intervals`: **one transaction, interval sets only**: as 1, with
//!    every host (hash) set made an interval set, as all address sets were
//!    before `SetKey::Host` — the same run's measure of what hash sets save.
//!
//! Only the kernel time is compared, so a debug build gives the same
//! answer as a release one, only slower to compile and encode.
use std::collections::BTreeMap;

use compiler::nft::{Ruleset, SetKey, Table};
use programmer::{ApplyReport, NftProgrammer};
use testkit::netns::Netns;

fn main() -> anyhow::Result<()> {
    let mut ways: Option<Vec<String>> = None;
    let mut args: Vec<usize> = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        if a == "--ways" {
            let list = argv.next().expect("--ways one,kind,chunked,intervals");
            ways = Some(list.split(',').map(str::to_owned).collect());
        } else {
            args.push(a.parse().expect("POLICIES PODS [CHUNK] [--ways LIST]"));
        }
    }
    let run = |w: &str| ways.as_ref().is_none_or(|l| l.iter().any(|x| x == w));
    let (policies, pods) = (args[0], args[1]);
    let chunk = args.get(2).copied().unwrap_or(1000);
    // The benchmark's cluster at this scale (`run::scale_for`: from 5,000
    // policies, 100 local endpoints), with PODS pods.
    let mut scale = bench::run::scale_for(policies);
    scale.pods = pods;
    let state = bench::generate(&scale);
    let opts = compiler::CompileOptions::new(bench::NODE_UNDER_TEST);
    let t = std::time::Instant::now();
    let full = compiler::lower_nft::to_nftables(&compiler::compile(&state, &opts)?);
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(state);
    println!("compile and lower: {compile_ms:.0} ms");
    let count = |f: &dyn Fn(&Table) -> usize| full.tables.iter().map(f).sum::<usize>();
    println!(
        "{policies} policies, {pods} pods: {} sets ({} elements), {} maps, {} chains, {} rules",
        count(&|t| t.sets.len()),
        count(&|t| t.sets.values().map(|s| s.elements.len()).sum()),
        count(&|t| t.maps.len()),
        count(&|t| t.chains.len()),
        count(&|t| t.chains.values().map(|c| c.rules.len()).sum()),
    );

    let mut table: Vec<(&str, Vec<ApplyReport>)> = Vec::new();
    if run("one") {
        table.push((
            "one transaction",
            program("one transaction", std::slice::from_ref(&full))?,
        ));
    }

    if run("kind") {
        let by_kind = program("by object kind", &kind_steps(&full, &[]))?;
        table.push(("by object kind", by_kind));
    }

    if run("chunked") {
        // Sets (with their elements) added CHUNK at a time, then the rest.
        let mut steps = Vec::new();
        let names: Vec<Vec<String>> = full
            .tables
            .iter()
            .map(|t| t.sets.keys().cloned().collect())
            .collect();
        let most = names.iter().map(Vec::len).max().unwrap_or(0);
        for upto in (chunk..most).step_by(chunk).chain([most]) {
            steps.push(only(&full, |t| {
                t.chains.clear();
                t.maps.clear();
                let keep: Vec<String> = t.sets.keys().take(upto).cloned().collect();
                t.sets.retain(|k, _| keep.contains(k));
            }));
        }
        steps.push(full.clone());
        let chunked = program(&format!("sets {chunk} per transaction"), &steps)?;
        table.push(("sets chunked", chunked));
    }

    if run("largest") {
        // The largest set of each table (the all-pods named-port set of the
        // benchmark's `ports: [http]` rules) filled on its own.
        let largest: Vec<String> = full
            .tables
            .iter()
            .filter_map(|t| t.sets.values().max_by_key(|s| s.elements.len()))
            .map(|s| s.name.clone())
            .collect();
        let by_set = program("largest set apart", &kind_steps(&full, &largest))?;
        table.push(("largest set apart", by_set));
    }

    if run("intervals") {
        let intervals_only = program(
            "one transaction, interval sets only",
            &[only(&full, |t| {
                for s in t.sets.values_mut() {
                    if s.key == SetKey::Host {
                        s.key = SetKey::Addr;
                    }
                }
            })],
        )?;
        table.push(("one transaction, interval sets only", intervals_only));
    }

    println!();
    println!("| way | transactions | kernel ms |");
    println!("|---|---:|---:|");
    for (way, reports) in &table {
        println!("| {way} | {} | {:.0} |", reports.len(), kernel_ms(reports));
    }
    Ok(())
}

/// One transaction per object kind: empty sets; then (if `first` names
/// any) the elements of the sets `first` names; then all elements; chains
/// without rules and verdict maps; rules.
fn kind_steps(full: &Ruleset, first: &[String]) -> Vec<Ruleset> {
    let mut steps = vec![only(full, |t| {
        t.chains.clear();
        t.maps.clear();
        for s in t.sets.values_mut() {
            s.elements.clear();
        }
    })];
    if !first.is_empty() {
        steps.push(only(full, |t| {
            t.chains.clear();
            t.maps.clear();
            for (name, s) in &mut t.sets {
                if !first.contains(name) {
                    s.elements.clear();
                }
            }
        }));
    }
    steps.push(only(full, |t| {
        t.chains.clear();
        t.maps.clear();
    }));
    steps.push(only(full, |t| {
        for c in t.chains.values_mut() {
            c.rules.clear();
        }
    }));
    steps.push(full.clone());
    steps
}

/// `full` with `keep` applied to each table.
fn only(full: &Ruleset, keep: impl Fn(&mut Table)) -> Ruleset {
    let mut rs = full.clone();
    rs.tables.iter_mut().for_each(keep);
    rs
}

fn kernel_ms(reports: &[ApplyReport]) -> f64 {
    reports
        .iter()
        .map(|r| r.kernel_time.as_secs_f64() * 1e3)
        .sum()
}

/// Applies `steps` in order in a fresh namespace; prints each transaction.
fn program(way: &str, steps: &[Ruleset]) -> anyhow::Result<Vec<ApplyReport>> {
    let _ns = Netns::enter("cold")?;
    let mut p = NftProgrammer::new()?;
    let mut reports = Vec::new();
    println!("\n{way}:");
    for rs in steps {
        let r = p.apply(rs)?;
        let kinds: BTreeMap<_, _> = r.kinds.iter().filter(|(_, n)| **n > 0).collect();
        println!(
            "  kernel {:>8.1} ms, encode {:>8.1} ms, {:>7} messages {kinds:?}",
            r.kernel_time.as_secs_f64() * 1e3,
            r.encode_time.as_secs_f64() * 1e3,
            r.messages
        );
        reports.push(r);
    }
    println!("  total kernel {:.0} ms", kernel_ms(&reports));
    drop(p);
    drop(_ns);
    // The kernel frees a deleted namespace's objects in the background;
    // let it finish before the next way is timed.
    std::thread::sleep(std::time::Duration::from_secs(5));
    Ok(reports)
}
