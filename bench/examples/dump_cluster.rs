//! Writes the benchmark's synthetic cluster (`bench::generate` at the
//! scale `cargo xtask bench` uses for POLICIES) as Calico v3 resources,
//! one JSON document per `---`, for `nftpolicy apply` to put into etcd:
//! `cargo run --release -p bench --example dump_cluster -- POLICIES FILE`.
//! `cargo xtask agent-memory` measures the agent itself on it.
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: dump_cluster POLICIES FILE");
    let scale = bench::run::scale_for(args[1].parse()?);
    let state = bench::generate(&scale);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[2])?);
    let mut n = 0;
    for r in state.resources() {
        writeln!(out, "---")?;
        serde_json::to_writer(&mut out, &*r)?;
        writeln!(out)?;
        n += 1;
    }
    out.flush()?;
    eprintln!(
        "{n} resources ({} pods, {} policies, node under test {})",
        scale.pods,
        scale.policies,
        bench::NODE_UNDER_TEST
    );
    Ok(())
}
