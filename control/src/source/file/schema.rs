//! From text to [`Table`]: the YAML is read into a [`ConfigDoc`] (shape and
//! types), then checked in plain Rust (rules across fields) while it becomes
//! a table.
//!
//! Messages say where the problem is as a path (`services[1] "api": backend
//! 10.0.0.1:80: weight`) and what is wrong. The path and what was found come
//! from a second, lenient read of the text as a [`tree`], which knows every
//! node's position; so a service is named even when its `name:` comes after
//! the mistake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{DuplicateKeyPolicy, Error, Options};

use super::doc::ConfigDoc;
use super::tree::{self, At, Found, Pos, Quoted, Seg, key};
use crate::k8s::convert::UDP_TIMEOUT_RANGE;
use crate::table::{Affinity, Backend, Conditions, ListenKey, Protocol, Service, Settings, Table};

/// Valid `affinity.timeoutSeconds`, as Kubernetes validates
/// `sessionAffinityConfig.clientIP.timeoutSeconds`.
const TIMEOUT_SECONDS: std::ops::RangeInclusive<i64> = 1..=86_400;

/// A rejected document, before the file name is attached.
#[derive(Debug)]
pub(super) struct Failure {
    /// 1-based line and column, when known.
    pub position: Option<Pos>,
    pub message: String,
}

fn options(duplicate_keys: DuplicateKeyPolicy) -> Options {
    let mut options = Options::default();
    options.duplicate_keys = duplicate_keys;
    // `yes` and `on` are strings, not booleans (YAML 1.2).
    options.strict_booleans = true;
    // A name or address that reads as a number or boolean must be quoted.
    options.no_schema = true;
    options.with_snippet = false;
    options
}

/// Parses and validates `text` into a table.
pub(super) fn parse_table(text: &str) -> Result<Table, Failure> {
    let tree = read_tree(text);
    let tree = tree.as_ref();
    let doc: ConfigDoc =
        serde_saphyr::from_str_with_options(text, options(DuplicateKeyPolicy::Error))
            .map_err(|err| failure(&err, tree))?;
    check(doc, tree).map_err(|(path, reason)| Failure {
        position: tree.and_then(|t| tree::find(t, &path)).map(tree::pos),
        message: format!("{}: {reason}", tree::label(tree, &path)),
    })
}

/// The lenient read of `text`, keeping repeated keys so that names survive
/// the mistakes reported. When the YAML breaks down somewhere, what comes
/// before that place, so that a type error found earlier is still labelled.
fn read_tree(text: &str) -> Option<At> {
    let read =
        |text| serde_saphyr::from_str_with_options(text, options(DuplicateKeyPolicy::PassThrough));
    match read(text) {
        Ok(tree) => Some(tree),
        Err(err) => {
            let chars = usize::try_from(err.location()?.span().offset()).ok()?;
            let cut = text
                .char_indices()
                .nth(chars)
                .map_or(text.len(), |(i, _)| i);
            read(text.get(..cut)?).ok()
        }
    }
}

/// The rules [`ConfigDoc`]'s types do not tell; an error is the path of the
/// value at fault and the reason.
fn check(doc: ConfigDoc, tree: Option<&At>) -> Result<Table, (Vec<Seg>, String)> {
    let mut table = Table::new();
    let mut listens: HashMap<(SocketAddr, Protocol), usize> = HashMap::new();
    for (i, svc) in doc.services.into_iter().enumerate() {
        let at = |path: &[Seg]| [&[key("services"), Seg::Index(i)], path].concat();
        if svc.name.trim().is_empty() {
            return Err((at(&[key("name")]), "must not be empty".to_owned()));
        }
        let listen = at(&[key("listen")]);
        if svc.listen.port() == 0 {
            return Err((listen, "port 0 is not a valid listen port".to_owned()));
        }
        if let Some(&other) = listens.get(&(svc.listen, svc.protocol)) {
            let other = tree::label(tree, &[key("services"), Seg::Index(other)]);
            let reason = format!("{} is already used by {other}", svc.listen);
            return Err((listen, reason));
        }
        listens.insert((svc.listen, svc.protocol), i);
        let udp_timeout = match svc.udp_timeout_seconds {
            Some(_) if svc.protocol != Protocol::Udp => {
                let reason = "is only for protocol: udp".to_owned();
                return Err((at(&[key("udpTimeoutSeconds")]), reason));
            }
            Some(s) if !UDP_TIMEOUT_RANGE.contains(&s) => {
                let (min, max) = UDP_TIMEOUT_RANGE.into_inner();
                let reason = format!("{s} is out of range (valid: {min}..={max} seconds)");
                return Err((at(&[key("udpTimeoutSeconds")]), reason));
            }
            s => s.map(Duration::from_secs),
        };
        if svc.udp_resend.is_some() && svc.protocol != Protocol::Udp {
            let reason = "is only for protocol: udp".to_owned();
            return Err((at(&[key("udpResend")]), reason));
        }
        let affinity = match svc.affinity {
            Some(a) if !TIMEOUT_SECONDS.contains(&a.timeout_seconds) => {
                let (min, max) = TIMEOUT_SECONDS.into_inner();
                let reason = format!(
                    "{} is out of range (valid: {min}..={max} seconds)",
                    a.timeout_seconds
                );
                return Err((at(&[key("affinity"), key("timeoutSeconds")]), reason));
            }
            Some(a) => Some(Affinity {
                timeout: Duration::from_secs(a.timeout_seconds.unsigned_abs()),
            }),
            None => None,
        };
        let mut settings = Settings::default();
        if let Some(max) = svc.max_connections {
            settings.max_connections = Some(
                Settings::parse_max_connections(&max.to_string())
                    .map_err(|e| (at(&[key("maxConnections")]), e))?,
            );
        }
        if let Some(timeout) = &svc.idle_timeout {
            settings.idle_timeout = Some(
                Settings::parse_idle_timeout(timeout)
                    .map_err(|e| (at(&[key("idleTimeout")]), e))?,
            );
        }
        if svc.proxy_protocol.is_some() && svc.protocol != Protocol::Tcp {
            let reason = "is only for protocol: tcp".to_owned();
            return Err((at(&[key("proxyProtocol")]), reason));
        }
        settings.proxy_protocol = svc.proxy_protocol;
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::with_capacity(svc.backends.len());
        for (j, b) in svc.backends.into_iter().enumerate() {
            let address = at(&[key("backends"), Seg::Index(j), key("address")]);
            if b.address.port() == 0 {
                return Err((address, "port 0 is not a valid backend port".to_owned()));
            }
            if let Some(first) = seen.insert(b.address, j) {
                let reason = format!("duplicate address (first listed as backends[{first}])");
                return Err((address, reason));
            }
            backends.push(Backend {
                addr: b.address,
                conditions: Conditions {
                    ready: b.ready,
                    serving: b.serving.unwrap_or(b.ready),
                    terminating: b.terminating,
                },
                weight: b.weight,
            });
        }
        for (j, range) in svc.source_ranges.iter().enumerate() {
            if range.is_ipv4() != svc.listen.is_ipv4() {
                let reason = format!("{range} is not of the family of listen {}", svc.listen);
                return Err((at(&[key("sourceRanges"), Seg::Index(j)]), reason));
            }
        }
        settings.no_endpoints = svc.no_endpoints;
        settings.source_ranges = svc.source_ranges;
        settings.udp_timeout = udp_timeout;
        settings.udp_resend = svc.udp_resend;
        settings.keep_external_client_ip = svc.keep_external_client_ip;
        let service =
            Service::new(svc.name, svc.policy, affinity, backends).with_settings(settings);
        let key = ListenKey {
            addr: svc.listen,
            protocol: svc.protocol,
        };
        table.insert(key, Arc::new(service));
    }
    Ok(table)
}

/// The parser's error as a [`Failure`] whose message starts with the path
/// of the node at fault.
fn failure(err: &Error, tree: Option<&At>) -> Failure {
    let err = err.without_snippet();
    let mut position = err.location().map(|l| {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        (n(l.line()), n(l.column()))
    });
    let (path, at_key) = match (tree, position) {
        (Some(t), Some(p)) => tree::path_at(t, p),
        _ => (Vec::new(), false),
    };
    // The mapping a key belongs to, for errors about keys.
    let owner = match (at_key, path.split_last()) {
        (true, Some((_, owner))) => owner,
        _ => &path[..],
    };
    let node = tree.and_then(|t| tree::find(t, &path));
    let found = |expected: &str| {
        format!(
            "expected {expected}, found {}",
            Found(node.map(|n| &n.value))
        )
    };
    let last = match path.last() {
        Some(Seg::Key(k)) => k.as_str(),
        _ => "value",
    };
    let invalid_yaml = |reason: &str| Failure {
        position,
        message: format!("invalid YAML: {reason}"),
    };
    // (whether the error is about a key of `owner`, the reason)
    let (about_key, reason) = match err {
        Error::SerdeUnknownField {
            field, expected, ..
        } => {
            let valid = expected.join(", ");
            (
                true,
                format!("unknown field {} (valid: {valid})", Quoted(field)),
            )
        }
        Error::DuplicateMappingKey { key, .. } => {
            let key = Quoted(key.as_deref().unwrap_or("?"));
            (true, format!("field {key} given twice"))
        }
        Error::SerdeMissingField { field, .. } => {
            // At the mapping missing it, not where the parser noticed.
            let mapping = tree.and_then(|t| tree::find(t, owner));
            position = mapping.map(tree::pos).or(position);
            (
                true,
                format!("missing field {}{}", Quoted(field), help(field)),
            )
        }
        Error::SerdeUnknownVariant {
            variant, expected, ..
        } => {
            let valid = expected.join(", ");
            (
                false,
                format!("unknown {last} {} (valid: {valid})", Quoted(variant)),
            )
        }
        Error::Eof { .. } => (false, found("a mapping with a `services:` list")),
        Error::Message { msg, .. } => (false, msg.clone()),
        Error::SerdeInvalidType { expected, .. } | Error::SerdeInvalidValue { expected, .. } => {
            (false, found(expected))
        }
        Error::InvalidBooleanStrict { .. } => (false, found("true or false")),
        Error::Unexpected { expected, .. } if node.is_some() => (
            false,
            found(&format!("{}{}", expecting(expected), help(last))),
        ),
        Error::InvalidScalar { ty, .. } if node.is_some() => (false, found(&expecting(ty))),
        Error::QuotingRequired { .. } if node.is_some() => (false, found("a string (quoted)")),
        Error::MultipleDocuments { .. } => return invalid_yaml("more than one document"),
        other => {
            let shown = other.to_string();
            return invalid_yaml(&match position {
                Some((line, column)) => {
                    shown.replacen(&format!(" at line {line}, column {column}"), "", 1)
                }
                None => shown,
            });
        }
    };
    let path = if about_key {
        owner
    } else {
        // About a value: at it, even when the parser was at its key.
        position = node.map(tree::pos).or(position);
        &path[..]
    };
    Failure {
        position,
        message: format!("{}: {reason}", tree::label(tree, path)),
    }
}

/// How to write an empty `field`.
fn help(field: &str) -> &'static str {
    match field {
        "services" => " (write `services: []` for none)",
        "backends" => " (write `backends: []` for none)",
        "affinity" => " (`affinity: {}` for the default timeout)",
        _ => "",
    }
}

/// What a type expects, as the parser names it, in the words of the schema.
fn expecting(what: &str) -> String {
    match what {
        "sequence start" => "a list".to_owned(),
        "mapping start" => "a mapping".to_owned(),
        // Any scalar where a list or mapping was found.
        "string scalar" => "a single value".to_owned(),
        "bool" => "true or false".to_owned(),
        "u32" => format!("an integer in 0..={}", u32::MAX),
        "i64" => "an integer".to_owned(),
        other => other.to_owned(),
    }
}
