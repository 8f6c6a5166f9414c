//! Element changes to sluice's nftables table straight over nf_tables
//! netlink, without forking `nft`.
//!
//! An update of the table ([`crate::nft::Ruleset::element_ops`]) adds and
//! deletes set and map elements only. `nft -f` takes ~16 ms for one such
//! change at 10,000 Services; measured with strace, most of it is the
//! `close()` of nft's netlink socket (~10-15 ms, see [`Conn`]), then the
//! fork and the cache dump nft does before it sends anything; the batch
//! itself takes ~0.1 ms in the kernel. Here the same change is one netlink
//! batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DELSETELEM`/`NFT_MSG_NEWSETELEM`
//! per set, `NFNL_MSG_BATCH_END`): the kernel commits a batch as one
//! transaction, exactly as it does `nft -f`'s (which is the same kind of
//! batch), so a failed message (an element that is not there to delete:
//! someone changed the table) leaves the table as it was. The table's
//! structure (table, chains, sets, rules) stays an `nft -f` script
//! ([`crate::nft::Ruleset::full_sync_script`]): created once, rarely changed.
//!
//! The encoder ([`encode`]) is pure and tested against the bytes `nft
//! --debug=mnl` printed for the same elements (nft 1.0.6). The thin part
//! ([`Conn`]) keeps a `NETLINK_NETFILTER` socket open (netlink-sys, already
//! in the tree through rtnetlink), sends the batch and reads one
//! acknowledgement per element message. No crate fitted: `nftnl` wraps
//! libnftnl (a C library, an apt package for every build), `rustables`
//! builds whole tables from Rust types rather than elements of a table
//! `nft` declared, and netlink-packet-netfilter covers nflog and conntrack,
//! not nf_tables.
//!
//! Element layout (`include/uapi/linux/netfilter/nf_tables.h`, and what
//! `nft` sends): a concatenated key is its components one after another,
//! each padded to 4 bytes (`ipv4_addr . inet_proto . inet_service` is
//! `a.b.c.d`, `proto 0 0 0`, `port-hi port-lo 0 0`: 12 bytes; 24 for IPv6).
//! An interval element of a concatenation (`firewall-allow`, `flags
//! interval`) is one element with `NFTA_SET_ELEM_KEY` (first address) and
//! `NFTA_SET_ELEM_KEY_END` (last address of the network). A verdict-map
//! value is `NFTA_DATA_VERDICT { code, chain }`; an `inet_service` value is
//! its 2 bytes, unpadded.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use sluice_control::{Cidr, NoEndpoints, Protocol};

use crate::nft::{Element, ElementOp, SetItem};

/// The table's name (its family is [`NFPROTO_INET`]): [`crate::nft::TABLE`].
const TABLE_NAME: &str = "sluice";
/// The chain a `goto` verdict of `no-endpoint-services` names.
const REJECT_CHAIN: &str = "reject-chain";

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 0x2;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: u32 = 0;
/// `NFT_GOTO` (-4) as the kernel reads it.
const NFT_GOTO: u32 = 0xffff_fffc;

/// Elements per netlink message (one message per set and verb, split).
const PER_MESSAGE: usize = 256;
/// Largest batch sent over netlink: the default socket send buffer
/// (`net.core.wmem_default`, 212,992 bytes) with room to spare. A bigger
/// change (thousands of elements at once) goes through `nft -f`.
pub const MAX_BATCH: usize = 128 * 1024;

/// A batch ready to send: the bytes and how many acknowledgements to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// Element messages (each asks for an acknowledgement).
    pub messages: u32,
    /// Sequence number of the first element message; the rest follow.
    pub first_seq: u32,
}

/// Why a netlink batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("the change is too large for one netlink batch ({0} bytes)")]
    TooLarge(usize),
    #[error("nf_tables netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused {what} ({error}){detail}")]
    Refused {
        /// The set and verb of the failed message.
        what: String,
        error: io::Error,
        /// The kernel's extended-ack message, if any (`: ...`).
        detail: String,
    },
    #[error("no answer to {0} of the batch's messages within 1s")]
    NoAnswer(u32),
}

/// Encodes `ops` as one batch, element messages numbered from `seq + 1`.
/// Deletes and adds keep the order of `ops` (deletes first, as
/// [`crate::nft::Ruleset::element_ops`] gives them); consecutive ops of the
/// same verb and set share a message.
pub fn encode(ops: &[ElementOp], seq: u32) -> Batch {
    let mut bytes = Vec::with_capacity(64 + ops.len() * 64);
    let mut next = seq;
    batch_marker(&mut bytes, NFNL_MSG_BATCH_BEGIN, next);
    let mut messages = 0u32;
    let mut start = 0;
    while start < ops.len() {
        let head = ops[start];
        let same = |o: &ElementOp| o.add == head.add && same_set(&o.item, &head.item);
        let run = ops[start..]
            .iter()
            .take(PER_MESSAGE)
            .take_while(|o| same(o))
            .count();
        next = next.wrapping_add(1);
        element_message(&mut bytes, &ops[start..start + run], next);
        messages += 1;
        start += run;
    }
    batch_marker(&mut bytes, NFNL_MSG_BATCH_END, next.wrapping_add(1));
    Batch {
        bytes,
        messages,
        first_seq: seq.wrapping_add(1),
    }
}

fn same_set(a: &SetItem, b: &SetItem) -> bool {
    a.set() == b.set() && a.is_ipv4() == b.is_ipv4()
}

/// `nlmsghdr` + `nfgenmsg`; returns where the header starts (its length
/// is filled in by [`finish`]).
fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    at
}

/// Writes the length of the message or attribute that starts at `at`.
fn finish(buf: &mut [u8], at: usize, width: usize) {
    let len = buf.len() - at;
    match width {
        4 => buf[at..at + 4].copy_from_slice(&(len as u32).to_ne_bytes()),
        _ => buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes()),
    }
}

fn batch_marker(buf: &mut Vec<u8>, ty: u16, seq: u32) {
    let at = header(buf, ty, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
    finish(buf, at, 4);
}

/// Starts an attribute; close it with [`close`].
fn open(buf: &mut Vec<u8>, ty: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    at
}

/// Ends the attribute opened at `at` and pads to 4 bytes.
fn close(buf: &mut Vec<u8>, at: usize) {
    finish(buf, at, 2);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let at = open(buf, ty);
    buf.extend_from_slice(payload);
    close(buf, at);
}

/// A NUL-terminated string attribute.
fn attr_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let at = open(buf, ty);
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    close(buf, at);
}

/// `NFTA_..._KEY { NFTA_DATA_VALUE bytes }` (or `_DATA`).
fn data_value(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let outer = open(buf, ty | NLA_F_NESTED);
    attr(buf, NFTA_DATA_VALUE, value);
    close(buf, outer);
}

fn element_message(buf: &mut Vec<u8>, ops: &[ElementOp], seq: u32) {
    let Some(first) = ops.first() else { return };
    let (ty, flags) = match first.add {
        true => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
        false => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | ty;
    let at = header(buf, ty, flags, seq, NFPROTO_INET, 0);
    attr_str(buf, NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME);
    attr_str(buf, NFTA_SET_ELEM_LIST_SET, &first.item.set_name());
    let list = open(buf, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
    for op in ops {
        let elem = open(buf, NFTA_LIST_ELEM | NLA_F_NESTED);
        element(buf, &op.item, op.add);
        close(buf, elem);
    }
    close(buf, list);
    finish(buf, at, 4);
}

/// The attributes of one element (a delete names the key only).
fn element(buf: &mut Vec<u8>, item: &SetItem, add: bool) {
    match item {
        SetItem::Redirect(e) | SetItem::Firewall(e) => {
            data_value(buf, NFTA_SET_ELEM_KEY, &key(e));
        }
        SetItem::NoEndpoints(e, verdict) => {
            data_value(buf, NFTA_SET_ELEM_KEY, &key(e));
            if add {
                let data = open(buf, NFTA_SET_ELEM_DATA | NLA_F_NESTED);
                let v = open(buf, NFTA_DATA_VERDICT | NLA_F_NESTED);
                match verdict {
                    NoEndpoints::Reject => {
                        attr(buf, NFTA_VERDICT_CODE, &NFT_GOTO.to_be_bytes());
                        attr_str(buf, NFTA_VERDICT_CHAIN, REJECT_CHAIN);
                    }
                    NoEndpoints::Drop => attr(buf, NFTA_VERDICT_CODE, &NF_DROP.to_be_bytes()),
                }
                close(buf, v);
                close(buf, data);
            }
        }
        SetItem::Allow(e, network) => {
            let (first, last) = bounds(network);
            let mut start = key(e);
            start.extend_from_slice(&first);
            let mut end = key(e);
            end.extend_from_slice(&last);
            data_value(buf, NFTA_SET_ELEM_KEY, &start);
            data_value(buf, NFTA_SET_ELEM_KEY_END, &end);
        }
        SetItem::UdpPort(e, port) => {
            let mut k = addr_bytes(e.addr);
            push_padded(&mut k, &e.port.to_be_bytes());
            data_value(buf, NFTA_SET_ELEM_KEY, &k);
            if add {
                data_value(buf, NFTA_SET_ELEM_DATA, &port.to_be_bytes());
            }
        }
    }
}

/// `address . protocol . port`, each padded to 4 bytes.
fn key(e: &Element) -> Vec<u8> {
    let mut k = addr_bytes(e.addr);
    let proto = match e.protocol {
        Protocol::Tcp => libc::IPPROTO_TCP,
        Protocol::Udp => libc::IPPROTO_UDP,
    };
    push_padded(&mut k, &[proto as u8]);
    push_padded(&mut k, &e.port.to_be_bytes());
    k
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn push_padded(k: &mut Vec<u8>, field: &[u8]) {
    k.extend_from_slice(field);
    k.resize(k.len().next_multiple_of(4), 0);
}

/// The first and last address of `network`, as bytes.
fn bounds(network: &Cidr) -> (Vec<u8>, Vec<u8>) {
    let first = addr_bytes(network.addr());
    let host_bits = first.len() * 8 - usize::from(network.prefix());
    let mut last = first.clone();
    // Set the host bits, from the last byte backwards.
    let mut left = host_bits;
    for byte in last.iter_mut().rev() {
        if left == 0 {
            break;
        }
        let n = left.min(8);
        *byte |= ((1u16 << n) - 1) as u8;
        left -= n;
    }
    (first, last)
}

/// Applies `ops` to sluice's table in the current network namespace as one
/// netlink transaction, on a socket of its own ([`Conn`] keeps one open:
/// closing an nf_tables netlink socket costs ~10 ms here).
pub fn apply(ops: &[ElementOp]) -> Result<(), NetlinkError> {
    Conn::open()?.apply(ops)
}

/// An open `NETLINK_NETFILTER` socket in the network namespace it was
/// opened in. Kept open across updates: closing one takes ~10-15 ms of
/// wall time on Linux 6.18 here (measured with strace in `sluice-bench
/// control`; the kernel waits for an RCU grace period), which is most of
/// what one `nft -f` run costs, not the fork or the batch (~0.1 ms).
#[derive(Debug)]
pub struct Conn {
    socket: netlink_sys::Socket,
    seq: u32,
}

impl Conn {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = netlink_sys::Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        // Acknowledgements without a copy of the (large) request; errors
        // with the kernel's message.
        socket.set_cap_ack(true)?;
        let _ = socket.set_ext_ack(true);
        socket2::SockRef::from(&socket).set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Self {
            socket,
            seq: seq_base(),
        })
    }

    /// Applies `ops` as one transaction. Blocking, but short: the kernel
    /// handles the whole batch inside the `send` and has queued every
    /// acknowledgement by the time it returns (1 s bound on the read all
    /// the same). Run it off the async runtime's threads (`spawn_blocking`).
    /// After an `Io` or `NoAnswer` error, open a new one.
    pub fn apply(&mut self, ops: &[ElementOp]) -> Result<(), NetlinkError> {
        if ops.is_empty() {
            return Ok(());
        }
        let batch = encode(ops, self.seq);
        self.seq = self.seq.wrapping_add(batch.messages + 2);
        if batch.bytes.len() > MAX_BATCH {
            return Err(NetlinkError::TooLarge(batch.bytes.len()));
        }
        let sent = self.socket.send(&batch.bytes, 0)?;
        if sent != batch.bytes.len() {
            return Err(NetlinkError::Io(io::Error::other(format!(
                "sent {sent} of {} bytes",
                batch.bytes.len()
            ))));
        }
        let mut answered = 0u32;
        let mut failure: Option<NetlinkError> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while answered < batch.messages {
            let n = match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // A refused batch may answer only for the failed message.
                    return Err(
                        failure.unwrap_or(NetlinkError::NoAnswer(batch.messages - answered))
                    );
                }
                Err(e) => return Err(e.into()),
            };
            for ack in parse_acks(&buf[..n]) {
                let offset = ack.seq.wrapping_sub(batch.first_seq);
                if offset >= batch.messages {
                    continue; // not this batch's (a late answer to an earlier one)
                }
                answered += 1;
                if ack.error != 0 && failure.is_none() {
                    failure = Some(NetlinkError::Refused {
                        what: describe(ops, offset),
                        error: io::Error::from_raw_os_error(-ack.error),
                        detail: ack.message.map(|m| format!(": {m}")).unwrap_or_default(),
                    });
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A first sequence number unlikely to match an earlier process's batch.
fn seq_base() -> u32 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(1)
}

/// "adding to service-ips-v4" for the `index`th element message of `ops`.
fn describe(ops: &[ElementOp], index: u32) -> String {
    let mut seen = 0u32;
    let mut start = 0;
    while start < ops.len() {
        let head = ops[start];
        let run = (ops[start..].iter().take(PER_MESSAGE))
            .take_while(|o| o.add == head.add && same_set(&o.item, &head.item))
            .count();
        if seen == index {
            let verb = if head.add {
                "adding to"
            } else {
                "deleting from"
            };
            return format!("{verb} {} ({run} elements)", head.item.set_name());
        }
        seen += 1;
        start += run;
    }
    "a message of the batch".to_string()
}

/// One `NLMSG_ERROR` answer: 0 is an acknowledgement.
#[derive(Debug, PartialEq, Eq)]
struct Ack {
    seq: u32,
    error: i32,
    message: Option<String>,
}

/// The `NLMSG_ERROR` messages in `buf` (others are skipped; a truncated
/// message ends the walk).
fn parse_acks(buf: &[u8]) -> Vec<Ack> {
    let u32_at = |at: usize| -> Option<u32> {
        let b = buf.get(at..at + 4)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b = buf.get(at..at + 2)?;
        Some(u16::from_ne_bytes([b[0], b[1]]))
    };
    let mut acks = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(ty), Some(flags)) = (u32_at(at), u16_at(at + 4), u16_at(at + 6)) {
        let len = len as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        if ty == NLMSG_ERROR {
            // nlmsgerr: error, then the request's header (capped).
            if let (Some(error), Some(seq)) = (u32_at(at + 16), u32_at(at + 20 + 8)) {
                let mut message = None;
                if flags & NLM_F_ACK_TLVS != 0 {
                    let mut tlv = at + 36;
                    while let (Some(tlen), Some(tty)) = (u16_at(tlv), u16_at(tlv + 2)) {
                        let tlen = usize::from(tlen);
                        if tlen < 4 || tlv + tlen > at + len {
                            break;
                        }
                        if tty == NLMSGERR_ATTR_MSG {
                            let text = &buf[tlv + 4..tlv + tlen];
                            let text = text.split(|b| *b == 0).next().unwrap_or(text);
                            message = Some(String::from_utf8_lossy(text).into_owned());
                        }
                        tlv += tlen.next_multiple_of(4);
                    }
                }
                acks.push(Ack {
                    seq,
                    error: error as i32,
                    message,
                });
            }
        }
        at += len.next_multiple_of(4);
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(k: &str) -> Element {
        let (addr, proto) = k.split_once('/').unwrap_or((k, "tcp"));
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        Element {
            addr: addr.ip(),
            protocol: if proto == "udp" {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            port: addr.port(),
        }
    }

    fn op(add: bool, item: SetItem) -> ElementOp {
        ElementOp { add, item }
    }

    /// The words of an `nft --debug=mnl` dump, as bytes in host order for
    /// the header fields (this machine is little-endian, as nft's dump).
    fn hdr(len: u32, ty: u16, flags: u16, seq: u32, nfgen: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&nfgen);
        v
    }

    /// The element message body after the table/set attributes, without
    /// the message header: what `nft --debug=mnl` printed for
    /// `add element inet sluice service-ips-v4 { 10.96.0.10 . tcp . 80 }`
    /// (nft also sends NFTA_SET_ELEM_LIST_SET_ID, which the kernel uses
    /// only when the set has no name; we leave it out).
    #[test]
    fn a_steered_key_is_the_bytes_nft_sends() {
        let batch = encode(&[op(true, SetItem::Redirect(element("10.96.0.10:80")))], 0);
        let mut want = hdr(20, 0x10, 1, 0, [0, 0, 0, 0x0a]);
        let mut msg = hdr(80, 0x0a0c, 0x405, 1, [1, 0, 0, 0]);
        msg.extend_from_slice(&[11, 0, 1, 0]);
        msg.extend_from_slice(b"sluice\0\0");
        msg.extend_from_slice(&[19, 0, 2, 0]);
        msg.extend_from_slice(b"service-ips-v4\0\0");
        msg.extend_from_slice(&[28, 0, 3, 0x80, 24, 0, 1, 0x80, 20, 0, 1, 0x80, 16, 0, 1, 0]);
        msg.extend_from_slice(&[0x0a, 0x60, 0, 0x0a, 6, 0, 0, 0, 0, 0x50, 0, 0]);
        want.extend_from_slice(&msg);
        want.extend_from_slice(&hdr(20, 0x11, 1, 2, [0, 0, 0, 0x0a]));
        assert_eq!(batch.bytes, want);
        assert_eq!(batch.messages, 1);
        assert_eq!(batch.first_seq, 1);
    }

    /// The ELEMENTS attribute of a message (after header, table, set).
    fn elements_of(batch: &Batch, set: &str) -> Vec<u8> {
        let skip = 20 + 20 + 12 + (4 + set.len() + 1).next_multiple_of(4);
        let end = batch.bytes.len() - 20;
        batch.bytes[skip..end].to_vec()
    }

    #[test]
    fn an_ipv6_delete_is_the_key_only() {
        let e = element("[fd00::1]:443");
        let batch = encode(&[op(false, SetItem::Redirect(e))], 0);
        assert_eq!(
            u16::from_ne_bytes([batch.bytes[24], batch.bytes[25]]),
            0x0a0e
        );
        let mut want = vec![40, 0, 3, 0x80, 36, 0, 1, 0x80, 32, 0, 1, 0x80, 28, 0, 1, 0];
        want.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[6, 0, 0, 0, 0x01, 0xbb, 0, 0]);
        assert_eq!(elements_of(&batch, "service-ips-v6"), want);
    }

    /// `{ 10.96.0.11 . tcp . 80 : goto reject-chain, 10.96.0.12 . udp . 53 : drop }`
    #[test]
    fn verdicts_are_a_goto_and_a_drop() {
        let ops = [
            op(
                true,
                SetItem::NoEndpoints(element("10.96.0.11:80"), NoEndpoints::Reject),
            ),
            op(
                true,
                SetItem::NoEndpoints(element("10.96.0.12:53/udp"), NoEndpoints::Drop),
            ),
        ];
        let batch = encode(&ops, 0);
        assert_eq!(batch.messages, 1);
        let mut want = vec![104, 0, 3, 0x80, 60, 0, 1, 0x80, 20, 0, 1, 0x80, 16, 0, 1, 0];
        want.extend_from_slice(&[0x0a, 0x60, 0, 0x0b, 6, 0, 0, 0, 0, 0x50, 0, 0]);
        want.extend_from_slice(&[
            36, 0, 2, 0x80, 32, 0, 2, 0x80, 8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfc,
        ]);
        want.extend_from_slice(&[17, 0, 2, 0]);
        want.extend_from_slice(b"reject-chain\0\0\0\0");
        want.extend_from_slice(&[40, 0, 1, 0x80, 20, 0, 1, 0x80, 16, 0, 1, 0]);
        want.extend_from_slice(&[0x0a, 0x60, 0, 0x0c, 0x11, 0, 0, 0, 0, 0x35, 0, 0]);
        want.extend_from_slice(&[16, 0, 2, 0x80, 12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(elements_of(&batch, "no-endpoint-services-v4"), want);
    }

    /// `udp-ports-v4 { 10.96.0.10 . 53 : 20000 }`: the value is 2 bytes.
    #[test]
    fn a_udp_port_value_is_two_bytes() {
        let ops = [op(
            true,
            SetItem::UdpPort(element("10.96.0.10:53/udp"), 20000),
        )];
        let batch = encode(&ops, 0);
        let mut want = vec![36, 0, 3, 0x80, 32, 0, 1, 0x80, 16, 0, 1, 0x80, 12, 0, 1, 0];
        want.extend_from_slice(&[0x0a, 0x60, 0, 0x0a, 0, 0x35, 0, 0]);
        want.extend_from_slice(&[12, 0, 2, 0x80, 6, 0, 1, 0, 0x4e, 0x20, 0, 0]);
        assert_eq!(elements_of(&batch, "udp-ports-v4"), want);
    }

    /// `firewall-allow-v4 { 192.168.60.1 . tcp . 80 . 10.0.0.0/8 }`: key
    /// and key end; a delete sends the same.
    #[test]
    fn a_source_range_is_a_key_and_a_key_end() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        let item = SetItem::Allow(element("192.168.60.1:80"), net);
        let mut want = vec![56, 0, 3, 0x80, 52, 0, 1, 0x80, 24, 0, 1, 0x80, 20, 0, 1, 0];
        want.extend_from_slice(&[192, 168, 60, 1, 6, 0, 0, 0, 0, 0x50, 0, 0, 10, 0, 0, 0]);
        want.extend_from_slice(&[24, 0, 10, 0x80, 20, 0, 1, 0]);
        want.extend_from_slice(&[
            192, 168, 60, 1, 6, 0, 0, 0, 0, 0x50, 0, 0, 10, 255, 255, 255,
        ]);
        for add in [true, false] {
            let batch = encode(&[op(add, item)], 0);
            assert_eq!(elements_of(&batch, "firewall-allow-v4"), want);
        }
    }

    #[test]
    fn network_bounds_set_the_host_bits() {
        let b = |c: &str| bounds(&c.parse().unwrap());
        assert_eq!(b("10.1.2.3/32"), (vec![10, 1, 2, 3], vec![10, 1, 2, 3]));
        assert_eq!(b("10.1.0.0/20"), (vec![10, 1, 0, 0], vec![10, 1, 15, 255]));
        assert_eq!(b("0.0.0.0/0"), (vec![0; 4], vec![255; 4]));
        let (first, last) = b("fd00::/8");
        assert_eq!(first[0], 0xfd);
        assert_eq!(last, [&[0xfd][..], &[0xff; 15][..]].concat());
    }

    #[test]
    fn messages_split_by_set_verb_and_size() {
        let mut ops = Vec::new();
        for i in 0..300u16 {
            let e = element(&format!("10.96.{}.{}:80", i / 250, i % 250 + 1));
            ops.push(op(false, SetItem::Redirect(e)));
        }
        ops.push(op(false, SetItem::Redirect(element("[fd00::1]:80"))));
        ops.push(op(true, SetItem::Redirect(element("10.96.9.9:80"))));
        let batch = encode(&ops, 7);
        // 300 deletes in two messages (256 + 44), the v6 delete, the add.
        assert_eq!(batch.messages, 4);
        assert_eq!(batch.first_seq, 8);
        assert_eq!(
            describe(&ops, 1),
            "deleting from service-ips-v4 (44 elements)"
        );
        assert_eq!(describe(&ops, 3), "adding to service-ips-v4 (1 elements)");
    }

    #[test]
    fn acks_and_errors_are_read_with_the_kernels_message() {
        let mut buf = hdr(36, NLMSG_ERROR, 0x100, 5, [0; 4]);
        buf.truncate(16);
        buf.extend_from_slice(&0i32.to_ne_bytes());
        buf.extend_from_slice(&hdr(80, 0x0a0c, 0x405, 5, [1, 0, 0, 0])[..16]);
        let mut err = hdr(0, NLMSG_ERROR, 0x300, 6, [0; 4]);
        err.truncate(16);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&hdr(80, 0x0a0e, 0x5, 6, [1, 0, 0, 0])[..16]);
        err.extend_from_slice(&[9, 0, 1, 0]);
        err.extend_from_slice(b"gone\0\0\0\0");
        let len = err.len() as u32;
        err[..4].copy_from_slice(&len.to_ne_bytes());
        buf.extend_from_slice(&err);
        let acks = parse_acks(&buf);
        assert_eq!(
            acks,
            [
                Ack {
                    seq: 5,
                    error: 0,
                    message: None
                },
                Ack {
                    seq: 6,
                    error: -libc::ENOENT,
                    message: Some("gone".into())
                },
            ]
        );
        // Truncated input: no panic, what was whole is kept.
        assert_eq!(parse_acks(&buf[..40]).len(), 1);
        assert!(parse_acks(&[1, 2, 3]).is_empty());
    }
}
