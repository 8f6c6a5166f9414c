//! An IP network (`10.0.0.0/8`, `fd00::/64`): what `loadBalancerSourceRanges`
//! and `--nodeport-addresses` hold.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network, always stored with its host bits cleared
/// (`10.1.2.3/8` is `10.0.0.0/8`, as Go's `net.ParseCIDR` returns it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a CIDR (expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/64)")]
pub struct BadCidr(pub String);

impl Cidr {
    /// The network of `addr` with `prefix` bits; `None` when `prefix` is
    /// longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        // Host bits: 32 or 128 minus the prefix; `None` when negative.
        let addr = match addr {
            IpAddr::V4(a) => {
                let host = 32u32.checked_sub(u32::from(prefix))?;
                let mask = u32::MAX.checked_shl(host).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let host = 128u32.checked_sub(u32::from(prefix))?;
                let mask = u128::MAX.checked_shl(host).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        Some(Self { addr, prefix })
    }

    /// The single address `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is in this network (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|n| n.addr == self.addr)
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    /// `ADDRESS/PREFIX`, surrounding spaces ignored (as kube-proxy trims
    /// `loadBalancerSourceRanges`).
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(s.to_owned());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One value of kube-proxy's `--nodeport-addresses`: a CIDR, or `primary`
/// (the node's primary addresses: its Node's, sluice's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    Primary,
    Cidr(Cidr),
}

impl FromStr for NodePortAddress {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, BadCidr> {
        match s.trim() {
            "primary" => Ok(Self::Primary),
            _ => s.parse().map(Self::Cidr),
        }
    }
}

/// Where node ports are served, from `--nodeport-addresses` (kube-proxy's
/// rule): `None` for the node's primary addresses (no value, or
/// `primary` alone); else the addresses of `local` (the node's interface
/// addresses) inside one of the CIDRs, loopback excepted (kube-proxy does
/// not serve node ports on localhost), sorted, each once. `primary` with
/// CIDRs is an error, as in kube-proxy.
pub fn nodeport_addresses(
    flag: &[NodePortAddress],
    local: &[IpAddr],
) -> Result<Option<Vec<IpAddr>>, String> {
    let cidrs: Vec<Cidr> = (flag.iter())
        .filter_map(|a| match a {
            NodePortAddress::Cidr(c) => Some(*c),
            NodePortAddress::Primary => None,
        })
        .collect();
    if cidrs.is_empty() {
        return Ok(None);
    }
    if cidrs.len() != flag.len() {
        return Err("`primary` cannot be combined with CIDRs".into());
    }
    let mut chosen: Vec<IpAddr> = (local.iter())
        .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|c| c.contains(**ip)))
        .copied()
        .collect();
    chosen.sort();
    chosen.dedup();
    Ok(Some(chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trims_and_clears_host_bits() {
        let c: Cidr = " 10.1.2.3/8 ".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            !c.contains("::a00:1".parse().unwrap()),
            "never across families"
        );
        let c: Cidr = "fd00::1/64".parse().unwrap();
        assert_eq!(c.to_string(), "fd00::/64");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0/8",
            "x/8",
            "::/129",
            "1.2.3.4/ 8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let wide: Cidr = "10.0.0.0/8".parse().unwrap();
        let narrow: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(wide.covers(&narrow) && !narrow.covers(&wide) && wide.covers(&wide));
        assert_eq!(
            Cidr::host("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1/32"
        );
    }

    #[test]
    fn nodeport_addresses_match_local_addresses_like_kube_proxy() {
        let flag =
            |v: &[&str]| -> Vec<NodePortAddress> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let local: Vec<IpAddr> = [
            "127.0.0.1",
            "192.168.50.10",
            "10.244.0.1",
            "fd00:50::10",
            "::1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(nodeport_addresses(&[], &local), Ok(None));
        assert_eq!(nodeport_addresses(&flag(&["primary"]), &local), Ok(None));
        let got = nodeport_addresses(&flag(&["192.168.50.0/24", "fd00::/8"]), &local).unwrap();
        let got: Vec<String> = got.unwrap().iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["192.168.50.10", "fd00:50::10"]);
        // Everything but loopback.
        let got = nodeport_addresses(&flag(&["0.0.0.0/0"]), &local)
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(nodeport_addresses(&flag(&["primary", "10.0.0.0/8"]), &local).is_err());
        assert!("primry".parse::<NodePortAddress>().is_err());
    }
}
