//! Label maps, compact: a sorted list of interned (key, value) pairs.
//!
//! Why: the node agent keeps every endpoint in the cluster (250,000 pods in
//! the benchmark). As a `BTreeMap<String, String>`, four labels cost about
//! 850 bytes per pod (a B-tree leaf sized for eleven entries, and eight
//! string allocations); as a sorted list of shared strings, 32 bytes per
//! label; as a list of shared pairs, 8 bytes per label: a pair such as
//! `app=web` or the namespace label exists once in the process, however
//! many pods carry it. The API follows `BTreeMap`'s (sorted
//! iteration, `get`, `insert`, `extend`), and serde reads and writes a
//! plain map, so the format does not change.
use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Label key → value, sorted by key, each key once.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<Pair>);

/// One label, shared by every map that carries it ([`intern_pair`]).
type Pair = Arc<(Arc<str>, Arc<str>)>;

/// A set of shared values: equal values share one allocation. Values
/// nobody else holds any more are dropped whenever the set has doubled
/// since the last sweep (label values can be unique per pod, and pods come
/// and go). Label strings, label pairs, and the profile and port lists of
/// endpoints ([`crate::endpoint`]) each have one.
pub(crate) struct Interner<T: ?Sized>(LazyLock<Mutex<InternTable<T>>>);

struct InternTable<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub(crate) const fn new() -> Self {
        Interner(LazyLock::new(|| {
            Mutex::new(InternTable {
                values: HashSet::new(),
                sweep_at: 1024,
            })
        }))
    }

    /// The shared copy of `value`; `make` builds it when there is none.
    pub(crate) fn share(&self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        // A poisoned lock only means another thread panicked while holding
        // it; the table itself is still a valid set.
        let mut table = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(shared) = table.values.get(value) {
            return shared.clone();
        }
        let shared = make();
        table.values.insert(shared.clone());
        if table.values.len() >= table.sweep_at {
            table.values.retain(|v| Arc::strong_count(v) > 1);
            table.sweep_at = (table.values.len() * 2).max(1024);
        }
        shared
    }
}

static STRINGS: Interner<str> = Interner::new();
static PAIRS: Interner<(Arc<str>, Arc<str>)> = Interner::new();

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    STRINGS.share(s, || Arc::from(s))
}

/// The shared copy of the pair (`key`, `value`), whose strings are shared.
fn intern_pair(key: Arc<str>, value: Arc<str>) -> Pair {
    let pair = (key, value);
    PAIRS.share(&pair, || Arc::new(pair.clone()))
}

/// A string shared through the same interner as label strings: for the
/// fields every endpoint repeats (its node, orchestrator, profiles, port
/// names, `apiVersion`), which as `String`s cost each of 250,000 pods an
/// allocation apiece. Reads as a `&str` (`Deref`), compares with strings,
/// and serializes as one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IStr(Arc<str>);

impl IStr {
    #[must_use]
    pub fn new(s: &str) -> IStr {
        IStr(intern(s))
    }

    /// `s` shared only between this value's clones, not interned: for a
    /// string unique to one object (a resource key's name), which the
    /// interner's table would only add to. Compares, hashes and orders as
    /// any other `IStr` (by content).
    #[must_use]
    pub fn not_interned(s: &str) -> IStr {
        IStr(Arc::from(s))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The empty string, interned once: a missing field defaults to it on
/// every endpoint decoded, without taking the interner's lock.
static EMPTY: LazyLock<IStr> = LazyLock::new(|| IStr::new(""));

impl Default for IStr {
    fn default() -> IStr {
        EMPTY.clone()
    }
}

impl std::ops::Deref for IStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for IStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for IStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for IStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl From<&str> for IStr {
    fn from(s: &str) -> IStr {
        IStr::new(s)
    }
}

impl From<String> for IStr {
    fn from(s: String) -> IStr {
        IStr::new(&s)
    }
}

impl From<&String> for IStr {
    fn from(s: &String) -> IStr {
        IStr::new(s)
    }
}

impl From<IStr> for String {
    fn from(s: IStr) -> String {
        s.0.to_string()
    }
}

impl PartialEq<str> for IStr {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for IStr {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for IStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<IStr> for str {
    fn eq(&self, other: &IStr) -> bool {
        *self == *other.0
    }
}

impl PartialEq<IStr> for &str {
    fn eq(&self, other: &IStr) -> bool {
        **self == *other.0
    }
}

impl PartialEq<IStr> for String {
    fn eq(&self, other: &IStr) -> bool {
        **self == *other.0
    }
}

impl Serialize for IStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IStr, D::Error> {
        struct IStrVisitor;
        impl Visitor<'_> for IStrVisitor {
            type Value = IStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IStr, E> {
                Ok(IStr::new(v))
            }
        }
        d.deserialize_str(IStrVisitor)
    }
}

impl Labels {
    #[must_use]
    pub const fn new() -> Labels {
        Labels(Vec::new())
    }

    /// Gives back the spare capacity of the pairs (the state keeps one
    /// `Labels` per pod).
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|p| (*p.0).cmp(key))
    }

    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| &*self.0[i].1)
    }

    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`; the value it had, if any. Takes `String`s as
    /// `BTreeMap<String, String>::insert` does, so that `"k".into()` reads
    /// the same; [`Labels::set`] takes any string.
    #[allow(clippy::needless_pass_by_value)]
    pub fn insert(&mut self, key: String, value: String) -> Option<Arc<str>> {
        self.set(&key, &value)
    }

    /// Sets `key` to `value`; the value it had, if any.
    pub fn set(&mut self, key: &str, value: &str) -> Option<Arc<str>> {
        let value = intern(value);
        match self.position(key) {
            Ok(i) => {
                let pair = intern_pair(self.0[i].0.clone(), value);
                Some(std::mem::replace(&mut self.0[i], pair).1.clone())
            }
            Err(i) => {
                self.0.insert(i, intern_pair(intern(key), value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<str>> {
        self.position(key).ok().map(|i| self.0.remove(i).1.clone())
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|p| keep(&p.0, &p.1));
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (key, value) in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> + ExactSizeIterator {
        self.0.iter().map(|p| (&*p.0, &*p.1))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.0.iter().map(|p| &*p.0)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.0.iter().map(|p| &*p.1)
    }

    /// The labels of `other` over these (its values win), sharing the
    /// pairs instead of interning them again.
    pub fn overlay(&mut self, other: &Labels) {
        for p in &other.0 {
            match self.position(&p.0) {
                Ok(i) => self.0[i] = p.clone(),
                Err(i) => self.0.insert(i, p.clone()),
            }
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for Labels {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, pairs: I) {
        for (k, v) in pairs {
            self.set(k.as_ref(), v.as_ref());
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Labels {
        let mut labels = Labels::new();
        labels.extend(pairs);
        labels
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Labels {
        pairs.into_iter().collect()
    }
}

impl IntoIterator for Labels {
    type Item = (Arc<str>, Arc<str>);
    type IntoIter = std::iter::Map<std::vec::IntoIter<Pair>, fn(Pair) -> (Arc<str>, Arc<str>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().map(|p| (p.0.clone(), p.1.clone()))
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut labels = Labels::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    // As a map: a repeated key keeps its last value.
                    labels.set(&k, &v);
                }
                Ok(labels)
            }
        }
        d.deserialize_map(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut l = Labels::new();
        assert_eq!(l.set("b", "2"), None);
        assert_eq!(l.insert("a".into(), "1".into()), None);
        assert_eq!(l.set("b", "3").as_deref(), Some("2"));
        assert_eq!(l.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "3")]);
        assert_eq!(l.get("b"), Some("3"));
        assert!(!l.contains_key("c"));
        assert_eq!(l.remove("a").as_deref(), Some("1"));
        assert_eq!(l.len(), 1);
        let mut base = Labels::from([("x", "1"), ("b", "0")]);
        base.overlay(&l);
        assert_eq!(format!("{base:?}"), r#"{"b": "3", "x": "1"}"#);
    }

    #[test]
    fn equal_strings_are_shared() {
        let a = Labels::from([("app", "web-interned-test")]);
        let b = Labels::from([("app", "web-interned-test")]);
        assert!(Arc::ptr_eq(&a.0[0], &b.0[0]));
        let c = Labels::from([("role", "web-interned-test")]);
        assert!(Arc::ptr_eq(&a.0[0].1, &c.0[0].1));
        // A pair changed in one map is a new pair; the other keeps its own.
        let mut d = a.clone();
        d.set("app", "db-interned-test");
        assert_eq!(a.get("app"), Some("web-interned-test"));
        assert_eq!(d.get("app"), Some("db-interned-test"));
    }

    #[test]
    fn serde_reads_and_writes_a_map() {
        let l: Labels = serde_json::from_str(r#"{"z": "1", "a": "2"}"#).unwrap();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a", "z"]);
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"a":"2","z":"1"}"#);
        assert!(serde_json::from_str::<Labels>(r#"{"a": 1}"#).is_err());
    }
}
