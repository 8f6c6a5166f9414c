//! The document as a plain YAML tree with the position of every node, read
//! without judging it: it only tells where things are and what they hold,
//! for messages (a node's path as `services[1] "api": policy`, what was
//! found there) and for the positions of the errors found after parsing.

use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A node with its position.
pub(super) type At = Spanned<Node>;

#[derive(Debug)]
pub(super) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<At>),
    /// Every entry as written, repeated keys included.
    Map(Vec<(At, At)>),
}

/// One step of a path from the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

/// A 1-based (line, column).
pub(super) type Pos = (usize, usize);

pub(super) fn pos(at: &At) -> Pos {
    let l = at.referenced;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    (n(l.line()), n(l.column()))
}

impl Node {
    pub(super) fn get(&self, name: &str) -> Option<&At> {
        match self {
            Node::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Node::Str(s) if s == name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn step(&self, seg: &Seg) -> Option<&At> {
        match (self, seg) {
            (Node::Seq(items), Seg::Index(i)) => items.get(*i),
            (_, Seg::Key(k)) => self.get(k),
            _ => None,
        }
    }

    /// A non-blank string.
    fn text(&self) -> Option<&str> {
        match self {
            Node::Str(s) if !s.trim().is_empty() => Some(s),
            _ => None,
        }
    }
}

/// The node at `path`, if the document has it.
pub(super) fn find<'a>(root: &'a At, path: &[Seg]) -> Option<&'a At> {
    path.iter().try_fold(root, |at, seg| at.value.step(seg))
}

/// The path of the deepest node starting at or before `p`: the value an
/// error at `p` is about. `at_key` tells that `p` is the key of that value
/// (the last step of the path), not the value itself.
pub(super) fn path_at(root: &At, p: Pos) -> (Vec<Seg>, bool) {
    let mut path = Vec::new();
    let mut at = root;
    loop {
        let next = match &at.value {
            Node::Seq(items) => items
                .iter()
                .enumerate()
                .rfind(|(_, item)| pos(item) <= p)
                .map(|(i, item)| (Seg::Index(i), item)),
            Node::Map(entries) => match entries.iter().rfind(|(k, _)| pos(k) <= p) {
                Some((k, v)) => match &k.value {
                    Node::Str(name) if pos(k) == p => {
                        path.push(Seg::Key(name.clone()));
                        return (path, true);
                    }
                    Node::Str(name) => Some((Seg::Key(name.clone()), v)),
                    _ => None,
                },
                None => None,
            },
            _ => None,
        };
        match next {
            Some((seg, child)) => {
                path.push(seg);
                at = child;
            }
            None => return (path, false),
        }
    }
}

/// Where `path` is, as messages start: `services[1] "api": backend
/// 10.0.0.1:80: weight`, `services[0]: affinity.timeoutSeconds`, `top
/// level`. A service is named when its `name:` is a string, a backend by its
/// address when that is a valid one.
pub(super) fn label(root: Option<&At>, path: &[Seg]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    let mut node = root;
    let mut shown_address = false;
    let mut segs = path.iter().peekable();
    while let Some(seg) = segs.next() {
        node = node.and_then(|n| n.value.step(seg));
        match (seg, segs.peek()) {
            (Seg::Key(k), Some(Seg::Index(i))) => {
                let item = node.and_then(|n| n.value.step(&Seg::Index(*i)));
                let field = |f| {
                    item.and_then(|n| n.value.get(f))
                        .and_then(|n| n.value.text())
                };
                keys.push(k);
                let mut part = format!("{}[{i}]", keys.join("."));
                keys.clear();
                let name = field("name").filter(|_| k == "services");
                let address =
                    field("address").filter(|a| k == "backends" && a.parse::<SocketAddr>().is_ok());
                if let Some(name) = name {
                    part = format!("{part} {}", Quoted(name));
                } else if let Some(a) = address {
                    part = format!("backend {}", Clipped(a));
                    shown_address = true;
                }
                parts.push(part);
                segs.next();
                node = item;
            }
            (Seg::Key(k), _) if k == "address" && shown_address => {}
            (Seg::Key(k), _) => keys.push(k),
            (Seg::Index(i), _) => parts.push(format!("[{i}]")),
        }
    }
    if !keys.is_empty() {
        parts.push(keys.join("."));
    }
    if parts.is_empty() {
        return "top level".to_owned();
    }
    parts.join(": ")
}

/// What a node holds, for "found ..." in messages.
pub(super) struct Found<'a>(pub Option<&'a Node>);

impl fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None | Some(Node::Null) => f.write_str("nothing (null)"),
            Some(Node::Bool(b)) => write!(f, "{b}"),
            Some(Node::Int(i)) => write!(f, "{i}"),
            Some(Node::Float(x)) => write!(f, "{x}"),
            Some(Node::Str(s)) => write!(f, "{}", Quoted(s)),
            Some(Node::Seq(_)) => f.write_str("a list"),
            Some(Node::Map(_)) => f.write_str("a mapping"),
        }
    }
}

/// Text from the file as shown in a message: control characters escaped
/// (messages are one line) and long text cut.
pub(super) struct Clipped<'a>(pub &'a str);

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
pub(super) struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", Clipped(self.0))
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        // Beyond any range accepted here; only messages show it.
        #[allow(clippy::cast_precision_loss)]
        Ok(i128::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Node, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}
