//! `cargo xtask e2e --fuzz N [--seed S]`: differential testing of the model
//! against both kernel backends on generated clusters
//! ([`lab::generate`]).
//!
//! One lab serves the whole run (the generator keeps pod identities fixed).
//! For every case: the model's verdict for each probe, then for nftables
//! and for iptables: program both nodes with `nftpolicy sync --once`, probe
//! everything with a short timeout, and re-probe with the normal timeout
//! only what disagrees with the model, so a slow machine does not fake a
//! deny. A remaining disagreement prints the seed and case, is shrunk to a
//! small scenario that still shows it, written to
//! `target/fuzz-failures/<seed>-<case>.yaml`, and fails the run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lab::generate::{self, Case};
use lab::Lab;
use model::scenario::{verdict_word, NODES};

/// Denied probes are the common case; this keeps them cheap.
const SHORT_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// What a probe gets before a disagreement counts (the e2e default).
const FULL_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// What is compared with the model: (name, backend, extra `nftpolicy
/// sync` arguments).
type Column = (&'static str, &'static str, &'static [&'static str]);
const BACKENDS: [Column; 2] = [("nftables", "nftables", &[]), ("iptables", "iptables", &[])];
/// `e2e --fuzz N --fused-lookup`: the nftables backend once more, fused.
const FUSED: Column = ("nftables --fused-lookup", "nftables", &["--fused-lookup"]);
/// Kernel runs a shrink may spend (each is two syncs and a probe round
/// per backend).
const SHRINK_BUDGET: usize = 80;

/// One probe on which a backend and the model differ.
#[derive(Debug, Clone)]
struct Disagreement {
    probe: usize,
    backend: &'static str,
    model: bool,
    kernel: Option<bool>,
    detail: String,
}

struct Runner<'a> {
    lab: Lab,
    nftpolicy: &'a Path,
    runs: usize,
    columns: Vec<Column>,
}

/// A random seed for runs that name none.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    generate::Rng::new(nanos ^ u64::from(std::process::id()) << 32).next_u64() % 1_000_000_000
}

/// Runs `cases` generated cases from `seed`; false on a disagreement.
pub fn run(
    cases: u64,
    seed: u64,
    nftpolicy: &Path,
    failures_dir: &Path,
    fused: bool,
) -> anyhow::Result<bool> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut columns = BACKENDS.to_vec();
    if fused {
        columns.push(FUSED);
    }
    let (also, flag) = if fused {
        (" vs nftables --fused-lookup", " --fused-lookup")
    } else {
        ("", "")
    };
    writeln!(
        out,
        "== fuzz: {cases} generated case(s), seed {seed}, model vs nftables vs iptables{also} \
         (reproduce: cargo xtask e2e --fuzz {cases} --seed {seed}{flag})"
    )?;
    let started = Instant::now();
    let first = generate::case(seed, 0).scenario()?;
    let pods = first.states()?[0].pods();
    let lab = Lab::build(&pods, &first.externals, &NODES)?;
    let mut runner = Runner {
        lab,
        nftpolicy,
        runs: 0,
        columns,
    };
    let (mut probes, mut allowed) = (0usize, 0usize);
    for index in 0..cases {
        let case = generate::case(seed, index);
        let model = model_verdicts(&case)?;
        probes += model.len();
        allowed += model.iter().filter(|a| **a).count();
        let found = runner.disagreements(&case)?;
        if found.is_empty() {
            if (index + 1) % 25 == 0 || index + 1 == cases {
                writeln!(
                    out,
                    "fuzz: {}/{cases} cases agree ({probes} probes, {allowed} allowed by the model, {:.1}s)",
                    index + 1,
                    started.elapsed().as_secs_f64()
                )?;
                out.flush()?;
            }
            continue;
        }
        writeln!(
            out,
            "FAIL fuzz seed {seed} case {index}: the kernel disagrees with the model"
        )?;
        for d in &found {
            writeln!(
                out,
                "     {} on {}: model {}, kernel {} ({})",
                case.probes[d.probe].describe(),
                d.backend,
                verdict_word(d.model),
                d.kernel.map_or("skipped", verdict_word),
                d.detail
            )?;
        }
        out.flush()?;
        let minimal = runner.shrink(&case, &found)?;
        std::fs::create_dir_all(failures_dir)
            .with_context(|| format!("creating {}", failures_dir.display()))?;
        let file = failures_dir.join(format!("{seed}-{index}.yaml"));
        std::fs::write(&file, minimal.to_yaml())
            .with_context(|| format!("writing {}", file.display()))?;
        writeln!(
            out,
            "     minimal reproduction ({} policies, {} pods, {} probes; expect = the model's verdict): {}\n     \
             run it: cargo xtask e2e {} {}",
            minimal.policies.len(),
            minimal.pods.len(),
            minimal.probes.len(),
            file.display(),
            if found.iter().any(|d| d.backend == FUSED.0) {
                "--backend nftables --fused-lookup"
            } else {
                "--backend both"
            },
            file.display()
        )?;
        writeln!(out, "fuzz: FAILED at case {index} of seed {seed}")?;
        return Ok(false);
    }
    writeln!(
        out,
        "fuzz: {cases} cases, {probes} probes, all agree on both backends{} ({allowed} allowed, {} denied) in {:.1}s",
        if fused { " and fused" } else { "" },
        probes - allowed,
        started.elapsed().as_secs_f64()
    )?;
    Ok(true)
}

trait Describe {
    fn describe(&self) -> String;
}

impl Describe for generate::GenProbe {
    fn describe(&self) -> String {
        format!(
            "{} -> {} {}/{}{}",
            self.from,
            self.to,
            self.port,
            self.protocol,
            if self.ipv6 { " (IPv6)" } else { "" }
        )
    }
}

/// The model's verdict for each probe of `case`, in order.
fn model_verdicts(case: &Case) -> anyhow::Result<Vec<bool>> {
    Ok(case
        .scenario()?
        .check_model()?
        .iter()
        .map(|o| o.got.expect("the model decides every probe"))
        .collect())
}

impl Runner<'_> {
    /// Every probe of `case` on which a backend differs from the model.
    fn disagreements(&mut self, case: &Case) -> anyhow::Result<Vec<Disagreement>> {
        self.runs += 1;
        let scenario = case.scenario()?;
        let model = model_verdicts(case)?;
        let state = scenario.states()?.remove(0);
        self.lab.sync_pods(&state.pods())?;
        let resolved = scenario.steps[0]
            .probes
            .iter()
            .map(|p| state.resolve_probe(p, &scenario.externals))
            .collect::<Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)?;
        let dir = self.lab.workdir().join(format!("run-{}", self.runs));
        lab::write_state(&dir, &state)?;
        let mut found = Vec::new();
        for (name, backend, extra) in self.columns.clone() {
            let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
            self.lab
                .program_nodes_with(&dir, self.nftpolicy, backend, &extra, SYNC_TIMEOUT)?;
            self.lab.set_probe_timeout(SHORT_PROBE_TIMEOUT);
            let quick = self.lab.probe_all(&resolved)?;
            let suspects: Vec<usize> = (0..resolved.len())
                .filter(|&i| quick[i].allowed != Some(model[i]))
                .collect();
            if suspects.is_empty() {
                continue;
            }
            // A deny from the short timeout may only be a slow answer.
            self.lab.set_probe_timeout(FULL_PROBE_TIMEOUT);
            let again: Vec<_> = suspects.iter().map(|&i| resolved[i].clone()).collect();
            let slow = self.lab.probe_all(&again)?;
            for (&i, r) in suspects.iter().zip(slow) {
                if r.allowed != Some(model[i]) {
                    found.push(Disagreement {
                        probe: i,
                        backend: name,
                        model: model[i],
                        kernel: r.allowed,
                        detail: r.detail,
                    });
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(found)
    }

    /// Keeps only the disagreeing probes, then removes policies, rules,
    /// peers, ports and pods one at a time while a disagreement remains.
    /// Probes carry the model's verdict as `expect`.
    fn shrink(&mut self, case: &Case, found: &[Disagreement]) -> anyhow::Result<Case> {
        let mut current = only_probes(case, found);
        let mut budget = SHRINK_BUDGET;
        'outer: while budget > 0 {
            for candidate in current.smaller() {
                if budget == 0 {
                    break 'outer;
                }
                budget -= 1;
                let found = self.disagreements(&candidate)?;
                if !found.is_empty() {
                    current = only_probes(&candidate, &found);
                    continue 'outer;
                }
            }
            break;
        }
        let verdicts = model_verdicts(&current)?;
        for (p, allow) in current.probes.iter_mut().zip(verdicts) {
            p.expect_allow = allow;
        }
        current.name = format!("{}-min", case.name);
        Ok(current)
    }
}

fn only_probes(case: &Case, found: &[Disagreement]) -> Case {
    let mut c = case.clone();
    c.probes = case
        .probes
        .iter()
        .enumerate()
        .filter(|(i, _)| found.iter().any(|d| d.probe == *i))
        .map(|(_, p)| p.clone())
        .collect();
    c
}

/// `NFTPOLICY_BIN` if set (e.g. a deliberately broken build, to see the
/// fuzzer catch it), else the workspace's freshly built binary.
pub fn nftpolicy_binary(
    build: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    match std::env::var_os("NFTPOLICY_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => build(),
    }
}

/// Where failing cases go: `<workspace>/target/fuzz-failures`.
pub fn failures_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz-failures")
}
