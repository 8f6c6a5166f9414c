//! Service addresses on the node: the `sluice0` device (issue 3).
//!
//! Like kube-proxy's IPVS mode with `kube-ipvs0`, sluice assigns every Service
//! IP it serves to a network device of the node, as a /32 (IPv4) or /128
//! (IPv6). The kernel then treats the address as local: traffic from pods and
//! from the node itself is delivered to sluice's listeners, and sluice can
//! bind them. The device may stay down: a local address on a down device is
//! still local (the kernel installs its route in the `local` table).
//!
//! Everything goes through rtnetlink (the `rtnetlink` crate); nothing shells
//! out to `ip`.
//!
//! # API
//! ```no_run
//! # async fn demo(table: &sluice_control::Table) -> Result<(), sluice_proxy::vip::VipError> {
//! use sluice_proxy::vip::{service_ips, VipDevice};
//! // None: the default device `sluice0`, a dummy created if missing.
//! // Some("lo"): an existing device given with `--vip-interface`.
//! let mut device = VipDevice::open(None).await?;
//! let report = device.sync(&service_ips(table)).await?;
//! for failure in &report.failed {
//!     tracing::warn!("{failure}"); // names the address that failed
//! }
//! # Ok(()) }
//! ```
//! - [`VipDevice::open`]`(interface: Option<&str>) -> Result<VipDevice, VipError>`
//!   (async): `None` opens the device [`DEFAULT_INTERFACE`] (`sluice0`),
//!   creating it as a dummy device when missing (left down). On a kernel
//!   without the dummy driver this fails with [`VipError::DummyUnsupported`],
//!   whose message names the `--vip-interface` flag. `Some(name)` opens an
//!   existing device and never creates one ([`VipError::InterfaceNotFound`]).
//!   `open` never adds nor removes an address.
//! - [`VipDevice::sync`]`(&mut self, want: &BTreeSet<IpAddr>) -> Result<SyncReport, VipError>`:
//!   makes sluice's addresses on the device exactly `want`: adds the missing
//!   ones, removes sluice's addresses not in `want`, including those left by
//!   a previous run (the first sync after a restart is the cleanup, so an
//!   address still served is never removed and re-added). Idempotent. A
//!   failure on one address does not stop the others: it is listed in
//!   [`SyncReport::failed`] as a [`VipError`] naming the address. `Err` is
//!   returned only when the device's addresses cannot be listed at all, or
//!   when the kernel cannot keep sluice's mark (see below).
//! - [`VipDevice::owned_addresses`]: sluice's addresses now on the device.
//! - [`service_ips`]`(&Table) -> BTreeSet<IpAddr>`: the IPs of a table's
//!   listen keys, without loopback (127/8, ::1: already local), unspecified
//!   and multicast addresses; IPv4-mapped IPv6 addresses become IPv4.
//!
//! # Whose address is it?
//! On the device sluice owns (`sluice0`, opened with `None`) every address
//! is sluice's, except the kernel's own (IPv6 link-local, or any address the
//! kernel marks as its own), so a stray address there is removed too.
//!
//! On a device given with `--vip-interface` (shared: `lo`, or a device set up
//! by someone else) sluice removes only the addresses it marked. The mark is
//! the address protocol attribute `IFA_PROTO` set to [`ADDRESS_PROTOCOL`].
//! Why `IFA_PROTO` rather than an IPv4 address label: it exists for exactly
//! this ("who added this address", like a route's protocol), it covers IPv4
//! *and* IPv6 (labels are IPv4 only), it does not need the `DEVICE:suffix`
//! form that labels must have (15 bytes in all, so nothing left with a long
//! device name), and it does not make the address show up as an alias
//! interface to old tools. The kernel stores it since Linux 5.18 (IPv4
//! and IPv6; `ip address show` prints it since iproute2 6.3). An older kernel
//! silently drops the attribute: sluice checks, after its first add on a
//! shared device, that the kernel kept the mark, and otherwise takes its own
//! unmarked addresses back and fails with [`VipError::MarkingUnsupported`]
//! rather than leave addresses it could never tell from others.
//!
//! An address that is wanted but already on the device without sluice's
//! mark (someone else's) is left as it is, reported in
//! [`SyncReport::foreign`], and never removed by sluice.
//!
//! IPv6 addresses are added with `IFA_F_NODAD`: duplicate address detection
//! never runs on a down device, and a tentative address cannot be bound.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::{Handle, LinkDummy};
use sluice_control::Table;

/// The device sluice creates and owns when no `--vip-interface` is given.
pub const DEFAULT_INTERFACE: &str = "sluice0";

/// The `IFA_PROTO` value that marks an address as sluice's (0x53, 'S').
/// The kernel reserves 0 to 3 (unspec, kernel_lo, kernel_ra, kernel_ll);
/// user space values are unregistered.
pub const ADDRESS_PROTOCOL: u8 = 0x53;

// Address protocols the kernel sets on addresses it creates itself.
const KERNEL_PROTOCOLS: [u8; 3] = [1, 2, 3];

/// Errors of the VIP device.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("cannot open a netlink socket: {0}")]
    Netlink(#[source] std::io::Error),

    #[error(
        "cannot create the dummy device {name}: this kernel has no dummy driver \
         (CONFIG_DUMMY); put Service addresses on an existing device instead with \
         --vip-interface NAME (e.g. --vip-interface lo, or an ifb device)"
    )]
    DummyUnsupported { name: String },

    #[error("cannot create the dummy device {name}: {source}")]
    CreateDevice {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("network device {name} (--vip-interface) does not exist")]
    InterfaceNotFound { name: String },

    #[error("cannot look up network device {name}: {source}")]
    LookupDevice {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("cannot list the addresses of {interface}: {source}")]
    ListAddresses {
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("cannot add {addr}/{prefix_len} to {interface}: {source}")]
    AddAddress {
        interface: String,
        addr: IpAddr,
        prefix_len: u8,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("cannot remove {addr}/{prefix_len} from {interface}: {source}")]
    RemoveAddress {
        interface: String,
        addr: IpAddr,
        prefix_len: u8,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("{addr} cannot be a Service address on {interface}: it is unspecified or multicast")]
    NotAssignable { interface: String, addr: IpAddr },

    #[error(
        "the kernel did not keep sluice's address mark (IFA_PROTO, Linux >= 5.18) on {interface}: \
         sluice could not tell its addresses from others there; use the default device \
         (no --vip-interface) on this kernel"
    )]
    MarkingUnsupported { interface: String },
}

impl VipError {
    /// The address this error is about, for per-address failures.
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            VipError::AddAddress { addr, .. }
            | VipError::RemoveAddress { addr, .. }
            | VipError::NotAssignable { addr, .. } => Some(*addr),
            _ => None,
        }
    }
}

/// What one [`VipDevice::sync`] did. Each list is in address order.
#[derive(Debug, Default)]
#[must_use]
pub struct SyncReport {
    /// Wanted and added now.
    pub added: Vec<IpAddr>,
    /// sluice's addresses no longer wanted, removed now (also those of a
    /// previous run, and on the owned device any stray address).
    pub removed: Vec<IpAddr>,
    /// Wanted and already there as sluice's: untouched.
    pub kept: Vec<IpAddr>,
    /// Wanted but already on the device as someone else's address: left
    /// alone (it is local all the same) and never removed by sluice.
    pub foreign: Vec<IpAddr>,
    /// Per-address failures, each naming its address; the other addresses
    /// were still handled.
    pub failed: Vec<VipError>,
}

impl SyncReport {
    /// Whether every address was handled.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// One address found on the device.
#[derive(Debug, Clone)]
struct Found {
    ip: IpAddr,
    prefix_len: u8,
    protocol: Option<u8>,
    message: AddressMessage,
}

/// The device that carries sluice's Service addresses.
#[derive(Debug)]
pub struct VipDevice {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
    name: String,
    index: u32,
    owned: bool,
    mark_verified: bool,
}

impl Drop for VipDevice {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl VipDevice {
    /// Opens the device: `None` for [`DEFAULT_INTERFACE`], a dummy device
    /// created if missing (and then owned by sluice); `Some(name)` for an
    /// existing device given with `--vip-interface` (shared: only marked
    /// addresses are ever removed). Must run inside a Tokio runtime: it
    /// spawns the netlink connection task, which lives as long as the
    /// returned value. Adds and removes nothing.
    pub async fn open(interface: Option<&str>) -> Result<VipDevice, VipError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VipError::Netlink)?;
        let connection = tokio::spawn(connection);
        let mut device = VipDevice {
            handle,
            connection,
            name: interface.unwrap_or(DEFAULT_INTERFACE).to_owned(),
            index: 0,
            owned: interface.is_none(),
            mark_verified: false,
        };
        device.index = match (device.lookup().await?, interface) {
            (Some(index), _) => index,
            (None, Some(name)) => {
                return Err(VipError::InterfaceNotFound {
                    name: name.to_owned(),
                });
            }
            (None, None) => device.create_dummy().await?,
        };
        tracing::debug!(
            interface = %device.name,
            index = device.index,
            owned = device.owned,
            "VIP device open"
        );
        Ok(device)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether sluice owns the device (every address on it is sluice's).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// The interface index of the device by name, `None` if it does not exist.
    async fn lookup(&self) -> Result<Option<u32>, VipError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(self.name.clone())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(VipError::LookupDevice {
                name: self.name.clone(),
                source,
            }),
        }
    }

    async fn create_dummy(&self) -> Result<u32, VipError> {
        let added = self
            .handle
            .link()
            .add(LinkDummy::new(&self.name).build())
            .execute()
            .await;
        match added {
            // EEXIST: created meanwhile by someone else; use it.
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            // The kernel answers EOPNOTSUPP ("Unknown device type") when no
            // driver registers the link kind "dummy".
            Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
                return Err(VipError::DummyUnsupported {
                    name: self.name.clone(),
                });
            }
            Err(source) => {
                return Err(VipError::CreateDevice {
                    name: self.name.clone(),
                    source,
                });
            }
        }
        tracing::info!(interface = %self.name, "created dummy device for Service addresses");
        self.lookup()
            .await?
            .ok_or_else(|| VipError::InterfaceNotFound {
                name: self.name.clone(),
            })
    }

    /// Every address on the device.
    async fn dump(&self) -> Result<Vec<Found>, VipError> {
        let list_err = |source| VipError::ListAddresses {
            interface: self.name.clone(),
            source,
        };
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(list_err)? {
            let mut local = None;
            let mut address = None;
            let mut protocol = None;
            for attribute in &message.attributes {
                match attribute {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    AddressAttribute::Protocol(p) => protocol = Some(u8::from(*p)),
                    _ => {}
                }
            }
            // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on
            // point-to-point links, and the only one given for IPv6.
            if let Some(ip) = local.or(address) {
                found.push(Found {
                    ip,
                    prefix_len: message.header.prefix_len,
                    protocol,
                    message,
                });
            }
        }
        Ok(found)
    }

    /// Whether an address on the device is sluice's.
    fn is_ours(&self, found: &Found) -> bool {
        if self.owned {
            let kernel = found
                .protocol
                .is_some_and(|p| KERNEL_PROTOCOLS.contains(&p));
            let link_local = matches!(found.ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            !kernel && !link_local
        } else {
            found.protocol == Some(ADDRESS_PROTOCOL)
        }
    }

    /// sluice's addresses now on the device (on a shared device: the marked
    /// ones, whichever run added them).
    pub async fn owned_addresses(&self) -> Result<BTreeSet<IpAddr>, VipError> {
        Ok(self
            .dump()
            .await?
            .into_iter()
            .filter(|f| self.is_ours(f))
            .map(|f| f.ip)
            .collect())
    }

    /// Makes sluice's addresses on the device exactly `want`, each as a
    /// /32 or /128. See the module documentation.
    pub async fn sync(&mut self, want: &BTreeSet<IpAddr>) -> Result<SyncReport, VipError> {
        let present = self.dump().await?;
        let mut report = SyncReport::default();

        // Remove first: an IPv6 address held with another prefix length
        // must go before it can be added as a /128.
        let mut stale: Vec<&Found> = present
            .iter()
            .filter(|f| {
                self.is_ours(f) && !(want.contains(&f.ip) && f.prefix_len == full_prefix(f.ip))
            })
            .collect();
        stale.sort_by_key(|f| (f.ip, f.prefix_len));
        for found in stale {
            match self.remove(found).await {
                Ok(()) => report.removed.push(found.ip),
                Err(e) => report.failed.push(e),
            }
        }

        let mut added_now = Vec::new();
        for &ip in want {
            if ip.is_unspecified() || ip.is_multicast() {
                report.failed.push(VipError::NotAssignable {
                    interface: self.name.clone(),
                    addr: ip,
                });
                continue;
            }
            let ours_full = present
                .iter()
                .any(|f| f.ip == ip && f.prefix_len == full_prefix(ip) && self.is_ours(f));
            if ours_full {
                report.kept.push(ip);
            } else if present.iter().any(|f| f.ip == ip && !self.is_ours(f)) {
                report.foreign.push(ip);
            } else {
                match self.add(ip).await {
                    Ok(true) => {
                        report.added.push(ip);
                        added_now.push(ip);
                    }
                    // Appeared meanwhile (EEXIST): local all the same.
                    Ok(false) => report.foreign.push(ip),
                    Err(e) => report.failed.push(e),
                }
            }
        }

        if !self.owned && !self.mark_verified && !added_now.is_empty() {
            self.verify_mark(&added_now).await?;
        }
        if !report.added.is_empty() || !report.removed.is_empty() || !report.failed.is_empty() {
            tracing::info!(
                interface = %self.name,
                added = report.added.len(),
                removed = report.removed.len(),
                kept = report.kept.len(),
                foreign = report.foreign.len(),
                failed = report.failed.len(),
                "Service addresses synced"
            );
        }
        Ok(report)
    }

    /// Adds `ip` with sluice's mark. `Ok(false)` when it already existed.
    async fn add(&self, ip: IpAddr) -> Result<bool, VipError> {
        let prefix_len = full_prefix(ip);
        let mut request = self.handle.address().add(self.index, ip, prefix_len);
        let attributes = &mut request.message_mut().attributes;
        attributes.push(AddressAttribute::Protocol(AddressProtocol::from(
            ADDRESS_PROTOCOL,
        )));
        if ip.is_ipv6() {
            attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(source) => Err(VipError::AddAddress {
                interface: self.name.clone(),
                addr: ip,
                prefix_len,
                source,
            }),
        }
    }

    async fn remove(&self, found: &Found) -> Result<(), VipError> {
        match self
            .handle
            .address()
            .del(found.message.clone())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            // Already gone (EADDRNOTAVAIL): the goal is reached.
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(source) => Err(VipError::RemoveAddress {
                interface: self.name.clone(),
                addr: found.ip,
                prefix_len: found.prefix_len,
                source,
            }),
        }
    }

    /// Checks that the kernel kept the mark on the addresses just added; if
    /// it dropped it (kernel before 5.18), takes them back and fails.
    async fn verify_mark(&mut self, added: &[IpAddr]) -> Result<(), VipError> {
        let present = self.dump().await?;
        let ours: Vec<&Found> = present
            .iter()
            .filter(|f| added.contains(&f.ip) && f.prefix_len == full_prefix(f.ip))
            .collect();
        if ours.iter().any(|f| f.protocol == Some(ADDRESS_PROTOCOL)) {
            self.mark_verified = true;
            return Ok(());
        }
        if ours.is_empty() {
            // Removed meanwhile by someone else: nothing to judge by.
            return Ok(());
        }
        for found in ours {
            if let Err(e) = self.remove(found).await {
                tracing::warn!("{e}");
            }
        }
        Err(VipError::MarkingUnsupported {
            interface: self.name.clone(),
        })
    }
}

/// The Service IPs of a table: the IP of every listen key, except loopback
/// (127/8, ::1: already local), unspecified (listen on all) and multicast
/// addresses. IPv4-mapped IPv6 addresses are given as IPv4.
pub fn service_ips(table: &Table) -> BTreeSet<IpAddr> {
    table
        .keys()
        .map(|key| key.addr.ip().to_canonical())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
        .collect()
}

fn full_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The errno of a netlink error answer (positive), if it is one.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{ListenKey, Policy, Protocol, Service};
    use std::net::SocketAddr;
    use std::sync::Arc;

    fn table(addrs: &[(&str, Protocol)]) -> Table {
        let mut t = Table::new();
        for (a, protocol) in addrs {
            let addr: SocketAddr = a.parse().unwrap();
            t.insert(
                ListenKey {
                    addr,
                    protocol: *protocol,
                },
                Arc::new(Service::new(*a, Policy::RoundRobin, None, vec![])),
            );
        }
        t
    }

    #[test]
    fn service_ips_dedupes_and_skips_loopback() {
        let t = table(&[
            ("10.96.0.10:53", Protocol::Tcp),
            ("10.96.0.10:53", Protocol::Udp),
            ("10.96.0.10:9153", Protocol::Tcp),
            ("10.96.0.1:443", Protocol::Tcp),
            ("127.0.0.1:8080", Protocol::Tcp),
            ("127.1.2.3:8080", Protocol::Tcp),
            ("[::1]:80", Protocol::Tcp),
            ("0.0.0.0:30000", Protocol::Tcp),
            ("[::]:30000", Protocol::Tcp),
            ("[fd00::10]:80", Protocol::Tcp),
            ("[::ffff:10.96.0.2]:80", Protocol::Tcp),
        ]);
        let got: Vec<String> = service_ips(&t).iter().map(|ip| ip.to_string()).collect();
        assert_eq!(got, ["10.96.0.1", "10.96.0.2", "10.96.0.10", "fd00::10"]);
    }

    #[test]
    fn service_ips_of_empty_table_is_empty() {
        assert!(service_ips(&Table::new()).is_empty());
    }

    #[test]
    fn dummy_error_names_the_flag() {
        let e = VipError::DummyUnsupported {
            name: DEFAULT_INTERFACE.into(),
        };
        let msg = e.to_string();
        assert!(msg.contains("--vip-interface"), "{msg}");
        assert!(msg.contains("sluice0"), "{msg}");
        assert!(msg.contains("dummy"), "{msg}");
    }
}
