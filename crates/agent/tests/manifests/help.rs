//! `nftpolicy --help`, parsed: the flags, environment variables and
//! defaults every subcommand documents (what the manifests and the README
//! are checked against).

use super::*;

// ---------------------------------------------------------------------------
// The CLI, as `--help` describes it.

#[derive(Debug, Clone, Default)]
pub(crate) struct Flag {
    /// `--backend`, or `<PATHS>...` for a positional argument.
    pub(crate) long: String,
    pub(crate) short: Option<String>,
    /// `<BACKEND>`; `None` for a switch.
    pub(crate) value: Option<String>,
    pub(crate) env: Option<String>,
    pub(crate) default: Option<String>,
    /// Names and (long help only) descriptions.
    pub(crate) possible: Vec<(String, String)>,
    pub(crate) help: String,
    pub(crate) required: bool,
    pub(crate) positional: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Help {
    pub(crate) about: String,
    /// Subcommands (name, about), `help` left out.
    pub(crate) commands: Vec<(String, String)>,
    pub(crate) flags: Vec<Flag>,
}

impl Help {
    pub(crate) fn flag(&self, long: &str) -> Option<&Flag> {
        self.flags.iter().find(|f| f.long == long)
    }

    pub(crate) fn by_env(&self, env: &str) -> Option<&Flag> {
        self.flags.iter().find(|f| f.env.as_deref() == Some(env))
    }

    pub(crate) fn default_of(&self, long: &str) -> String {
        self.flag(long)
            .unwrap_or_else(|| panic!("no {long} in the help"))
            .default
            .clone()
            .unwrap_or_else(|| panic!("{long} has no default in the help"))
    }
}

/// Takes `[key: …]` out of `text`.
pub(crate) fn take_annotation(text: &mut String, key: &str) -> Option<String> {
    let open = format!("[{key}: ");
    let start = text.find(&open)?;
    let end = start + text[start..].find(']')?;
    let value = text[start + open.len()..end].to_owned();
    text.replace_range(start..=end, "");
    Some(value)
}

pub(crate) fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut usage = String::new();
    let mut section = String::new();
    // (head, rest of the head line, following lines)
    let mut entries: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut about_done = false;
    for line in text.lines() {
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = u.to_owned();
            about_done = true;
            continue;
        }
        if !about_done {
            if !line.trim().is_empty() && help.about.is_empty() {
                help.about = line.trim().to_owned();
            }
            continue;
        }
        if !line.starts_with(' ') {
            if line.ends_with(':') {
                section = line.to_owned();
            }
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let head_and_rest = |s: &str| match s.find("  ") {
            Some(i) => (s[..i].to_owned(), s[i..].trim().to_owned()),
            None => (s.trim().to_owned(), String::new()),
        };
        match section.as_str() {
            "Commands:" if indent == 2 => {
                let (name, about) = head_and_rest(trimmed);
                if name != "help" {
                    help.commands.push((name, about));
                }
            }
            "Options:" | "Arguments:"
                if indent <= 6
                    && !trimmed.is_empty()
                    && (section == "Arguments:" || trimmed.starts_with('-')) =>
            {
                let (head, rest) = head_and_rest(trimmed);
                entries.push((head, rest, Vec::new()));
            }
            "Options:" | "Arguments:" => {
                if let Some(e) = entries.last_mut() {
                    e.2.push(trimmed.to_owned());
                }
            }
            _ => {}
        }
    }
    for (head, rest, body) in entries {
        let mut f = Flag::default();
        for word in head.split([',', ' ']).filter(|w| !w.is_empty()) {
            if word.starts_with("--") {
                f.long = word.to_owned();
            } else if word.starts_with('-') {
                f.short = Some(word.to_owned());
            } else if f.long.is_empty() && word.starts_with('<') {
                f.long = word.to_owned();
                f.positional = true;
            } else {
                f.value = Some(word.to_owned());
            }
        }
        // Long help: description, blank line, "Possible values:" list,
        // blank line, [annotations]. Short help: everything on one line.
        let mut desc = vec![rest];
        let mut in_possible = false;
        for l in &body {
            if l == "Possible values:" {
                in_possible = true;
            } else if in_possible && l.starts_with("- ") {
                let (name, what) = l[2..].split_once(':').unwrap_or((&l[2..], ""));
                f.possible
                    .push((name.trim().to_owned(), what.trim().to_owned()));
            } else if !l.is_empty() {
                in_possible = false;
                desc.push(l.clone());
            }
        }
        let mut text = desc.join(" ");
        f.env = take_annotation(&mut text, "env").map(|e| {
            let (name, value) = e.split_once('=').unwrap_or((&e, ""));
            assert!(value.is_empty(), "{name} is set in the help's environment");
            name.to_owned()
        });
        f.default = take_annotation(&mut text, "default");
        if let Some(p) = take_annotation(&mut text, "possible values") {
            f.possible = p
                .split(", ")
                .map(|v| (v.to_owned(), String::new()))
                .collect();
        }
        f.help = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let words: Vec<&str> = usage.split_whitespace().collect();
        f.required = if f.positional {
            words.contains(&f.long.as_str())
        } else {
            words.windows(2).any(|w| {
                (w[0] == f.long || Some(w[0]) == f.short.as_deref())
                    && Some(w[1]) == f.value.as_deref()
            })
        };
        help.flags.push(f);
    }
    help
}

pub(crate) fn run_help(args: &[&str]) -> String {
    let out = nftpolicy().args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "nftpolicy {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) struct Cli {
    pub(crate) top: Help,
    pub(crate) subs: BTreeMap<String, Help>,
}

impl Cli {
    pub(crate) fn sub(&self, name: &str) -> &Help {
        self.subs
            .get(name)
            .unwrap_or_else(|| panic!("{name:?} is not an nftpolicy subcommand"))
    }

    /// Subcommand flags that are not global ones.
    pub(crate) fn own_flags<'a>(&'a self, sub: &'a Help) -> impl Iterator<Item = &'a Flag> {
        sub.flags
            .iter()
            .filter(|f| self.top.flag(&f.long).is_none() && f.long != "--help")
    }
}

pub(crate) fn cli() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(|| {
        let top = parse_help(&run_help(&[]));
        let subs = top
            .commands
            .iter()
            .map(|(name, _)| (name.clone(), parse_help(&run_help(&[name]))))
            .collect();
        Cli { top, subs }
    })
}

#[test]
pub(crate) fn the_help_parser_understands_the_binary() {
    let cli = cli();
    for sub in [
        "check",
        "explain",
        "run",
        "apply",
        "delete",
        "controller",
        "sync",
        "render",
    ] {
        assert!(
            cli.subs.contains_key(sub),
            "no {sub} in {:?}",
            cli.top.commands
        );
    }
    let run = cli.sub("run");
    let backend = run.flag("--backend").unwrap();
    assert_eq!(backend.env.as_deref(), Some("NFTPOLICY_BACKEND"));
    assert_eq!(backend.default.as_deref(), Some("nftables"));
    let names: Vec<&str> = backend.possible.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["nftables", "iptables"]);
    let ipt = run.flag("--iptables-backend").unwrap();
    let names: Vec<&str> = ipt.possible.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["legacy", "nft"], "long-help possible values");
    assert!(run.flag("--node").unwrap().required);
    assert!(!run.flag("--backend").unwrap().required);
    let apply = cli.sub("apply");
    let f = apply.flag("--filename").unwrap();
    assert_eq!(f.short.as_deref(), Some("-f"));
    assert!(f.required);
    assert!(apply.flag("--dry-run").unwrap().value.is_none());
    let render = cli.sub("render");
    assert!(render.flags.iter().any(|f| f.positional && f.required));
    assert!(cli.top.flag("--log-format").is_some());
}
