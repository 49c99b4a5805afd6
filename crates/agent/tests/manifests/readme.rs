//! The README's generated configuration reference and metric list.

use super::*;

// ---------------------------------------------------------------------------
// Tests: the README.

pub(crate) const REF_BEGIN: &str =
    "<!-- BEGIN configuration reference: generated from --help by crates/agent/tests/manifests/ -->";
pub(crate) const REF_END: &str = "<!-- END configuration reference -->";

/// Markdown table cell text: `|` escaped everywhere, `*`, `<` and `>`
/// outside code spans.
pub(crate) fn md(s: &str) -> String {
    s.split('`')
        .enumerate()
        .map(|(i, part)| {
            let part = part.replace('|', "\\|");
            if i % 2 == 1 {
                part
            } else {
                part.replace('*', "\\*")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;")
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

pub(crate) fn flag_row(f: &Flag) -> String {
    let mut name = match (&f.short, &f.value) {
        (Some(s), Some(v)) => format!("`{s}`, `{} {v}`", f.long),
        (Some(s), None) => format!("`{s}`, `{}`", f.long),
        (None, Some(v)) => format!("`{} {v}`", f.long),
        (None, None) => format!("`{}`", f.long),
    };
    if f.positional {
        name = format!("`{}` (argument)", f.long);
    }
    let env = f.env.as_ref().map_or("—".to_owned(), |e| format!("`{e}`"));
    let default = match (&f.default, f.required) {
        (Some(d), _) => format!("`{d}`"),
        (None, true) => "required".to_owned(),
        (None, false) if f.value.is_none() && !f.positional => "off".to_owned(),
        (None, false) => "—".to_owned(),
    };
    let mut help = f.help.clone();
    if help.is_empty() {
        help.push('—');
    } else if !help.ends_with('.') {
        help.push('.');
    }
    if !f.possible.is_empty() {
        let values: Vec<String> = f
            .possible
            .iter()
            .map(|(v, what)| {
                if what.is_empty() {
                    format!("`{v}`")
                } else {
                    format!("`{v}` ({what})")
                }
            })
            .collect();
        help = format!("{help} One of {}.", values.join(", "));
    }
    format!(
        "| {} | {env} | {default} | {} |",
        md(&name),
        md(help.trim())
    )
}

pub(crate) fn configuration_reference() -> String {
    let cli = cli();
    let mut out = vec![
        REF_BEGIN.to_owned(),
        String::new(),
        "Every flag can also be set through its environment variable; a flag on".to_owned(),
        "the command line wins over the variable.".to_owned(),
        String::new(),
        "Global (every subcommand):".to_owned(),
        String::new(),
        "| Flag | Environment | Default | Meaning |".to_owned(),
        "|---|---|---|---|".to_owned(),
    ];
    for f in cli
        .top
        .flags
        .iter()
        .filter(|f| !["--help", "--version"].contains(&f.long.as_str()))
    {
        out.push(flag_row(f));
    }
    for (name, about) in &cli.top.commands {
        let sub = cli.sub(name);
        out.push(String::new());
        out.push(format!("`nftpolicy {name}`: {about}."));
        out.push(String::new());
        out.push("| Flag | Environment | Default | Meaning |".to_owned());
        out.push("|---|---|---|---|".to_owned());
        for f in cli.own_flags(sub) {
            out.push(flag_row(f));
        }
    }
    out.push(String::new());
    out.push(REF_END.to_owned());
    out.join("\n")
}

#[test]
pub(crate) fn readme_configuration_reference_matches_the_help() {
    let path = workspace().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let expected = configuration_reference();
    let (Some(start), Some(end)) = (readme.find(REF_BEGIN), readme.find(REF_END)) else {
        panic!("README.md has no generated configuration reference ({REF_BEGIN} … {REF_END})");
    };
    let current = &readme[start..end + REF_END.len()];
    if current == expected {
        return;
    }
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        let updated = format!(
            "{}{expected}{}",
            &readme[..start],
            &readme[end + REF_END.len()..]
        );
        std::fs::write(&path, updated).unwrap();
        return;
    }
    let differing: Vec<String> = expected
        .lines()
        .filter(|l| !current.lines().any(|c| c == *l))
        .map(|l| format!("  + {l}"))
        .chain(
            current
                .lines()
                .filter(|c| !expected.lines().any(|l| l == *c))
                .map(|l| format!("  - {l}")),
        )
        .collect();
    panic!(
        "README.md's configuration reference differs from `nftpolicy --help`; \
         run `UPDATE_EXPECT=1 cargo test -p nftpolicy --test manifests`:\n{}",
        differing.join("\n")
    );
}

#[test]
pub(crate) fn readme_names_every_metric() {
    let src = read("crates/agent/src/metrics.rs");
    let readme = read("README.md");
    let mut names = Vec::new();
    for piece in src.split('"').skip(1).step_by(2) {
        let is_name = (piece.starts_with("felix_") || piece.starts_with("nftpolicy_"))
            && piece
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
        if is_name {
            names.push(piece);
        }
    }
    assert!(names.len() >= 10, "found only {names:?} in src/metrics.rs");
    for n in names {
        assert!(
            readme.contains(&format!("`{n}`")),
            "README.md does not describe metric {n}"
        );
    }
}
