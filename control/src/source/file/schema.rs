//! The file's schema, deserialized straight into a [`Table`].
//!
//! serde_yaml 0.9 has no spans, but it stamps an error with the position of
//! the node whose visitor raised it. So every check here (types, unknown or
//! repeated fields, addresses, ranges, duplicates) runs *inside* the visitor
//! of the node it is about: a bad backend address is reported at that
//! address, a repeated field at its key, a missing field at its mapping.
//!
//! Every error is built by [`Ctx::fail`], which also keeps the message, so the
//! caller can show it without serde_yaml's path prefix and position suffix.
//! Messages name the service (`services[1] "api"`) even when `name:` comes
//! after the bad field: a lenient first pass over the text as a plain
//! [`Loose`] tree collects the names and backend addresses ([`Hints`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

use crate::table::{Affinity, Backend, Conditions, ListenKey, Policy, Protocol, Service, Table};

/// Valid `affinity.timeoutSeconds`, as Kubernetes validates
/// `sessionAffinityConfig.clientIP.timeoutSeconds`.
const TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;

/// What `listen` and `address` hold.
const ADDRESS: &str = "IP:port (IPv6 quoted: \"[::1]:80\")";

/// A rejected document, before the file name is attached.
#[derive(Debug)]
pub(super) struct Failure {
    /// 1-based line and column, when the parser knows them.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

/// Parses and validates `text` into a table.
pub(super) fn parse_table(text: &str) -> Result<Table, Failure> {
    let ctx = Ctx {
        hints: Hints::from_text(text),
        listens: RefCell::new(HashMap::new()),
        recorded: RefCell::new(None),
    };
    let de = serde_yaml::Deserializer::from_str(text);
    Seed(Root { ctx: &ctx })
        .deserialize(de)
        .map_err(|err| ctx.failure(&err))
}

/// Names and backend addresses as written, for messages only.
#[derive(Debug, Default)]
struct Hints {
    services: Vec<ServiceHint>,
}

#[derive(Debug, Default)]
struct ServiceHint {
    name: Option<String>,
    backends: Vec<Option<String>>,
}

impl Hints {
    /// Best effort: a document this cannot read gives no hints, and the
    /// typed pass reports what is wrong with it.
    fn from_text(text: &str) -> Self {
        let Ok(doc) = serde_yaml::from_str::<Loose>(text) else {
            return Self::default();
        };
        let services = doc.get("services").map(Loose::items).unwrap_or_default();
        let services = services
            .iter()
            .map(|svc| ServiceHint {
                name: svc.get("name").and_then(Loose::text),
                backends: svc
                    .get("backends")
                    .map(Loose::items)
                    .unwrap_or_default()
                    .iter()
                    .map(|b| b.get("address").and_then(Loose::text))
                    .collect(),
            })
            .collect();
        Self { services }
    }
}

/// Any YAML, read without judging it: unlike [`serde_yaml::Value`], a
/// repeated key is kept (the first one wins here), so hints survive the very
/// mistakes the typed pass reports.
#[derive(Debug)]
enum Loose {
    Str(String),
    Seq(Vec<Loose>),
    Map(Vec<(Loose, Loose)>),
    Other,
}

impl Loose {
    fn get(&self, key: &str) -> Option<&Loose> {
        match self {
            Loose::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Loose::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn items(&self) -> &[Loose] {
        match self {
            Loose::Seq(items) => items,
            _ => &[],
        }
    }

    /// A non-blank string.
    fn text(&self) -> Option<String> {
        match self {
            Loose::Str(s) if !s.trim().is_empty() => Some(s.clone()),
            _ => None,
        }
    }
}

impl<'de> de::Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct LooseVisitor;

        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML")
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }

            fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Loose, D::Error> {
                de.deserialize_any(self)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Loose::Seq(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Loose::Map(entries))
            }

            fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Loose, A::Error> {
                Err(de::Error::custom("tagged value"))
            }
        }

        de.deserialize_any(LooseVisitor)
    }
}

/// State shared by every node of one parse.
struct Ctx {
    hints: Hints,
    /// Listen addresses seen so far, with the index of the service using it.
    listens: RefCell<HashMap<SocketAddr, usize>>,
    /// The message of the error raised, without serde_yaml's decorations.
    recorded: RefCell<Option<String>>,
}

impl Ctx {
    /// Builds the error for a node and remembers its message.
    fn fail<E: de::Error>(&self, message: String) -> E {
        let err = E::custom(&message);
        self.recorded.borrow_mut().get_or_insert(message);
        err
    }

    fn failure(&self, err: &serde_yaml::Error) -> Failure {
        let position = err.location().map(|l| (l.line(), l.column()));
        let shown = err.to_string();
        let message = match self.recorded.borrow_mut().take() {
            // One of ours: serde_yaml only added its path and position.
            Some(ours) if shown.contains(&ours) => ours,
            // The YAML itself (syntax, anchors, several documents...).
            _ => {
                let reason = match position {
                    Some((line, column)) => {
                        shown.replacen(&format!(" at line {line} column {column}"), "", 1)
                    }
                    None => shown,
                };
                format!("invalid YAML: {reason}")
            }
        };
        Failure { position, message }
    }

    /// `services[1] "api"`, or `services[1]` while the name is unknown.
    fn service(&self, i: usize) -> String {
        match self.hints.services.get(i).and_then(|h| h.name.as_ref()) {
            Some(name) => format!("services[{i}] {}", Quoted(name)),
            None => format!("services[{i}]"),
        }
    }

    /// The address of `services[i].backends[j]` as written, if a string.
    fn backend_hint(&self, i: usize, j: usize) -> Option<&str> {
        self.hints
            .services
            .get(i)
            .and_then(|h| h.backends.get(j))
            .and_then(|a| a.as_deref())
    }

    /// `services[1] "api": backend 10.0.0.1:80`, or `...: backends[3]`.
    fn backend(&self, i: usize, j: usize) -> String {
        match self.backend_hint(i, j) {
            Some(addr) => format!("{}: backend {}", self.service(i), Clipped(addr)),
            None => format!("{}: backends[{j}]", self.service(i)),
        }
    }
}

/// Text from the file as shown in a message: control characters escaped
/// (messages are one line) and long text cut.
struct Clipped<'a>(&'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 60;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX) {
            write!(f, "{}", c.escape_debug())?;
        }
        if chars.next().is_some() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// [`Clipped`] in double quotes.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", Clipped(self.0))
    }
}

/// What a node turned out to hold, for checks and "found ..." messages.
#[derive(Debug, Clone, Copy)]
enum Found<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
    Seq,
    Map,
    Tagged,
}

impl fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Null => f.write_str("nothing (null)"),
            Found::Bool(b) => write!(f, "{b}"),
            Found::Int(i) => write!(f, "{i}"),
            Found::Float(x) => write!(f, "{x}"),
            Found::Str(s) => write!(f, "{}", Quoted(s)),
            Found::Seq => f.write_str("a list"),
            Found::Map => f.write_str("a mapping"),
            Found::Tagged => f.write_str("a tagged value"),
        }
    }
}

/// One node of the schema. Whatever the YAML holds reaches exactly one of
/// these methods, inside the node's own visitor; the defaults reject it.
trait Node<'de>: Sized {
    type Value;

    fn ctx(&self) -> &Ctx;
    /// Where this node is, as messages start: `services[1] "api": policy`.
    fn label(&self) -> String;
    /// What it should be: `true or false`.
    fn expecting(&self) -> &'static str;

    fn scalar<E: de::Error>(self, found: Found<'_>) -> Result<Self::Value, E> {
        Err(self.mismatch(found))
    }

    fn seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<Self::Value, A::Error> {
        Err(self.mismatch(Found::Seq))
    }

    fn map<A: MapAccess<'de>>(self, _map: A) -> Result<Self::Value, A::Error> {
        Err(self.mismatch(Found::Map))
    }

    fn mismatch<E: de::Error>(&self, found: Found<'_>) -> E {
        self.ctx().fail(format!(
            "{}: expected {}, found {found}",
            self.label(),
            self.expecting()
        ))
    }

    fn reject<E: de::Error>(&self, reason: impl fmt::Display) -> E {
        self.ctx().fail(format!("{}: {reason}", self.label()))
    }
}

/// Deserializes a [`Node`].
struct Seed<N>(N);

impl<'de, N: Node<'de>> DeserializeSeed<'de> for Seed<N> {
    type Value = N::Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<N::Value, D::Error> {
        de.deserialize_any(Visit(self.0))
    }
}

struct Visit<N>(N);

impl<'de, N: Node<'de>> Visitor<'de> for Visit<N> {
    type Value = N::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.expecting())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<N::Value, E> {
        self.0.scalar(Found::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<N::Value, E> {
        self.0.scalar(Found::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<N::Value, E> {
        self.0.scalar(Found::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<N::Value, E> {
        self.0.scalar(Found::Int(v.into()))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<N::Value, E> {
        match i128::try_from(v) {
            Ok(v) => self.0.scalar(Found::Int(v)),
            // Beyond any range accepted here; only the message needs it.
            #[allow(clippy::cast_precision_loss)]
            Err(_) => self.0.scalar(Found::Float(v as f64)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<N::Value, E> {
        self.0.scalar(Found::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<N::Value, E> {
        self.0.scalar(Found::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<N::Value, E> {
        self.0.scalar(Found::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<N::Value, E> {
        self.0.scalar(Found::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<N::Value, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<N::Value, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<N::Value, A::Error> {
        self.0.seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<N::Value, A::Error> {
        self.0.map(map)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, _data: A) -> Result<N::Value, A::Error> {
        self.0.scalar(Found::Tagged)
    }
}

/// A mapping key: one of `fields`, each at most once. Checked in the key's
/// own node so that the error points at the key.
struct Key<'a> {
    ctx: &'a Ctx,
    /// Label of the mapping the key belongs to.
    owner: &'a str,
    fields: &'static [&'static str],
    seen: &'a mut Vec<bool>,
}

impl<'de> Node<'de> for Key<'_> {
    type Value = usize;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        self.owner.to_owned()
    }

    fn expecting(&self) -> &'static str {
        "a field name"
    }

    fn scalar<E: de::Error>(self, found: Found<'_>) -> Result<usize, E> {
        let Found::Str(name) = found else {
            return Err(self.mismatch(found));
        };
        let Some(i) = self.fields.iter().position(|f| *f == name) else {
            return Err(self.reject(format_args!(
                "unknown field {} (valid: {})",
                Quoted(name),
                self.fields.join(", ")
            )));
        };
        match self.seen.get_mut(i) {
            Some(seen) if !*seen => {
                *seen = true;
                Ok(i)
            }
            _ => Err(self.reject(format_args!("field {} given twice", Quoted(name)))),
        }
    }
}

/// Reads the keys of a mapping node; `next` gives the index in `fields`.
struct Fields<'a> {
    ctx: &'a Ctx,
    owner: String,
    fields: &'static [&'static str],
    seen: Vec<bool>,
}

impl<'a> Fields<'a> {
    fn new(ctx: &'a Ctx, owner: String, fields: &'static [&'static str]) -> Self {
        Self {
            ctx,
            owner,
            fields,
            seen: vec![false; fields.len()],
        }
    }

    fn next<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        let key = Key {
            ctx: self.ctx,
            owner: &self.owner,
            fields: self.fields,
            seen: &mut self.seen,
        };
        Ok(map
            .next_key_seed(Seed(key))?
            .and_then(|i| self.fields.get(i).copied()))
    }

    fn missing<E: de::Error>(&self, field: &str, help: &str) -> E {
        self.ctx
            .fail(format!("{}: missing field {field:?}{help}", self.owner))
    }
}

/// A scalar checked by `convert`: `Err(None)` is a type mismatch, reported
/// with `expecting`; `Err(Some(reason))` a bad value.
struct Leaf<'a, F> {
    ctx: &'a Ctx,
    label: String,
    expecting: &'static str,
    convert: F,
}

fn leaf<'a, T, F>(
    ctx: &'a Ctx,
    label: String,
    expecting: &'static str,
    convert: F,
) -> Seed<Leaf<'a, F>>
where
    F: FnOnce(Found<'_>) -> Result<T, Option<String>>,
{
    Seed(Leaf {
        ctx,
        label,
        expecting,
        convert,
    })
}

impl<'de, T, F> Node<'de> for Leaf<'_, F>
where
    F: FnOnce(Found<'_>) -> Result<T, Option<String>>,
{
    type Value = T;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn expecting(&self) -> &'static str {
        self.expecting
    }

    fn scalar<E: de::Error>(self, found: Found<'_>) -> Result<T, E> {
        let Self {
            ctx,
            label,
            expecting,
            convert,
        } = self;
        convert(found).map_err(|reason| match reason {
            Some(reason) => ctx.fail(format!("{label}: {reason}")),
            None => ctx.fail(format!("{label}: expected {expecting}, found {found}")),
        })
    }
}

/// Conversion of `ready`, `serving` and `terminating`.
fn boolean(found: Found<'_>) -> Result<bool, Option<String>> {
    match found {
        Found::Bool(b) => Ok(b),
        _ => Err(None),
    }
}

/// Parses `listen` or `address`; `shown` tells that the label already shows
/// the text, so the message does not repeat it.
fn socket_addr(s: &str, role: &str, shown: bool) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        let s = if shown {
            String::new()
        } else {
            format!(" {}", Quoted(s))
        };
        format!("invalid socket address{s} (expected {ADDRESS})")
    })?;
    if addr.port() == 0 {
        return Err(format!("port 0 is not a valid {role} port"));
    }
    Ok(addr)
}

/// The whole document: `services:` and nothing else.
struct Root<'a> {
    ctx: &'a Ctx,
}

impl<'de> Node<'de> for Root<'_> {
    type Value = Table;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        "top level".to_owned()
    }

    fn expecting(&self) -> &'static str {
        "a mapping with a `services:` list"
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Table, A::Error> {
        let mut fields = Fields::new(self.ctx, self.label(), &["services"]);
        let mut table = None;
        while let Some(field) = fields.next(&mut map)? {
            if field == "services" {
                table = Some(map.next_value_seed(Seed(Services { ctx: self.ctx }))?);
            }
        }
        table.ok_or_else(|| fields.missing("services", " (write `services: []` for none)"))
    }
}

/// `services:`: the list of services, keyed by listen address.
struct Services<'a> {
    ctx: &'a Ctx,
}

impl<'de> Node<'de> for Services<'_> {
    type Value = Table;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        "services".to_owned()
    }

    fn expecting(&self) -> &'static str {
        "a list of services (`services: []` for none)"
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Table, A::Error> {
        let mut table = Table::new();
        let mut index = 0;
        while let Some((key, service)) = seq.next_element_seed(Seed(ServiceNode {
            ctx: self.ctx,
            index,
        }))? {
            // Duplicate keys were rejected at their `listen:`.
            table.insert(key, Arc::new(service));
            index += 1;
        }
        Ok(table)
    }
}

/// One entry of `services:`.
struct ServiceNode<'a> {
    ctx: &'a Ctx,
    index: usize,
}

const SERVICE_FIELDS: &[&str] = &[
    "name", "listen", "protocol", "policy", "affinity", "backends",
];

impl<'de> Node<'de> for ServiceNode<'_> {
    type Value = (ListenKey, Service);

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        self.ctx.service(self.index)
    }

    fn expecting(&self) -> &'static str {
        "a mapping (name, listen, backends, ...)"
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let index = self.index;
        let label = self.label();
        let mut fields = Fields::new(ctx, label.clone(), SERVICE_FIELDS);
        let mut name = None;
        let mut listen = None;
        let mut policy = Policy::default();
        let mut affinity = None;
        let mut backends = None;
        while let Some(field) = fields.next(&mut map)? {
            let at = format!("{label}: {field}");
            match field {
                "name" => {
                    name = Some(map.next_value_seed(leaf(
                        ctx,
                        at,
                        "a string",
                        |found| match found {
                            Found::Str(s) if s.trim().is_empty() => {
                                Err(Some("must not be empty".to_owned()))
                            }
                            Found::Str(s) => Ok(s.to_owned()),
                            _ => Err(None),
                        },
                    ))?);
                }
                "listen" => {
                    listen = Some(map.next_value_seed(leaf(ctx, at, ADDRESS, |found| {
                        let Found::Str(s) = found else {
                            return Err(None);
                        };
                        let addr = socket_addr(s, "listen", false).map_err(Some)?;
                        // Only TCP is served, so the address alone is the key.
                        // When UDP lands, this check must include the protocol.
                        let mut listens = ctx.listens.borrow_mut();
                        if let Some(&other) = listens.get(&addr) {
                            return Err(Some(format!(
                                "{addr} is already used by {}",
                                ctx.service(other)
                            )));
                        }
                        listens.insert(addr, index);
                        Ok(addr)
                    }))?);
                }
                "protocol" => {
                    let _tcp: Protocol =
                        map.next_value_seed(leaf(ctx, at, "tcp", |found| match found {
                            Found::Str("tcp") => Ok(Protocol::Tcp),
                            Found::Str("udp") => {
                                Err(Some("udp is not served yet (only tcp is)".to_owned()))
                            }
                            Found::Str(s) => Err(Some(format!(
                                "unknown protocol {} (valid: tcp; udp is not served yet)",
                                Quoted(s)
                            ))),
                            _ => Err(None),
                        }))?;
                }
                "policy" => {
                    policy = map.next_value_seed(leaf(
                        ctx,
                        at,
                        "round-robin or least-connections",
                        |found| match found {
                            Found::Str("round-robin") => Ok(Policy::RoundRobin),
                            Found::Str("least-connections") => Ok(Policy::LeastConnections),
                            Found::Str(s) => Err(Some(format!(
                                "unknown policy {} (valid: round-robin, least-connections)",
                                Quoted(s)
                            ))),
                            _ => Err(None),
                        },
                    ))?;
                }
                "affinity" => {
                    affinity = Some(map.next_value_seed(Seed(AffinityNode { ctx, label: at }))?);
                }
                "backends" => {
                    backends = Some(map.next_value_seed(Seed(BackendsNode {
                        ctx,
                        service: index,
                    }))?);
                }
                _ => {}
            }
        }
        let name = name.ok_or_else(|| fields.missing("name", ""))?;
        let listen = listen.ok_or_else(|| fields.missing("listen", ""))?;
        let backends = backends
            .ok_or_else(|| fields.missing("backends", " (write `backends: []` for none)"))?;
        Ok((
            ListenKey::tcp(listen),
            Service::new(name, policy, affinity, backends),
        ))
    }
}

/// `affinity:`: client-IP affinity with an optional timeout.
struct AffinityNode<'a> {
    ctx: &'a Ctx,
    label: String,
}

impl<'de> Node<'de> for AffinityNode<'_> {
    type Value = Affinity;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn expecting(&self) -> &'static str {
        "a mapping (`affinity: {}` for the default timeout)"
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Affinity, A::Error> {
        let mut fields = Fields::new(self.ctx, self.label.clone(), &["timeoutSeconds"]);
        let mut timeout = Affinity::DEFAULT_TIMEOUT;
        while let Some(field) = fields.next(&mut map)? {
            let at = format!("{}.{field}", self.label);
            timeout = map.next_value_seed(leaf(
                self.ctx,
                at,
                "an integer number of seconds",
                |found| match found {
                    Found::Int(n) => u64::try_from(n)
                        .ok()
                        .filter(|n| TIMEOUT_SECONDS.contains(n))
                        .map(Duration::from_secs)
                        .ok_or_else(|| {
                            Some(format!(
                                "{n} is out of range (valid: {}..={} seconds)",
                                TIMEOUT_SECONDS.start(),
                                TIMEOUT_SECONDS.end()
                            ))
                        }),
                    _ => Err(None),
                },
            ))?;
        }
        Ok(Affinity { timeout })
    }
}

/// `backends:` of one service; an address may appear once.
struct BackendsNode<'a> {
    ctx: &'a Ctx,
    service: usize,
}

impl<'de> Node<'de> for BackendsNode<'_> {
    type Value = Vec<Backend>;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        format!("{}: backends", self.ctx.service(self.service))
    }

    fn expecting(&self) -> &'static str {
        "a list of backends (`backends: []` for none)"
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Backend>, A::Error> {
        let seen = RefCell::new(HashMap::new());
        let mut backends = Vec::new();
        while let Some(backend) = seq.next_element_seed(Seed(BackendNode {
            ctx: self.ctx,
            service: self.service,
            index: backends.len(),
            seen: &seen,
        }))? {
            backends.push(backend);
        }
        Ok(backends)
    }
}

/// One entry of `backends:`.
struct BackendNode<'a> {
    ctx: &'a Ctx,
    service: usize,
    index: usize,
    /// Addresses of the earlier backends of this service, with their index.
    seen: &'a RefCell<HashMap<SocketAddr, usize>>,
}

const BACKEND_FIELDS: &[&str] = &["address", "ready", "serving", "terminating", "weight"];

impl<'de> Node<'de> for BackendNode<'_> {
    type Value = Backend;

    fn ctx(&self) -> &Ctx {
        self.ctx
    }

    fn label(&self) -> String {
        self.ctx.backend(self.service, self.index)
    }

    fn expecting(&self) -> &'static str {
        "a mapping (address, ready, serving, terminating, weight)"
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Backend, A::Error> {
        let ctx = self.ctx;
        let label = self.label();
        let mut fields = Fields::new(ctx, label.clone(), BACKEND_FIELDS);
        let mut address = None;
        let mut ready = true;
        let mut serving = None;
        let mut terminating = false;
        let mut weight = 1;
        while let Some(field) = fields.next(&mut map)? {
            let at = format!("{label}: {field}");
            match field {
                "address" => {
                    // The label already shows the address as written.
                    address =
                        Some(
                            map.next_value_seed(leaf(ctx, label.clone(), ADDRESS, |found| {
                                let Found::Str(s) = found else {
                                    return Err(None);
                                };
                                let shown = ctx.backend_hint(self.service, self.index) == Some(s);
                                let addr = socket_addr(s, "backend", shown).map_err(Some)?;
                                let mut seen = self.seen.borrow_mut();
                                if let Some(&first) = seen.get(&addr) {
                                    return Err(Some(format!(
                                        "duplicate address (first listed as backends[{first}])"
                                    )));
                                }
                                seen.insert(addr, self.index);
                                Ok(addr)
                            }))?,
                        );
                }
                "ready" => ready = map.next_value_seed(leaf(ctx, at, "true or false", boolean))?,
                "serving" => {
                    serving = Some(map.next_value_seed(leaf(ctx, at, "true or false", boolean))?)
                }
                "terminating" => {
                    terminating = map.next_value_seed(leaf(ctx, at, "true or false", boolean))?
                }
                "weight" => {
                    weight = map.next_value_seed(leaf(
                        ctx,
                        at,
                        "an integer (0 drains the backend)",
                        |found| match found {
                            Found::Int(n) => u32::try_from(n).map_err(|_| {
                                Some(format!("{n} is out of range (valid: 0..={})", u32::MAX))
                            }),
                            _ => Err(None),
                        },
                    ))?;
                }
                _ => {}
            }
        }
        let addr = address.ok_or_else(|| fields.missing("address", ""))?;
        Ok(Backend {
            addr,
            conditions: Conditions {
                ready,
                // Kubernetes: `serving` unset means the same as `ready`.
                serving: serving.unwrap_or(ready),
                terminating,
            },
            weight,
        })
    }
}
