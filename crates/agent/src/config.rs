//! The optional config file: `--config FILE` (or `NFTPOLICY_CONFIG`), a
//! YAML mapping from flag names to values, e.g.
//!
//! ```yaml
//! backend: nftables
//! node: node1
//! datastore: etcd://10.0.0.5:2379
//! resync-interval: 90
//! ```
//!
//! Precedence: command-line flag, then `NFTPOLICY_*` environment variable,
//! then the config file, then the built-in default. The file is applied by
//! setting the environment variable of every key that is not already set,
//! so every flag that has an environment variable can be set in the file.

use std::path::Path;

use anyhow::{anyhow, bail, Context};

/// Finds `--config FILE` / `--config=FILE` in `args` or `NFTPOLICY_CONFIG`.
pub fn config_path(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_owned());
        }
    }
    std::env::var("NFTPOLICY_CONFIG").ok()
}

/// The environment variable a config key stands for: `resync-interval` →
/// `NFTPOLICY_RESYNC_INTERVAL`.
pub fn env_name(key: &str) -> String {
    format!(
        "NFTPOLICY_{}",
        key.replace(['-', '.'], "_").to_ascii_uppercase()
    )
}

/// Reads the file and returns (variable, value) for every key.
pub fn read(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let map: serde_yaml::Mapping = serde_yaml::from_str(&text)
        .with_context(|| format!("config file {}: not a YAML mapping", path.display()))?;
    let mut out = Vec::new();
    for (k, v) in map {
        let key = k
            .as_str()
            .ok_or_else(|| anyhow!("config file {}: key {k:?} is not a string", path.display()))?;
        let value = match v {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            other => bail!(
                "config file {}: {key}: {other:?} is not a string, number or boolean",
                path.display()
            ),
        };
        out.push((env_name(key), value));
    }
    Ok(out)
}

/// Applies the config file (if any) to the environment, below flags and
/// variables already set. Runs before any thread is started.
pub fn apply(args: &[String]) -> anyhow::Result<()> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    for (var, value) in read(Path::new(&path))? {
        if std::env::var_os(&var).is_none() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_the_flags_environment_variables() {
        assert_eq!(env_name("resync-interval"), "NFTPOLICY_RESYNC_INTERVAL");
        assert_eq!(env_name("backend"), "NFTPOLICY_BACKEND");
        let dir = std::env::temp_dir().join(format!("nftpolicy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(
            &f,
            "backend: iptables\nresync-interval: 30\nlog-denied: true\n",
        )
        .unwrap();
        let got = read(&f).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            got,
            [
                ("NFTPOLICY_BACKEND".to_owned(), "iptables".to_owned()),
                ("NFTPOLICY_RESYNC_INTERVAL".to_owned(), "30".to_owned()),
                ("NFTPOLICY_LOG_DENIED".to_owned(), "true".to_owned()),
            ]
        );
        assert_eq!(
            config_path(&["x".into(), "--config".into(), "/a.yaml".into()]),
            Some("/a.yaml".into())
        );
    }
}
