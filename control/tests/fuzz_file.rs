//! Fuzzing the YAML config parser (proptest, a bounded number of cases so
//! it runs in `cargo test`): arbitrary bytes, and valid documents (made
//! from the schema's own types) with random edits to their text.
//!
//! Properties: nothing panics; a valid document parses; every rejection is
//! one line that starts with the file name, and a position it gives lies
//! inside the text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use proptest::prelude::*;
use sluice_control::source::file::{self, BackendDoc, ConfigDoc, ConfigError, ServiceDoc};

const PATH: &str = "fuzz.yaml";

fn check_rejection(text: &str, err: &ConfigError) {
    let shown = err.to_string();
    assert!(shown.starts_with(PATH), "{shown}");
    assert!(!shown.contains('\n'), "one line: {shown:?}");
    if let Some(p) = err.position() {
        let lines = text.lines().count().max(1);
        assert!(
            p.line >= 1 && p.line <= lines + 1,
            "line {} of {lines}: {shown}",
            p.line
        );
        assert!(p.column >= 1, "{shown}");
    }
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    (
        proptest::sample::select(vec!["127.0.0.1", "10.0.0.2", "::1", "fd00::5"]),
        1u16..,
    )
        .prop_map(|(ip, port)| SocketAddr::new(ip.parse().unwrap(), port))
}

fn backend() -> impl Strategy<Value = BackendDoc> {
    (addr(), 0u8..4, 0u32..5).prop_map(|(a, state, weight)| {
        let b = match state {
            0 => BackendDoc::not_ready(a),
            1 => BackendDoc::terminating(a),
            _ => BackendDoc::ready(a),
        };
        b.with_weight(weight)
    })
}

fn doc() -> impl Strategy<Value = ConfigDoc> {
    proptest::collection::vec((addr(), proptest::collection::vec(backend(), 0..4)), 0..4).prop_map(
        |services| {
            let mut seen = std::collections::HashSet::new();
            let services = services
                .into_iter()
                .enumerate()
                .filter(|(_, (listen, _))| seen.insert(*listen))
                .map(|(i, (listen, backends))| {
                    let mut seen = std::collections::HashSet::new();
                    let backends = backends
                        .into_iter()
                        .filter(|b| seen.insert(b.address))
                        .collect();
                    ServiceDoc::new(format!("svc-{i}"), listen, backends)
                })
                .collect();
            ConfigDoc::new(services)
        },
    )
}

/// One edit to a text: cut a range, insert a token, or repeat a line.
#[derive(Debug, Clone)]
enum Edit {
    Cut(usize, usize),
    Insert(usize, &'static str),
    RepeatLine(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, n)| Edit::Cut(at, n)),
        (
            any::<usize>(),
            proptest::sample::select(vec![
                ":",
                "-",
                " ",
                "\n",
                "\t",
                "'",
                "\"",
                "[",
                "]",
                "{",
                "}",
                "&a",
                "*a",
                "!!str ",
                "~",
                "null",
                "0",
                "-1",
                "99999999999999999999",
                "weight: ",
                "services:",
                "listen: ",
                "é",
                "\u{0}",
                "#",
                "? ",
                "|",
                ">",
                "%YAML 1.2\n",
                "---\n",
            ]),
        )
            .prop_map(|(at, t)| Edit::Insert(at, t)),
        any::<usize>().prop_map(Edit::RepeatLine),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let boundary = |at: usize| {
        let mut at = at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    match edit {
        Edit::Cut(at, n) => {
            let start = boundary(*at);
            let end = boundary(start.saturating_add(*n).min(text.len()));
            format!("{}{}", &text[..start], &text[end.max(start)..])
        }
        Edit::Insert(at, t) => {
            let at = boundary(*at);
            format!("{}{t}{}", &text[..at], &text[at..])
        }
        Edit::RepeatLine(i) => {
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return text.to_owned();
            }
            let i = i % lines.len();
            let mut out = lines.clone();
            out.insert(i, lines[i]);
            out.join("\n")
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_parsed_or_rejected_with_a_clear_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Err(e) = file::parse_bytes(PATH, &bytes) {
            check_rejection(&text, &e);
        }
    }

    #[test]
    fn valid_documents_parse_and_edited_ones_never_panic(
        doc in doc(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let text = doc.to_yaml().unwrap();
        let table = file::parse(PATH, &text);
        prop_assert!(table.is_ok(), "{text}\n{:?}", table.err().map(|e| e.to_string()));
        prop_assert_eq!(table.unwrap().iter().count(), doc.services.len());
        let mut edited = text;
        for e in &edits {
            edited = apply(&edited, e);
        }
        if let Err(e) = file::parse(PATH, &edited) {
            check_rejection(&edited, &e);
        }
    }
}
