//! The selector parser never panics, and a parsed selector's canonical text
//! parses back to an equal selector (with the same canonical text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::selector::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(selector) = Selector::parse(text) else {
        return;
    };
    let canonical = selector.canonical();
    let reparsed = Selector::parse(&canonical).unwrap_or_else(|e| {
        panic!("canonical form {canonical:?} of {text:?} does not parse: {e}")
    });
    assert_eq!(
        reparsed, selector,
        "canonical form {canonical:?} of {text:?} parses to a different selector"
    );
    assert_eq!(reparsed.canonical(), canonical, "canonical form is not a fixed point");
});
