//! `nftpolicy check`: scenarios through the reference semantics.

use std::io::Write;
use std::path::PathBuf;

use model::scenario::{collect_files, Scenario, Tally};

/// Returns whether every probe of every scenario passed.
pub fn run(paths: &[PathBuf]) -> anyhow::Result<bool> {
    let files = collect_files(paths).map_err(anyhow::Error::msg)?;
    if files.is_empty() {
        anyhow::bail!("no scenario files under the given paths");
    }
    let mut tally = Tally::default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for file in files {
        // A bad file is reported and counted as failed; the rest still run.
        match Scenario::load(&file).and_then(|s| s.check_model().map(|o| (s, o))) {
            Ok((scenario, outcomes)) => tally.report(&scenario, &outcomes, &mut out),
            Err(e) => tally.error(&e, &mut out),
        }
    }
    writeln!(out, "{}", tally.closing_line())?;
    Ok(tally.failed == 0)
}
