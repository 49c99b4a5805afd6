//! Where the agent's memory goes at a scale (issue 18, compact state):
//! `cargo run --release -p bench --example memory_breakdown -- POLICIES PODS [GROUPS]`
//! (root: the last stage programs a private network namespace).
//!
//! Counts the live heap (a counting global allocator, so glibc's free
//! chunks are not in it) after each thing the agent's programmer thread
//! holds is built, the benchmark's synthetic cluster standing in for the
//! datastore: the cluster state (every Calico resource; of each pod, what the
//! dataplane reads: `model::endpoint`), the incremental
//! compiler's persistent data (split into the logical ruleset, the
//! nftables objects lowered from it, and the rest: set memberships, the
//! label index, the resolved policies, reference counts), and the
//! programmer's record of what it committed; with the peak live heap while
//! compiling and while applying. With GROUPS, the tables are cut into
//! that many namespace groups first (the agent's `--table-groups`): the
//! cut's bookkeeping (`Split`) is counted apart.
use bench::alloc_count::{live_bytes, peak_bytes, reset_peak, Counting};
use compiler::{CompileOptions, IncrementalCompiler};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: POLICIES PODS [GROUPS]"))
        .collect();
    let groups = args.get(2).copied().unwrap_or(1);
    let scale = bench::Scale::new(args[0], args[1]);
    let start = live_bytes();
    let state = bench::generate(&scale);
    let state_bytes = live_bytes() - start;
    let pods = state.workload_endpoints().count();
    println!("stage live_MiB bytes_per_pod");
    let line = |what: &str, bytes: usize| {
        println!("{what} {:.1} {}", mib(bytes), bytes / pods.max(1));
    };
    line("cluster_state", state_bytes);
    eprintln!(
        "sizes: Resource {} WorkloadEndpoint {} (kept per pod: Endpoint {}) ResourceKey {}",
        std::mem::size_of::<model::calico::Resource>(),
        std::mem::size_of::<model::calico::WorkloadEndpoint>(),
        std::mem::size_of::<model::endpoint::Endpoint>(),
        std::mem::size_of::<model::calico::ResourceKey>()
    );

    let opts = CompileOptions::new(bench::NODE_UNDER_TEST);
    let before = live_bytes();
    let logical = compiler::compile(&state, &opts)?;
    let logical_bytes = live_bytes() - before;
    let before = live_bytes();
    let ruleset = compiler::lower_nft::to_nftables(&logical);
    let ruleset_bytes = live_bytes() - before;
    drop(ruleset);
    drop(logical);

    let before = live_bytes();
    reset_peak();
    let mut inc = IncrementalCompiler::new(opts);
    inc.rebuild(&state)?;
    let compiler_bytes = live_bytes() - before;
    let compiler_peak = peak_bytes() - before;
    line("compiler_logical_ruleset", logical_bytes);
    line("compiler_nftables_objects", ruleset_bytes);
    line(
        "compiler_memberships_index_refs",
        compiler_bytes.saturating_sub(logical_bytes + ruleset_bytes),
    );
    // The compiler keeps the resolved policies (the positions its records
    // refer to): measured apart, as one more resolution.
    let before = live_bytes();
    let (resolved, _) = state.resolved_policies();
    line("of_which_resolved_policies", live_bytes() - before);
    drop(resolved);
    line("compiler_total", compiler_bytes);
    line("compiler_peak_while_compiling", compiler_peak);

    let _ns = testkit::netns::Netns::enter("membreak")?;
    let before = live_bytes();
    reset_peak();
    let mut p = programmer::NftProgrammer::new()?;
    let mut split = None;
    if groups > 1 {
        let logical = inc.logical().expect("compiled");
        let (s, cut) = compiler::groups::cut_by_namespace(logical, inc.ruleset(), groups);
        split = Some(s);
        let cut_bytes = live_bytes() - before;
        line("groups_cut_and_split", cut_bytes);
        let b = live_bytes();
        let tx = p.plan(&cut)?;
        line("of_which_transaction", live_bytes() - b);
        eprintln!("transaction: {} bytes encoded", tx.bytes());
        drop(tx);
        p.apply_owned(cut)?;
    } else {
        p.apply(inc.ruleset())?;
    }
    let programmer_bytes = live_bytes() - before;
    line("programmer", programmer_bytes);
    line("programmer_peak_while_applying", peak_bytes() - before);
    line("total", live_bytes() - start);
    let before = live_bytes();
    drop(split);
    line("of_which_split_bookkeeping", before - live_bytes());
    Ok(())
}
