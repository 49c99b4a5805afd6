//! The Calico selector language: parser, canonical form, evaluator.
//!
//! Calico v3 resources pick endpoints with selector expressions such as
//! `role == 'db' && !has(quarantine)`. This module parses that language the
//! way felix's `libcalico-go/lib/selector/parser` does, evaluates it against a
//! set of labels, and prints a canonical text form that other modules use as a
//! stable identity (for example to name nftables sets).
//!
//! # API
//!
//! * [`Selector::parse`] (also [`str::parse`] via [`FromStr`]) turns text into a
//!   [`Selector`] or a [`SelectorError`] that pinpoints the byte offset where
//!   parsing failed.
//! * [`Selector::matches`] evaluates the selector against [`Labels`].
//! * [`Selector::canonical`] (also [`fmt::Display`]) prints the canonical form.
//! * [`Selector::all`], [`Selector::is_all`], [`Selector::and`] and
//!   [`Selector::with_label_prefix`] build and inspect selectors programmatically.
//! * With serde, a `Selector` is (de)serialized as its text: serializing writes
//!   the canonical form, deserializing parses.
//!
//! # Grammar
//!
//! ```text
//! selector := <empty or whitespace only>          (same as all())
//!           | or
//! or       := and ( "||" and )*
//! and      := unary ( "&&" unary )*
//! unary    := "!"* primary
//! primary  := "(" or ")"
//!           | "all" "(" ")"
//!           | "global" "(" ")"
//!           | "has" "(" label ")"
//!           | label "==" string
//!           | label "!=" string
//!           | label "contains" string
//!           | label "starts" "with" string
//!           | label "ends" "with" string
//!           | label "in" set
//!           | label "not" "in" set
//! set      := "{" "}" | "{" string ( "," string )* ","? "}"
//! string   := '"' <any chars except "> '"' | "'" <any chars except '> "'"
//! label    := [A-Za-z0-9._/-]+
//! ```
//!
//! * `!` binds tighter than `&&`, which binds tighter than `||`; parentheses
//!   group. `!a == 'x'` therefore means `!(a == 'x')`.
//! * Whitespace (ASCII space, tab, newline, carriage return, form feed) between
//!   tokens is insignificant, including inside `has ( k )`, `not  in` and
//!   `starts with`.
//! * Strings have no escape sequences (as in Calico): a value may contain the
//!   other kind of quote but not its own delimiter.
//! * Label keys use the character set felix accepts for Kubernetes label keys
//!   (optional DNS prefix, `/`, name). Like felix, only the character set is
//!   checked, not the finer structure (segment lengths etc.), so that every
//!   selector Calico accepts is accepted here.
//! * `has`, `all`, `global`, `in`, `not`, `contains`, `starts`, `ends` and
//!   `with` are contextual keywords, not reserved words: `has` is a function
//!   only when followed by `(`, and the operator words are only recognised
//!   right after a label, so `in == 'x'` compares the label `in`. Operators
//!   are whole words (`notin` is not `not in`).
//! * A trailing comma in a set literal (`{'a', 'b',}`) is accepted because
//!   felix accepts it; an empty set `{}` is allowed too.
//! * Parentheses may nest at most [`MAX_NESTING`] levels deep, so that a
//!   hostile selector cannot overflow the stack.
//!
//! # Semantics
//!
//! | expression             | true iff                                               |
//! |------------------------|--------------------------------------------------------|
//! | `k == 'v'`             | label `k` is present and equal to `v`                  |
//! | `k != 'v'`             | label `k` is absent or different from `v`              |
//! | `k in {..}`            | label `k` is present and its value is in the set       |
//! | `k not in {..}`        | label `k` is absent or its value is not in the set     |
//! | `has(k)`               | label `k` is present (with any value, even empty)      |
//! | `k contains 'x'`       | label `k` is present and its value contains `x`        |
//! | `k starts with 'x'`    | label `k` is present and its value starts with `x`     |
//! | `k ends with 'x'`      | label `k` is present and its value ends with `x`       |
//! | `all()`                | always                                                 |
//! | `global()`             | the labels do not contain [`NAMESPACE_LABEL`]          |
//!
//! `global()` is meant to match resources that are not namespaced (host
//! endpoints, global network sets). Labels carry no "kind", so we follow the
//! Calico convention that namespaced endpoints carry the
//! `projectcalico.org/namespace` label: whoever builds the [`Labels`] of a
//! namespaced endpoint must include it for `global()` to be false.
//!
//! # Canonical form
//!
//! [`Selector::canonical`] prints a deterministic text in felix's style, such
//! that equivalent spellings print the same and the text parses back to an
//! equal `Selector` (`parse(canonical(s)) == s`):
//!
//! * one space around binary operators: `label == "value"`, `a && b`, `a || b`;
//!   `has(label)`, `all()`, `global()`, `!expr` (no space after `!`);
//! * values are double-quoted, unless they contain a double quote, in which
//!   case they are single-quoted (a value cannot contain both);
//! * set values are de-duplicated and sorted (byte order):
//!   `label in {"a", "b"}`, `label not in {}`;
//! * parentheses appear only where needed: around an `||` inside `&&`, and
//!   around an `&&`/`||` under `!`;
//! * nested chains of the same operator are flattened (`(a && b) && c` prints
//!   as `a && b && c`), but operands of `&&`/`||` are never reordered;
//! * double negation is removed (`!!a` and `!(!a)` print as `a`);
//! * the empty selector and `all()` both print `all()`.
//!
//! For example `(role=='db')&&!has( quarantine )`, `role == "db" && !has(quarantine)`
//! and `((role == 'db')) && !!!has(quarantine)` all print
//! `role == "db" && !has(quarantine)`.
//!
//! # Errors
//!
//! Every malformed input yields a [`SelectorError`] carrying the input, the
//! 0-based *byte* offset where parsing failed and a message saying what was
//! expected, e.g.
//! `invalid selector "role = 'x'": expected '==', '!=', 'in', 'not in', 'contains', 'starts with' or 'ends with', found '=' at position 5`.
//! Errors at the end of the input report `position == input.len()`; an
//! unterminated string reports the position of its opening quote.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::labels::IStr;
/// The labels a selector is evaluated against: label key to value.
pub use crate::labels::Labels;

/// Anything a selector can read labels from: a plain map, or a view that
/// layers an endpoint's own labels over those its profiles apply without
/// copying either (what a full compile does for every endpoint).
pub trait LabelSource {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSource for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

/// An object's labels as a selector sees them: its own, over the ones its
/// profiles apply (later profiles over earlier ones), or one owned map.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelView<'a> {
    Owned(Labels),
    Layered {
        own: &'a Labels,
        /// In application order: a later map overrides an earlier one.
        inherited: Vec<&'a Labels>,
    },
}

impl LabelSource for LabelView<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        match self {
            LabelView::Owned(l) => l.label(key),
            LabelView::Layered { own, inherited } => own
                .label(key)
                .or_else(|| inherited.iter().rev().find_map(|l| l.label(key))),
        }
    }
}

impl LabelView<'_> {
    /// Every (key, value) pair of every layer, overridden ones included
    /// (for indexes, which may over-approximate).
    pub fn pairs(&self) -> Box<dyn Iterator<Item = (&str, &str)> + '_> {
        match self {
            LabelView::Owned(l) => Box::new(l.iter()),
            LabelView::Layered { own, inherited } => Box::new(
                own.iter()
                    .chain(inherited.iter().flat_map(move |l| l.iter())),
            ),
        }
    }

    /// The labels as one map (the top layer wins).
    pub fn to_labels(&self) -> Labels {
        match self {
            LabelView::Owned(l) => l.clone(),
            LabelView::Layered { own, inherited } => {
                let mut out = Labels::new();
                for l in inherited {
                    out.overlay(l);
                }
                out.overlay(own);
                out
            }
        }
    }
}

/// The label that marks a namespaced resource; `global()` is true exactly when
/// it is absent. Its value is the namespace name.
pub const NAMESPACE_LABEL: &str = "projectcalico.org/namespace";

/// How many levels of parentheses a selector may nest. Parsing, evaluation
/// and printing are recursive, so this bounds their stack use; real selectors
/// nest a handful of levels at most.
pub const MAX_NESTING: usize = 100;

/// A parsed selector expression.
///
/// Equality, ordering and hashing are structural on the normalised expression
/// (sets sorted, same-operator chains flattened, double negation removed), so
/// two selectors are equal exactly when their [`canonical`](Self::canonical)
/// texts are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    root: Expr,
}

/// The expression tree.
///
/// Invariants kept by the constructors [`Expr::not`], [`Expr::and`] and
/// [`Expr::or`] (and relied on by the canonical printer for round-tripping):
/// `And`/`Or` have at least two operands and never directly contain an
/// operand of their own kind, and `Not` never directly contains a `Not`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Expr {
    All,
    Global,
    Has(IStr),
    /// `label <op> "value"` for the single-value operators.
    Compare {
        label: IStr,
        op: CompareOp,
        value: IStr,
    },
    In {
        label: IStr,
        values: BTreeSet<IStr>,
    },
    NotIn {
        label: IStr,
        values: BTreeSet<IStr>,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CompareOp {
    Eq,
    Ne,
    Contains,
    StartsWith,
    EndsWith,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
            CompareOp::Contains => "contains",
            CompareOp::StartsWith => "starts with",
            CompareOp::EndsWith => "ends with",
        }
    }
}

/// Why a selector text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {input:?}: {message} at position {position}")]
pub struct SelectorError {
    /// The complete text that was being parsed.
    pub input: String,
    /// 0-based byte offset into `input` where parsing failed.
    pub position: usize,
    /// What was wrong, typically "expected X, found Y".
    pub message: String,
}

impl Selector {
    /// Labels every match must carry, with the values allowed: the
    /// top-level `k == "v"` and `k in {…}` conjuncts. A consumer can use
    /// them to look candidates up in a label index instead of evaluating
    /// the selector against everything; the selector must still be
    /// evaluated on the candidates. Empty when there is no such conjunct.
    #[must_use]
    pub fn required_labels(&self) -> Vec<(&str, Vec<&str>)> {
        fn term(e: &Expr) -> Option<(&str, Vec<&str>)> {
            match e {
                Expr::Compare {
                    label,
                    op: CompareOp::Eq,
                    value,
                } => Some((label.as_str(), vec![value.as_str()])),
                Expr::In { label, values } => {
                    Some((label.as_str(), values.iter().map(IStr::as_str).collect()))
                }
                _ => None,
            }
        }
        match &self.root {
            Expr::And(operands) => operands.iter().filter_map(term).collect(),
            other => term(other).into_iter().collect(),
        }
    }

    /// Whether every match must carry `label`: the selector is
    /// `has(label)` or `label == "…"`, or a conjunction with such a term
    /// at its top level. Structural, so it never depends on the labels a
    /// selector is evaluated on.
    #[must_use]
    pub fn requires_label(&self, label: &str) -> bool {
        let term = |e: &Expr| match e {
            Expr::Has(l) => l == label,
            Expr::Compare {
                label: l,
                op: CompareOp::Eq,
                ..
            } => l == label,
            _ => false,
        };
        match &self.root {
            Expr::And(operands) => operands.iter().any(term),
            other => term(other),
        }
    }

    /// Parses selector text; empty or whitespace-only text is [`Selector::all`].
    ///
    /// # Errors
    ///
    /// Returns a [`SelectorError`] locating the first problem if `text` is not
    /// a valid selector.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        Parser::new(text)
            .parse_selector()
            .map(|root| Selector { root })
    }

    /// The selector that matches every set of labels (`all()`).
    #[must_use]
    pub fn all() -> Selector {
        Selector { root: Expr::All }
    }

    /// True if this is exactly `all()` (or the empty selector). Expressions
    /// that merely happen to match everything, like `all() && all()` or
    /// `!has(a) || has(a)`, are not recognised.
    #[must_use]
    pub fn is_all(&self) -> bool {
        self.root == Expr::All
    }

    /// Evaluates the selector against `labels`; see the module docs for the
    /// meaning of each operator.
    #[must_use]
    pub fn matches<L: LabelSource + ?Sized>(&self, labels: &L) -> bool {
        self.root.matches(labels)
    }

    /// The canonical text of this selector; see the module docs. Equal
    /// selectors have equal canonical texts and the text parses back to an
    /// equal selector.
    #[must_use]
    pub fn canonical(&self) -> String {
        self.to_string()
    }

    /// Returns a copy with `prefix` prepended to every label key.
    ///
    /// This is how Calico evaluates a `namespaceSelector` against an
    /// endpoint: namespace labels are exposed on the endpoint with a prefix
    /// (`pcns.`), so `user == 'bob'` becomes `pcns.user == "bob"`. `all()`
    /// and `global()` are left alone as they name no label.
    ///
    /// `prefix` should consist of label-key characters (`[A-Za-z0-9._/-]`);
    /// otherwise the canonical text of the result cannot be parsed back.
    #[must_use]
    pub fn with_label_prefix(&self, prefix: &str) -> Selector {
        debug_assert!(
            prefix.bytes().all(is_label_byte),
            "label prefix {prefix:?} contains characters not allowed in a label key"
        );
        Selector {
            root: self.root.with_label_prefix(prefix),
        }
    }

    /// A `namespaceSelector` as libcalico-go applies it to endpoints: every
    /// label key prefixed (see [`Selector::with_label_prefix`]), and every
    /// `all()` inside it turned into `has(projectcalico.org/namespace)`
    /// ("every namespace", which global resources are not in).
    #[must_use]
    pub fn namespace_selector_with_prefix(&self, prefix: &str) -> Selector {
        let prefixed = self.with_label_prefix(prefix);
        Selector {
            root: prefixed.root.all_to_namespaced(),
        }
    }

    /// Every `all()` in the selector turned into `has(label)`, as
    /// libcalico-go's text replacement does for a GlobalNetworkPolicy's
    /// `serviceAccountSelector` (see [`crate::serviceaccount`]).
    #[must_use]
    pub fn all_to_has(&self, label: &str) -> Selector {
        Selector {
            root: self.root.clone().all_to_has(label),
        }
    }

    /// The conjunction of `self` and `other`. `all()` is the identity on
    /// either side; otherwise the result is `self && other`, flattened if
    /// either side is itself an `&&` chain (`(a && b).and(c)` is `a && b && c`).
    #[must_use]
    pub fn and(&self, other: &Selector) -> Selector {
        if self.is_all() {
            return other.clone();
        }
        if other.is_all() {
            return self.clone();
        }
        Selector {
            root: Expr::and(vec![self.root.clone(), other.root.clone()]),
        }
    }
}

impl Default for Selector {
    /// The empty selector, which is `all()`.
    fn default() -> Self {
        Selector::all()
    }
}

impl fmt::Display for Selector {
    /// Writes the canonical form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.write(f)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        Selector::parse(&text).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Expression tree: construction, evaluation, printing
// ---------------------------------------------------------------------------

impl Expr {
    /// Negation, removing double negation so `!!a` and `a` are the same
    /// selector (as felix does for consecutive `!`s).
    fn not(operand: Expr) -> Expr {
        match operand {
            Expr::Not(inner) => *inner,
            other => Expr::Not(Box::new(other)),
        }
    }

    /// Conjunction of `operands` (at least one), flattening nested `&&`s so
    /// that grouping does not change the canonical form.
    fn and(operands: Vec<Expr>) -> Expr {
        Self::flatten(operands, Expr::And, |e| match e {
            Expr::And(v) => Ok(v),
            other => Err(other),
        })
    }

    /// Disjunction of `operands` (at least one), flattening nested `||`s.
    fn or(operands: Vec<Expr>) -> Expr {
        Self::flatten(operands, Expr::Or, |e| match e {
            Expr::Or(v) => Ok(v),
            other => Err(other),
        })
    }

    /// Shared body of [`Expr::and`] / [`Expr::or`]: `split` returns the
    /// operands of a node of the same kind, or gives the node back.
    fn flatten(
        operands: Vec<Expr>,
        make: fn(Vec<Expr>) -> Expr,
        split: fn(Expr) -> Result<Vec<Expr>, Expr>,
    ) -> Expr {
        let mut flat = Vec::with_capacity(operands.len());
        for operand in operands {
            match split(operand) {
                Ok(inner) => flat.extend(inner),
                Err(leaf) => flat.push(leaf),
            }
        }
        if flat.len() == 1 {
            flat.pop().expect("length checked")
        } else {
            make(flat)
        }
    }

    fn matches<L: LabelSource + ?Sized>(&self, labels: &L) -> bool {
        match self {
            Expr::All => true,
            Expr::Global => labels.label(NAMESPACE_LABEL).is_none(),
            Expr::Has(label) => labels.label(label).is_some(),
            Expr::Compare { label, op, value } => match (op, labels.label(label)) {
                // `!=` is the only single-value operator that holds for an
                // absent label (as in Kubernetes and felix).
                (CompareOp::Ne, None) => true,
                (_, None) => false,
                (CompareOp::Eq, Some(v)) => v == value,
                (CompareOp::Ne, Some(v)) => v != value,
                (CompareOp::Contains, Some(v)) => v.contains(value.as_str()),
                (CompareOp::StartsWith, Some(v)) => v.starts_with(value.as_str()),
                (CompareOp::EndsWith, Some(v)) => v.ends_with(value.as_str()),
            },
            Expr::In { label, values } => labels.label(label).is_some_and(|v| values.contains(v)),
            Expr::NotIn { label, values } => {
                !labels.label(label).is_some_and(|v| values.contains(v))
            }
            Expr::Not(operand) => !operand.matches(labels),
            Expr::And(operands) => operands.iter().all(|e| e.matches(labels)),
            Expr::Or(operands) => operands.iter().any(|e| e.matches(labels)),
        }
    }

    fn with_label_prefix(&self, prefix: &str) -> Expr {
        let key = |label: &IStr| IStr::from(format!("{prefix}{label}"));
        match self {
            Expr::All => Expr::All,
            Expr::Global => Expr::Global,
            Expr::Has(label) => Expr::Has(key(label)),
            Expr::Compare { label, op, value } => Expr::Compare {
                label: key(label),
                op: *op,
                value: value.clone(),
            },
            Expr::In { label, values } => Expr::In {
                label: key(label),
                values: values.clone(),
            },
            Expr::NotIn { label, values } => Expr::NotIn {
                label: key(label),
                values: values.clone(),
            },
            // Prefixing keeps the shape of the tree, so the invariants hold
            // without going through the normalising constructors.
            Expr::Not(operand) => Expr::Not(Box::new(operand.with_label_prefix(prefix))),
            Expr::And(operands) => Expr::And(
                operands
                    .iter()
                    .map(|e| e.with_label_prefix(prefix))
                    .collect(),
            ),
            Expr::Or(operands) => Expr::Or(
                operands
                    .iter()
                    .map(|e| e.with_label_prefix(prefix))
                    .collect(),
            ),
        }
    }

    /// `all()` → `has(NAMESPACE_LABEL)`, everywhere in the tree (the shape
    /// is kept, so the constructors' invariants still hold).
    fn all_to_namespaced(self) -> Expr {
        self.all_to_has(NAMESPACE_LABEL)
    }

    /// `all()` → `has(label)`, everywhere in the tree.
    fn all_to_has(self, label: &str) -> Expr {
        match self {
            Expr::All => Expr::Has(IStr::new(label)),
            Expr::Not(operand) => Expr::Not(Box::new(operand.all_to_has(label))),
            Expr::And(operands) => {
                Expr::And(operands.into_iter().map(|e| e.all_to_has(label)).collect())
            }
            Expr::Or(operands) => {
                Expr::Or(operands.into_iter().map(|e| e.all_to_has(label)).collect())
            }
            leaf => leaf,
        }
    }

    /// Binding strength when printed: `||` < `&&` < everything else. A child
    /// that binds less tightly than its context needs parentheses.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(_) => 0,
            Expr::And(_) => 1,
            _ => 2,
        }
    }

    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(label) => write!(f, "has({label})"),
            Expr::Compare { label, op, value } => {
                write!(f, "{label} {} ", op.as_str())?;
                write_quoted(f, value)
            }
            Expr::In { label, values } => write_set(f, label, "in", values),
            Expr::NotIn { label, values } => write_set(f, label, "not in", values),
            Expr::Not(operand) => {
                f.write_str("!")?;
                operand.write_operand(f, 2)
            }
            Expr::And(operands) => write_chain(f, operands, " && ", 2),
            Expr::Or(operands) => write_chain(f, operands, " || ", 1),
        }
    }

    /// Writes `self` as an operand of an operator whose operands must bind
    /// at least as tightly as `min_precedence`.
    fn write_operand(&self, f: &mut fmt::Formatter<'_>, min_precedence: u8) -> fmt::Result {
        if self.precedence() < min_precedence {
            f.write_str("(")?;
            self.write(f)?;
            f.write_str(")")
        } else {
            self.write(f)
        }
    }
}

fn write_chain(
    f: &mut fmt::Formatter<'_>,
    operands: &[Expr],
    separator: &str,
    min_precedence: u8,
) -> fmt::Result {
    for (i, operand) in operands.iter().enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        operand.write_operand(f, min_precedence)?;
    }
    Ok(())
}

fn write_set(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    op: &str,
    values: &BTreeSet<IStr>,
) -> fmt::Result {
    write!(f, "{label} {op} {{")?;
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_quoted(f, value)?;
    }
    f.write_str("}")
}

/// Double quotes unless the value contains one. The language has no escapes,
/// so a parsed value never contains both kinds of quote.
fn write_quoted(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let quote = if value.contains('"') { '\'' } else { '"' };
    write!(f, "{quote}{value}{quote}")
}

// ---------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-')
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind<'a> {
    /// A run of label-key characters: a label key or a contextual keyword.
    Word(&'a str),
    /// A quoted string, without its quotes.
    Str(&'a str),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    EqEq,
    NotEq,
    Bang,
    AndAnd,
    OrOr,
    /// A character that starts no token (e.g. a lone `=` or `&`). The lexer
    /// does not fail on it; the parser reports it as "found 'c'" together
    /// with what it expected there, which is the more useful message.
    Invalid(char),
    Eof,
}

#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    kind: TokenKind<'a>,
    /// Byte offset of the token's first character.
    pos: usize,
}

impl TokenKind<'_> {
    /// How the token is named in "found ..." messages.
    fn describe(&self) -> String {
        match self {
            TokenKind::Word(w) => format!("'{w}'"),
            TokenKind::Str(s) => format!("string {s:?}"),
            TokenKind::LParen => "'('".into(),
            TokenKind::RParen => "')'".into(),
            TokenKind::LBrace => "'{'".into(),
            TokenKind::RBrace => "'}'".into(),
            TokenKind::Comma => "','".into(),
            TokenKind::EqEq => "'=='".into(),
            TokenKind::NotEq => "'!='".into(),
            TokenKind::Bang => "'!'".into(),
            TokenKind::AndAnd => "'&&'".into(),
            TokenKind::OrOr => "'||'".into(),
            TokenKind::Invalid(c) => format!("'{c}'"),
            TokenKind::Eof => "end of input".into(),
        }
    }
}

struct Lexer<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(input: &'a str) -> Self {
        Lexer { input, pos: 0 }
    }

    fn next_token(&mut self) -> Result<Token<'a>, SelectorError> {
        let bytes = self.input.as_bytes();
        while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
        let start = self.pos;
        let rest = &self.input[start..];
        let (kind, len) = match rest.as_bytes() {
            [] => (TokenKind::Eof, 0),
            [b'(', ..] => (TokenKind::LParen, 1),
            [b')', ..] => (TokenKind::RParen, 1),
            [b'{', ..] => (TokenKind::LBrace, 1),
            [b'}', ..] => (TokenKind::RBrace, 1),
            [b',', ..] => (TokenKind::Comma, 1),
            [b'=', b'=', ..] => (TokenKind::EqEq, 2),
            [b'!', b'=', ..] => (TokenKind::NotEq, 2),
            [b'!', ..] => (TokenKind::Bang, 1),
            [b'&', b'&', ..] => (TokenKind::AndAnd, 2),
            [b'|', b'|', ..] => (TokenKind::OrOr, 2),
            [quote @ (b'"' | b'\''), ..] => {
                let body = &rest[1..];
                let Some(end) = body.find(char::from(*quote)) else {
                    return Err(SelectorError {
                        input: self.input.to_owned(),
                        position: start,
                        message: format!("unterminated string, missing closing {}", *quote as char),
                    });
                };
                (TokenKind::Str(&body[..end]), end + 2)
            }
            [b, ..] if is_label_byte(*b) => {
                let len = rest.bytes().take_while(|b| is_label_byte(*b)).count();
                (TokenKind::Word(&rest[..len]), len)
            }
            _ => {
                let c = rest.chars().next().expect("rest is not empty");
                (TokenKind::Invalid(c), c.len_utf8())
            }
        };
        self.pos += len;
        Ok(Token { kind, pos: start })
    }
}

// ---------------------------------------------------------------------------
// Parser: recursive descent, one function per precedence level
// ---------------------------------------------------------------------------

/// What may start an operand, for error messages.
const EXPECTED_OPERAND: &str = "a label, '!', '(', has(), all() or global()";
/// What may follow a label, for error messages.
const EXPECTED_OPERATOR: &str =
    "'==', '!=', 'in', 'not in', 'contains', 'starts with' or 'ends with'";

struct Parser<'a> {
    input: &'a str,
    lexer: Lexer<'a>,
    /// One token of lookahead, lexed on demand so that a lexer error (an
    /// unterminated string) is only reported once parsing reaches it and
    /// errors are always reported at the leftmost problem.
    peeked: Option<Token<'a>>,
    /// Current parenthesis nesting, bounded by [`MAX_NESTING`].
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            lexer: Lexer::new(input),
            peeked: None,
            depth: 0,
        }
    }

    fn peek(&mut self) -> Result<Token<'a>, SelectorError> {
        if let Some(token) = self.peeked {
            return Ok(token);
        }
        let token = self.lexer.next_token()?;
        self.peeked = Some(token);
        Ok(token)
    }

    fn bump(&mut self) -> Result<Token<'a>, SelectorError> {
        let token = self.peek()?;
        self.peeked = None;
        Ok(token)
    }

    fn error(&self, position: usize, message: impl Into<String>) -> SelectorError {
        SelectorError {
            input: self.input.to_owned(),
            position,
            message: message.into(),
        }
    }

    /// "expected X, found Y", or "unexpected end of input, expected X".
    fn expected(&self, what: &str, found: Token<'_>) -> SelectorError {
        let message = match found.kind {
            TokenKind::Eof => format!("unexpected end of input, expected {what}"),
            kind => format!("expected {what}, found {}", kind.describe()),
        };
        self.error(found.pos, message)
    }

    fn expect(&mut self, kind: TokenKind<'_>, what: &str) -> Result<(), SelectorError> {
        let token = self.bump()?;
        if token.kind == kind {
            Ok(())
        } else {
            Err(self.expected(what, token))
        }
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), SelectorError> {
        self.expect(TokenKind::Word(keyword), &format!("'{keyword}'"))
    }

    fn expect_string(&mut self) -> Result<String, SelectorError> {
        let token = self.bump()?;
        match token.kind {
            TokenKind::Str(s) => Ok(s.to_owned()),
            _ => Err(self.expected("a quoted string", token)),
        }
    }

    /// `selector := <empty> | or EOF`
    fn parse_selector(&mut self) -> Result<Expr, SelectorError> {
        if self.peek()?.kind == TokenKind::Eof {
            return Ok(Expr::All);
        }
        let expr = self.parse_or()?;
        let token = self.peek()?;
        match token.kind {
            TokenKind::Eof => Ok(expr),
            TokenKind::RParen => Err(self.error(
                token.pos,
                "unbalanced parenthesis: ')' without matching '('",
            )),
            _ => Err(self.error(
                token.pos,
                format!(
                    "trailing input: expected '&&', '||' or end of input, found {}",
                    token.kind.describe()
                ),
            )),
        }
    }

    /// `or := and ("||" and)*`
    fn parse_or(&mut self) -> Result<Expr, SelectorError> {
        let mut operands = vec![self.parse_and()?];
        while self.peek()?.kind == TokenKind::OrOr {
            self.bump()?;
            operands.push(self.parse_and()?);
        }
        Ok(Expr::or(operands))
    }

    /// `and := unary ("&&" unary)*`
    fn parse_and(&mut self) -> Result<Expr, SelectorError> {
        let mut operands = vec![self.parse_unary()?];
        while self.peek()?.kind == TokenKind::AndAnd {
            self.bump()?;
            operands.push(self.parse_unary()?);
        }
        Ok(Expr::and(operands))
    }

    /// `unary := "!"* primary`; a loop rather than recursion so a long run of
    /// `!`s cannot exhaust the stack.
    fn parse_unary(&mut self) -> Result<Expr, SelectorError> {
        let mut negations = 0usize;
        while self.peek()?.kind == TokenKind::Bang {
            self.bump()?;
            negations += 1;
        }
        let expr = self.parse_primary()?;
        Ok(if negations % 2 == 1 {
            Expr::not(expr)
        } else {
            expr
        })
    }

    fn parse_primary(&mut self) -> Result<Expr, SelectorError> {
        let token = self.bump()?;
        match token.kind {
            TokenKind::LParen => self.parse_parenthesized(token.pos),
            TokenKind::Word(word) => {
                // `has`, `all` and `global` are functions only when a `(`
                // follows; otherwise they are ordinary label keys.
                if matches!(word, "has" | "all" | "global")
                    && self.peek()?.kind == TokenKind::LParen
                {
                    self.bump()?;
                    self.parse_function(word)
                } else {
                    self.parse_comparison(word)
                }
            }
            _ => Err(self.expected(EXPECTED_OPERAND, token)),
        }
    }

    /// After `(`: `or ")"`.
    fn parse_parenthesized(&mut self, open_pos: usize) -> Result<Expr, SelectorError> {
        if self.depth >= MAX_NESTING {
            return Err(self.error(
                open_pos,
                format!("too deeply nested (more than {MAX_NESTING} levels of parentheses)"),
            ));
        }
        self.depth += 1;
        let expr = self.parse_or()?;
        self.depth -= 1;
        let token = self.bump()?;
        match token.kind {
            TokenKind::RParen => Ok(expr),
            TokenKind::Eof => Err(self.error(token.pos, "unbalanced parenthesis: missing ')'")),
            _ => Err(self.expected("'&&', '||' or ')'", token)),
        }
    }

    /// After `has(`, `all(` or `global(`.
    fn parse_function(&mut self, name: &str) -> Result<Expr, SelectorError> {
        let expr = match name {
            "has" => {
                let token = self.bump()?;
                match token.kind {
                    TokenKind::Word(label) => Expr::Has(IStr::new(label)),
                    _ => return Err(self.expected("a label key", token)),
                }
            }
            "all" => Expr::All,
            "global" => Expr::Global,
            _ => unreachable!("caller only passes known function names"),
        };
        self.expect(TokenKind::RParen, "')'")?;
        Ok(expr)
    }

    /// After a label: the operator and its operand.
    fn parse_comparison(&mut self, label: &str) -> Result<Expr, SelectorError> {
        let label = label.to_owned();
        let token = self.bump()?;
        let op = match token.kind {
            TokenKind::EqEq => CompareOp::Eq,
            TokenKind::NotEq => CompareOp::Ne,
            TokenKind::Word("contains") => CompareOp::Contains,
            TokenKind::Word("starts") => {
                self.expect_keyword("with")?;
                CompareOp::StartsWith
            }
            TokenKind::Word("ends") => {
                self.expect_keyword("with")?;
                CompareOp::EndsWith
            }
            TokenKind::Word("in") => {
                let values = self.parse_set()?;
                return Ok(Expr::In {
                    label: label.into(),
                    values,
                });
            }
            TokenKind::Word("not") => {
                self.expect_keyword("in")?;
                let values = self.parse_set()?;
                return Ok(Expr::NotIn {
                    label: label.into(),
                    values,
                });
            }
            _ => return Err(self.expected(EXPECTED_OPERATOR, token)),
        };
        let value = self.expect_string()?;
        Ok(Expr::Compare {
            label: label.into(),
            op,
            value: value.into(),
        })
    }

    /// `set := "{" (string ("," string)* ","?)? "}"`
    fn parse_set(&mut self) -> Result<BTreeSet<IStr>, SelectorError> {
        self.expect(TokenKind::LBrace, "'{'")?;
        let mut values = BTreeSet::new();
        loop {
            // At the start, or after a comma: a value or the end of the set.
            let token = self.bump()?;
            match token.kind {
                TokenKind::RBrace => return Ok(values),
                TokenKind::Str(s) => {
                    values.insert(IStr::new(s));
                }
                _ => return Err(self.expected("a quoted string or '}'", token)),
            }
            // After a value: a comma or the end of the set.
            let token = self.bump()?;
            match token.kind {
                TokenKind::RBrace => return Ok(values),
                TokenKind::Comma => {}
                _ => return Err(self.expected("',' or '}'", token)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Asserts `text` matches exactly the label sets in `yes` and none in `no`.
    fn check_matches(text: &str, yes: &[&[(&str, &str)]], no: &[&[(&str, &str)]]) {
        let s = sel(text);
        for l in yes {
            assert!(s.matches(&labels(l)), "{text:?} should match {l:?}");
        }
        for l in no {
            assert!(!s.matches(&labels(l)), "{text:?} should not match {l:?}");
        }
    }

    fn check_canonical(text: &str, expect: Expect) {
        let s = sel(text);
        let canonical = s.canonical();
        expect.assert_eq(&canonical);
        // Round trip: the canonical text parses back to the same selector
        // and prints identically.
        let reparsed = sel(&canonical);
        assert_eq!(reparsed, s, "round trip of {text:?} via {canonical:?}");
        assert_eq!(reparsed.canonical(), canonical);
    }

    fn check_error(text: &str, position: usize, message: &str) {
        let err = Selector::parse(text).expect_err(text);
        assert_eq!(
            (err.position, err.message.as_str()),
            (position, message),
            "error for {text:?}"
        );
        assert_eq!(err.input, text);
    }

    // --- operators --------------------------------------------------------

    #[test]
    fn eq() {
        check_matches(
            "role == 'db'",
            &[&[("role", "db")], &[("role", "db"), ("x", "y")]],
            &[&[], &[("role", "web")], &[("role", "")], &[("other", "db")]],
        );
        check_matches("role == ''", &[&[("role", "")]], &[&[], &[("role", "x")]]);
    }

    #[test]
    fn ne() {
        check_matches(
            "role != 'db'",
            &[&[], &[("role", "web")], &[("other", "db")], &[("role", "")]],
            &[&[("role", "db")]],
        );
    }

    #[test]
    fn in_set() {
        check_matches(
            "role in {'db', 'web'}",
            &[&[("role", "db")], &[("role", "web")]],
            &[&[], &[("role", "cache")], &[("other", "db")]],
        );
        check_matches(
            "role in {}",
            &[],
            &[&[], &[("role", "")], &[("role", "db")]],
        );
    }

    #[test]
    fn not_in_set() {
        check_matches(
            "role not in {'db', 'web'}",
            &[&[], &[("role", "cache")], &[("other", "db")]],
            &[&[("role", "db")], &[("role", "web")]],
        );
        check_matches("role not in {}", &[&[], &[("role", "db")]], &[]);
    }

    #[test]
    fn has() {
        check_matches(
            "has(role)",
            &[&[("role", "db")], &[("role", "")]],
            &[&[], &[("roles", "db")]],
        );
        check_matches("!has(role)", &[&[], &[("roles", "db")]], &[&[("role", "")]]);
        check_matches("! has ( role )", &[&[]], &[&[("role", "")]]);
    }

    #[test]
    fn contains_starts_ends() {
        check_matches(
            "name contains 'ab'",
            &[&[("name", "ab")], &[("name", "xaby")]],
            &[&[], &[("name", "a-b")], &[("other", "ab")]],
        );
        check_matches(
            "name starts with 'ab'",
            &[&[("name", "ab")], &[("name", "abc")]],
            &[&[], &[("name", "cab")]],
        );
        check_matches(
            "name ends with 'ab'",
            &[&[("name", "ab")], &[("name", "cab")]],
            &[&[], &[("name", "abc")]],
        );
        // The empty string is a prefix/suffix/substring of every value, but
        // the label must still be present.
        check_matches("name contains ''", &[&[("name", "")]], &[&[]]);
        check_matches("name starts  with\t''", &[&[("name", "x")]], &[&[]]);
        check_matches("name ends with ''", &[&[("name", "x")]], &[&[]]);
    }

    #[test]
    fn all_and_global() {
        for text in ["all()", "", "   \t\n", "all ( )"] {
            let s = sel(text);
            assert!(s.is_all(), "{text:?}");
            assert!(s.matches(&labels(&[])));
            assert!(s.matches(&labels(&[("a", "b")])));
        }
        assert!(Selector::all().is_all());
        assert_eq!(Selector::default(), Selector::all());
        assert!(!sel("has(a)").is_all());

        check_matches(
            "global()",
            &[&[], &[("role", "db")]],
            &[&[(NAMESPACE_LABEL, "default")], &[(NAMESPACE_LABEL, "")]],
        );
        check_matches("!global()", &[&[(NAMESPACE_LABEL, "ns")]], &[&[]]);
    }

    #[test]
    fn keywords_are_contextual() {
        // Function names and operator words can be label keys.
        check_matches("has == 'x'", &[&[("has", "x")]], &[&[]]);
        check_matches("all != 'x'", &[&[]], &[&[("all", "x")]]);
        check_matches("in in {'a'}", &[&[("in", "a")]], &[&[]]);
        check_matches("not not in {'a'}", &[&[]], &[&[("not", "a")]]);
        check_matches("has(global)", &[&[("global", "")]], &[&[]]);
    }

    #[test]
    fn label_keys() {
        check_matches(
            "projectcalico.org/namespace == 'default' && app.kubernetes.io/name-x_1 == 'a'",
            &[&[
                ("projectcalico.org/namespace", "default"),
                ("app.kubernetes.io/name-x_1", "a"),
            ]],
            &[&[("projectcalico.org/namespace", "default")]],
        );
    }

    // --- precedence and grouping -----------------------------------------

    #[test]
    fn and_binds_tighter_than_or() {
        let text = "a == 'x' || b == 'y' && c == 'z'";
        // a || (b && c)
        check_matches(
            text,
            &[&[("a", "x")], &[("b", "y"), ("c", "z")]],
            &[&[("b", "y")], &[("c", "z")], &[]],
        );
        assert_eq!(sel(text), sel("a == 'x' || (b == 'y' && c == 'z')"));
        assert_ne!(sel(text), sel("(a == 'x' || b == 'y') && c == 'z'"));
        check_matches(
            "(a == 'x' || b == 'y') && c == 'z'",
            &[&[("a", "x"), ("c", "z")], &[("b", "y"), ("c", "z")]],
            &[&[("a", "x")], &[("c", "z")]],
        );
    }

    #[test]
    fn not_binds_tighter_than_and() {
        // (!has(a)) && has(b)
        check_matches(
            "!has(a) && has(b)",
            &[&[("b", "")]],
            &[&[], &[("a", ""), ("b", "")]],
        );
        // !(has(a) && has(b))
        check_matches(
            "!(has(a) && has(b))",
            &[&[], &[("a", "")], &[("b", "")]],
            &[&[("a", ""), ("b", "")]],
        );
        // `!` applies to the whole comparison.
        check_matches("!a == 'x'", &[&[], &[("a", "y")]], &[&[("a", "x")]]);
        assert_eq!(sel("!a == 'x'"), sel("!(a == 'x')"));
    }

    #[test]
    fn negation_chains() {
        check_matches("!!has(a)", &[&[("a", "")]], &[&[]]);
        check_matches("!!!has(a)", &[&[]], &[&[("a", "")]]);
        check_matches("!(!(has(a)))", &[&[("a", "")]], &[&[]]);
        assert_eq!(sel("!!has(a)"), sel("has(a)"));
        assert_eq!(sel("!(!has(a))"), sel("has(a)"));
    }

    #[test]
    fn parentheses() {
        assert_eq!(sel("((a == 'x'))"), sel("a == 'x'"));
        assert_eq!(sel("(a == 'x') && (b == 'y')"), sel("a == 'x' && b == 'y'"));
        assert_eq!(
            sel("(has(a) && has(b)) && has(c)"),
            sel("has(a) && (has(b) && has(c))")
        );
        check_matches(
            "has(a) && (has(b) || has(c)) && !(has(d) || has(e))",
            &[&[("a", ""), ("b", "")], &[("a", ""), ("c", "")]],
            &[&[("a", "")], &[("a", ""), ("b", ""), ("e", "")]],
        );
    }

    #[test]
    fn nesting_limit() {
        let ok = format!(
            "{}has(a){}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        assert_eq!(sel(&ok), sel("has(a)"));
        let deep = format!(
            "{}has(a){}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        );
        check_error(
            &deep,
            MAX_NESTING,
            "too deeply nested (more than 100 levels of parentheses)",
        );
        // Long flat chains and runs of `!` are fine.
        let many_bangs = format!("{}has(a)", "!".repeat(10_001));
        assert_eq!(sel(&many_bangs), sel("!has(a)"));
        let chain = vec!["has(a)"; 10_000].join(" && ");
        assert!(sel(&chain).matches(&labels(&[("a", "")])));
    }

    // --- quoting and whitespace -------------------------------------------

    #[test]
    fn quoting() {
        assert_eq!(sel("a == 'x'"), sel("a == \"x\""));
        check_matches(
            "a == 'it\"s'",
            &[&[("a", "it\"s")]],
            &[&[("a", "it's")], &[("a", "its")]],
        );
        check_matches("a == \"it's\"", &[&[("a", "it's")]], &[&[("a", "it\"s")]]);
        check_matches(
            "a == ' two  spaces '",
            &[&[("a", " two  spaces ")]],
            &[&[("a", "two spaces")]],
        );
        // Operators and parentheses inside strings are just characters.
        check_matches(
            "a == '&& || ( ) { } , ! =='",
            &[&[("a", "&& || ( ) { } , ! ==")]],
            &[],
        );
        check_matches(
            "a in {'x\"', \"y'\", 'with space'}",
            &[&[("a", "x\"")], &[("a", "y'")], &[("a", "with space")]],
            &[&[("a", "x")]],
        );
        check_matches("a == 'héllo'", &[&[("a", "héllo")]], &[]);
    }

    #[test]
    fn whitespace_is_insignificant() {
        let canonical = sel("a == 'x' && b in {'y'} || !has(c)");
        for text in [
            "a=='x'&&b in{'y'}||!has(c)",
            "  a  ==  'x'  &&  b  in  {  'y'  }  ||  !  has  (  c  )  ",
            "a ==\n'x'\t&&\r\nb in {'y'} ||\n!has(c)",
        ] {
            assert_eq!(sel(text), canonical, "{text:?}");
        }
        assert_eq!(sel("a not\n in {}"), sel("a not in {}"));
    }

    // --- canonical form ----------------------------------------------------

    #[test]
    fn canonical_goldens() {
        check_canonical("", expect![[r#"all()"#]]);
        check_canonical("all()", expect![[r#"all()"#]]);
        check_canonical("global()", expect![[r#"global()"#]]);
        check_canonical("role=='db'", expect![[r#"role == "db""#]]);
        check_canonical("role != \"db\"", expect![[r#"role != "db""#]]);
        check_canonical("has( role )", expect![[r#"has(role)"#]]);
        check_canonical("! has(role)", expect![[r#"!has(role)"#]]);
        check_canonical("!(a == 'x')", expect![[r#"!a == "x""#]]);
        check_canonical("a contains 'x'", expect![[r#"a contains "x""#]]);
        check_canonical("a starts   with 'x'", expect![[r#"a starts with "x""#]]);
        check_canonical("a ends with 'x'", expect![[r#"a ends with "x""#]]);
        check_canonical(
            "a in {'z', 'b', \"a\", 'b'}",
            expect![[r#"a in {"a", "b", "z"}"#]],
        );
        check_canonical("a not in {'y','x',}", expect![[r#"a not in {"x", "y"}"#]]);
        check_canonical("a in {}", expect![[r#"a in {}"#]]);
        check_canonical("a == 'say \"hi\"'", expect![[r#"a == 'say "hi"'"#]]);
        check_canonical("a == \"it's\"", expect![[r#"a == "it's""#]]);
        check_canonical("a in {'q\"', \"p\"}", expect![[r#"a in {"p", 'q"'}"#]]);
        check_canonical(
            "(role=='db')&&!has( quarantine )",
            expect![[r#"role == "db" && !has(quarantine)"#]],
        );
        check_canonical(
            "a == 'x' || b == 'y' && c == 'z'",
            expect![[r#"a == "x" || b == "y" && c == "z""#]],
        );
        check_canonical(
            "(a == 'x' || b == 'y') && c == 'z'",
            expect![[r#"(a == "x" || b == "y") && c == "z""#]],
        );
        check_canonical(
            "((has(a) && has(b)) && (has(c) && has(d)))",
            expect![[r#"has(a) && has(b) && has(c) && has(d)"#]],
        );
        check_canonical(
            "has(a) || (has(b) || has(c))",
            expect![[r#"has(a) || has(b) || has(c)"#]],
        );
        check_canonical(
            "!(has(a) || has(b)) && !(has(c) && has(d))",
            expect![[r#"!(has(a) || has(b)) && !(has(c) && has(d))"#]],
        );
        check_canonical("!!!(has(a))", expect![[r#"!has(a)"#]]);
        check_canonical("has(b) && has(a)", expect![[r#"has(b) && has(a)"#]]);
        check_canonical("all() && has(a)", expect![[r#"all() && has(a)"#]]);
        check_canonical("has == 'x'", expect![[r#"has == "x""#]]);
    }

    #[test]
    fn equivalent_spellings_share_canonical_form() {
        let groups: &[&[&str]] = &[
            &[
                "role == 'db' && !has(quarantine)",
                "(role=='db')&&!has( quarantine )",
                "((role == \"db\")) && !!!has(quarantine)",
                "  role   ==   'db'   &&   !(has(quarantine))  ",
            ],
            &[
                "a in {'x', 'y'}",
                "a in {\"y\", 'x'}",
                "a in {'y','x','y',}",
                "(a in{'x','y'})",
            ],
            &["", "all()", "  ", "(all())", "!!all()"],
        ];
        for group in groups {
            let first = sel(group[0]);
            for text in &group[1..] {
                let s = sel(text);
                assert_eq!(s, first, "{text:?} vs {:?}", group[0]);
                assert_eq!(s.canonical(), first.canonical());
            }
        }
    }

    #[test]
    fn round_trip() {
        for text in [
            "a == 'x' || b == 'y' && c == 'z'",
            "!(a == 'x' || b != 'y') && (c in {'1', '2'} || d not in {})",
            "!(!(has(a) && has(b)) || global())",
            "x == 'a\"b' || y == \"c'd\"",
            "has(a) && (has(b) || (has(c) && (has(d) || has(e))))",
            "in in {'in'} && not not in {'not'} && has == 'has'",
        ] {
            let s = sel(text);
            assert_eq!(sel(&s.canonical()), s, "{text:?} -> {}", s.canonical());
        }
    }

    #[test]
    fn display_and_from_str() {
        let s: Selector = "role=='db'".parse().unwrap();
        assert_eq!(s.to_string(), "role == \"db\"");
        assert_eq!(format!("{s}"), s.canonical());
        assert!("role = 'db'".parse::<Selector>().is_err());
    }

    #[test]
    fn ordering_and_hashing_are_structural() {
        let set: BTreeSet<Selector> = ["has(a)", "has( a )", "has(b)", "(has(a))"]
            .iter()
            .map(|t| sel(t))
            .collect();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn serde_as_canonical_string() {
        let s = sel("(role=='db')");
        assert_eq!(serde_json::to_string(&s).unwrap(), r#""role == \"db\"""#);
        let back: Selector = serde_json::from_str(r#""role == 'db'""#).unwrap();
        assert_eq!(back, s);
        let empty: Selector = serde_json::from_str(r#""""#).unwrap();
        assert!(empty.is_all());
        let err = serde_json::from_str::<Selector>(r#""role = 'db'""#).unwrap_err();
        assert!(err.to_string().contains("at position 5"), "{err}");
    }

    // --- with_label_prefix / and ------------------------------------------

    #[test]
    fn label_prefix() {
        let s = sel("user == 'bob'").with_label_prefix("pcns.");
        assert_eq!(s.canonical(), "pcns.user == \"bob\"");
        assert!(s.matches(&labels(&[("pcns.user", "bob")])));
        assert!(!s.matches(&labels(&[("user", "bob")])));

        let s = sel(
            "!has(a) && (b != 'x' || c in {'y'} || d not in {'z'} || e contains 'p' \
             || f starts with 'q' || g ends with 'r') && all() && global()",
        )
        .with_label_prefix("pcns.");
        expect![[r#"!has(pcns.a) && (pcns.b != "x" || pcns.c in {"y"} || pcns.d not in {"z"} || pcns.e contains "p" || pcns.f starts with "q" || pcns.g ends with "r") && all() && global()"#]]
            .assert_eq(&s.canonical());
        assert_eq!(sel(&s.canonical()), s);

        assert!(Selector::all().with_label_prefix("pcns.").is_all());
        assert_eq!(
            sel("has(a)")
                .with_label_prefix("p/")
                .with_label_prefix("q."),
            sel("has(q.p/a)")
        );
    }

    #[test]
    fn namespace_selectors_turn_all_into_every_namespace() {
        let s = sel("all()").namespace_selector_with_prefix("pcns.");
        assert_eq!(s.canonical(), "has(projectcalico.org/namespace)");
        let s = sel("team == 'a' || !(all() && has(x)) || global()")
            .namespace_selector_with_prefix("pcns.");
        expect![[
            r#"pcns.team == "a" || !(has(projectcalico.org/namespace) && has(pcns.x)) || global()"#
        ]]
        .assert_eq(&s.canonical());
        assert_eq!(sel(&s.canonical()), s);
        // A quoted "all()" is a value, not the function.
        let s = sel("a == 'all()'").namespace_selector_with_prefix("pcns.");
        assert_eq!(s.canonical(), "pcns.a == \"all()\"");
    }

    #[test]
    fn and_combinator() {
        let a = sel("has(a)");
        let b = sel("b == 'x' || c == 'y'");
        assert_eq!(Selector::all().and(&a), a);
        assert_eq!(a.and(&Selector::all()), a);
        assert!(Selector::all().and(&Selector::all()).is_all());

        let ab = a.and(&b);
        assert_eq!(ab.canonical(), "has(a) && (b == \"x\" || c == \"y\")");
        assert_eq!(ab, sel("has(a) && (b == 'x' || c == 'y')"));
        assert_eq!(
            b.and(&a).canonical(),
            "(b == \"x\" || c == \"y\") && has(a)"
        );
        assert!(ab.matches(&labels(&[("a", ""), ("c", "y")])));
        assert!(!ab.matches(&labels(&[("a", "")])));
        assert!(!ab.matches(&labels(&[("c", "y")])));

        // Chains stay flat so the result equals the parsed conjunction.
        let abc = sel("has(a) && has(b)").and(&sel("has(c) && has(d)"));
        assert_eq!(abc, sel("has(a) && has(b) && has(c) && has(d)"));
        assert_eq!(sel(&abc.canonical()), abc);
    }

    // --- errors -----------------------------------------------------------

    #[test]
    fn errors_operator() {
        let op = "'==', '!=', 'in', 'not in', 'contains', 'starts with' or 'ends with'";
        check_error("role = 'x'", 5, &format!("expected {op}, found '='"));
        check_error(
            "role",
            4,
            &format!("unexpected end of input, expected {op}"),
        );
        check_error("role 'x'", 5, &format!("expected {op}, found string \"x\""));
        check_error("role is 'x'", 5, &format!("expected {op}, found 'is'"));
        check_error("a notin {}", 2, &format!("expected {op}, found 'notin'"));
        check_error("a ! = 'x'", 2, &format!("expected {op}, found '!'"));
        check_error("foo(a)", 3, &format!("expected {op}, found '('"));
        check_error("a not {'x'}", 6, "expected 'in', found '{'");
        check_error("a starts 'x'", 9, "expected 'with', found string \"x\"");
        check_error("a ends", 6, "unexpected end of input, expected 'with'");
    }

    #[test]
    fn errors_values() {
        check_error("role == 'x", 8, "unterminated string, missing closing '");
        check_error("role == \"x", 8, "unterminated string, missing closing \"");
        check_error("role == x", 8, "expected a quoted string, found 'x'");
        check_error(
            "role ==",
            7,
            "unexpected end of input, expected a quoted string",
        );
        check_error(
            "a contains {'x'}",
            11,
            "expected a quoted string, found '{'",
        );
        check_error("a in 'x'", 5, "expected '{', found string \"x\"");
        check_error(
            "a in {'x' 'y'}",
            10,
            "expected ',' or '}', found string \"y\"",
        );
        check_error("a in {,}", 6, "expected a quoted string or '}', found ','");
        check_error(
            "a in {'x',,}",
            10,
            "expected a quoted string or '}', found ','",
        );
        check_error(
            "a in {'x'",
            9,
            "unexpected end of input, expected ',' or '}'",
        );
        check_error("a in {x}", 6, "expected a quoted string or '}', found 'x'");
        // Trailing commas are accepted, as in felix.
        assert_eq!(sel("a in {'x',}"), sel("a in {'x'}"));
    }

    #[test]
    fn errors_functions() {
        check_error("has()", 4, "expected a label key, found ')'");
        check_error("has(role", 8, "unexpected end of input, expected ')'");
        check_error("has(a b)", 6, "expected ')', found 'b'");
        check_error("has('a')", 4, "expected a label key, found string \"a\"");
        check_error("all(a)", 4, "expected ')', found 'a'");
        check_error("global(", 7, "unexpected end of input, expected ')'");
    }

    #[test]
    fn errors_structure() {
        let operand = "a label, '!', '(', has(), all() or global()";
        check_error("(a == 'b'", 9, "unbalanced parenthesis: missing ')'");
        check_error("((has(a))", 9, "unbalanced parenthesis: missing ')'");
        check_error(
            "a == 'b')",
            8,
            "unbalanced parenthesis: ')' without matching '('",
        );
        check_error("(a == 'b' c)", 10, "expected '&&', '||' or ')', found 'c'");
        check_error(
            "a == 'b' &&",
            11,
            &format!("unexpected end of input, expected {operand}"),
        );
        check_error(
            "a == 'b' || ",
            12,
            &format!("unexpected end of input, expected {operand}"),
        );
        check_error(
            "a == 'b' c",
            9,
            "trailing input: expected '&&', '||' or end of input, found 'c'",
        );
        check_error(
            "a == 'b' & b == 'c'",
            9,
            "trailing input: expected '&&', '||' or end of input, found '&'",
        );
        check_error("&& a", 0, &format!("expected {operand}, found '&&'"));
        check_error("()", 1, &format!("expected {operand}, found ')'"));
        check_error(
            "!",
            1,
            &format!("unexpected end of input, expected {operand}"),
        );
        check_error(
            "'x' == a",
            0,
            &format!("expected {operand}, found string \"x\""),
        );
        check_error(
            "a == 'b' && || c",
            12,
            &format!("expected {operand}, found '||'"),
        );
        check_error("é == 'x'", 0, &format!("expected {operand}, found 'é'"));
        // Positions are byte offsets: 'é' takes two bytes.
        check_error(
            "a == 'é' b",
            10,
            "trailing input: expected '&&', '||' or end of input, found 'b'",
        );
        // The leftmost problem wins even if a later string is unterminated.
        check_error("&& a == 'x", 0, &format!("expected {operand}, found '&&'"));
    }

    #[test]
    fn error_display() {
        let err = Selector::parse("role = 'x'").unwrap_err();
        expect![[r#"invalid selector "role = 'x'": expected '==', '!=', 'in', 'not in', 'contains', 'starts with' or 'ends with', found '=' at position 5"#]]
            .assert_eq(&err.to_string());
        let err = Selector::parse("has(role").unwrap_err();
        expect![[
            r#"invalid selector "has(role": unexpected end of input, expected ')' at position 8"#
        ]]
        .assert_eq(&err.to_string());
        let err = Selector::parse("a == \"x").unwrap_err();
        expect![[
            r#"invalid selector "a == \"x": unterminated string, missing closing " at position 5"#
        ]]
        .assert_eq(&err.to_string());
    }
}
