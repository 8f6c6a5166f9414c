//! What kube-proxy left on the node: a half-migrated node made visible.
//!
//! Checked once at start (Kubernetes mode, or `--intercept nftables`):
//! - IPVS virtual servers (`/proc/net/ip_vs`, present only with the IPVS
//!   module loaded): kube-proxy's IPVS mode;
//! - the `kube-ipvs0` device, which holds every Service IP as a local
//!   address in IPVS mode;
//! - kube-proxy's `KUBE-*` chains in the iptables-nft tables (`ip`/`ip6`
//!   families): iptables and IPVS modes (kubelet's own `KUBE-FIREWALL`,
//!   `KUBE-KUBELET-CANARY` and `KUBE-IPTABLES-HINT` are not leftovers);
//! - kube-proxy's nftables tables (`ip kube-proxy`, `ip6 kube-proxy`).
//!
//! Each finding is logged with how to remove it, listed in `/healthz`'s
//! `warnings` and counted in `sluice_leftover_rules{kind}`. sluice removes
//! nothing itself: kube-proxy may still be running (a migration in
//! progress), and `kube-proxy --cleanup` is the tool that knows its rules.
//!
//! The parsers are pure and tested on text; [`detect`] reads the system
//! (procfs of the calling thread's network namespace, and `nft -j list
//! ruleset`, run from the calling thread so that it sees the same
//! namespace).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tracing::{info, warn};

/// The IPVS mode's device for Service IPs.
pub const IPVS_DEVICE: &str = "kube-ipvs0";

/// kube-proxy's nftables mode's table name (in the `ip` and `ip6` families).
pub const KUBE_PROXY_TABLE: &str = "kube-proxy";

/// `KUBE-*` chains that kubelet, not kube-proxy, creates.
const KUBELET_CHAINS: [&str; 3] = ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];

/// How long `nft -j list ruleset` may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);

/// Names listed in a finding's message, at most.
const SHOWN: usize = 5;

/// One kind of leftover, the `kind` label of `sluice_leftover_rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    IpvsVirtualServers,
    IpvsDevice,
    IptablesChains,
    NftablesTables,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::IpvsVirtualServers => "ipvs_virtual_servers",
            Kind::IpvsDevice => "kube_ipvs0",
            Kind::IptablesChains => "iptables_kube_chains",
            Kind::NftablesTables => "kube_proxy_nftables",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::IpvsVirtualServers => "IPVS virtual servers (kube-proxy IPVS mode)",
            Kind::IpvsDevice => {
                "the kube-ipvs0 device (kube-proxy IPVS mode: Service IPs as local addresses)"
            }
            Kind::IptablesChains => {
                "kube-proxy KUBE-* chains in iptables-nft tables (iptables or IPVS mode)"
            }
            Kind::NftablesTables => "kube-proxy's nftables tables (nftables mode)",
        }
    }

    /// How to remove it (docs/operations.md, "kube-proxy leftovers").
    pub fn remedy(self) -> &'static str {
        match self {
            Kind::IpvsVirtualServers => "`kube-proxy --cleanup` (or `ipvsadm --clear`)",
            Kind::IpvsDevice => "`kube-proxy --cleanup` (or `ip link del kube-ipvs0`)",
            Kind::IptablesChains => "`kube-proxy --cleanup` with kube-proxy stopped",
            Kind::NftablesTables => {
                "`kube-proxy --cleanup` (or `nft delete table ip kube-proxy; nft delete table ip6 kube-proxy`)"
            }
        }
    }
}

/// What was found of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    /// What was found, by name (`TCP 10.96.0.10:80`, `ip nat KUBE-SERVICES`).
    pub names: Vec<String>,
}

impl Finding {
    /// The warning: what, how many, the first names, how to remove it.
    pub fn message(&self) -> String {
        let mut s = format!(
            "leftover from kube-proxy: {} {}",
            self.names.len(),
            self.kind.what()
        );
        if !self.names.is_empty() {
            let shown: Vec<&str> = self.names.iter().take(SHOWN).map(String::as_str).collect();
            let _ = write!(s, ": {}", shown.join(", "));
            if self.names.len() > SHOWN {
                let _ = write!(s, ", ...");
            }
        }
        let _ = write!(
            s,
            "; remove with {} (docs/operations.md)",
            self.kind.remedy()
        );
        s
    }
}

/// Everything [`detect`] learnt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Kinds checked (found or not), with their findings (maybe empty).
    pub checked: Vec<Finding>,
    /// Kinds that could not be checked, and why (say, `nft` not installed).
    pub unchecked: Vec<(Kind, String)>,
}

impl Report {
    /// Non-empty findings.
    pub fn found(&self) -> impl Iterator<Item = &Finding> {
        self.checked.iter().filter(|f| !f.names.is_empty())
    }

    /// One warning per non-empty finding, for `/healthz`.
    pub fn warnings(&self) -> Vec<String> {
        self.found().map(Finding::message).collect()
    }
}

// ------------------------------------------------------------- the parsers

/// Virtual servers in the text of `/proc/net/ip_vs`: lines that start with
/// a protocol (`TCP  0A60000A:0050 rr`), not the real servers under them
/// (`  -> 0AF40001:1F90 Masq ...`). IPv4 addresses are printed in hex by
/// the kernel; they come back dotted (`TCP 10.96.0.10:80`).
pub fn parse_ip_vs(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let proto = words.next()?;
            if !matches!(proto, "TCP" | "UDP" | "SCTP" | "FWM") || line.starts_with(' ') {
                return None;
            }
            let addr = words.next()?;
            Some(format!("{proto} {}", ip_vs_addr(addr)))
        })
        .collect()
}

/// `0A60000A:0050` → `10.96.0.10:80`; anything else (IPv6 in brackets, a
/// firewall mark) as printed.
fn ip_vs_addr(word: &str) -> String {
    let Some((ip, port)) = word.split_once(':') else {
        return word.to_string();
    };
    match (
        ip.len(),
        port.len(),
        u32::from_str_radix(ip, 16),
        u16::from_str_radix(port, 16),
    ) {
        (8, 4, Ok(ip), Ok(port)) => format!("{}:{port}", Ipv4Addr::from(ip)),
        _ => word.to_string(),
    }
}

/// Whether device `name` is listed in the text of `/proc/net/dev`.
pub fn has_device(proc_net_dev: &str, name: &str) -> bool {
    proc_net_dev
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(dev, _)| dev.trim() == name)
}

/// kube-proxy's objects in the JSON of `nft -j list ruleset`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftLeftovers {
    /// `family table chain` of kube-proxy's `KUBE-*` chains (iptables-nft).
    pub kube_chains: Vec<String>,
    /// `family kube-proxy` tables.
    pub kube_proxy_tables: Vec<String>,
}

/// Reads `nft -j list ruleset` output. An error names what was wrong.
pub fn parse_ruleset(json: &str) -> Result<NftLeftovers, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("`nft -j` output is not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("`nft -j` output has no \"nftables\" array")?;
    let mut out = NftLeftovers::default();
    let str_of = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    for item in items {
        if let Some(t) = item.get("table") {
            let (Some(family), Some(name)) = (str_of(t, "family"), str_of(t, "name")) else {
                continue;
            };
            if name == KUBE_PROXY_TABLE && matches!(family.as_str(), "ip" | "ip6") {
                out.kube_proxy_tables.push(format!("{family} {name}"));
            }
        } else if let Some(c) = item.get("chain") {
            let (Some(family), Some(table), Some(name)) =
                (str_of(c, "family"), str_of(c, "table"), str_of(c, "name"))
            else {
                continue;
            };
            // iptables-nft puts its tables in the ip and ip6 families.
            if matches!(family.as_str(), "ip" | "ip6")
                && table != KUBE_PROXY_TABLE
                && name.starts_with("KUBE-")
                && !KUBELET_CHAINS.contains(&name.as_str())
            {
                out.kube_chains.push(format!("{family} {table} {name}"));
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------ reading the system

/// Checks the calling thread's network namespace.
pub async fn detect() -> Report {
    let mut report = Report::default();
    // Absent without the IPVS module: then there is no virtual server.
    let ipvs = match std::fs::read_to_string("/proc/thread-self/net/ip_vs") {
        Ok(text) => Ok(parse_ip_vs(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("reading /proc/net/ip_vs: {e}")),
    };
    push(&mut report, Kind::IpvsVirtualServers, ipvs);
    let device = std::fs::read_to_string("/proc/thread-self/net/dev")
        .map(|text| {
            if has_device(&text, IPVS_DEVICE) {
                vec![IPVS_DEVICE.to_string()]
            } else {
                Vec::new()
            }
        })
        .map_err(|e| format!("reading /proc/net/dev: {e}"));
    push(&mut report, Kind::IpvsDevice, device);
    match list_ruleset().await.and_then(|json| parse_ruleset(&json)) {
        Ok(nft) => {
            push(&mut report, Kind::IptablesChains, Ok(nft.kube_chains));
            push(&mut report, Kind::NftablesTables, Ok(nft.kube_proxy_tables));
        }
        Err(e) => {
            push(&mut report, Kind::IptablesChains, Err(e.clone()));
            push(&mut report, Kind::NftablesTables, Err(e));
        }
    }
    report
}

fn push(report: &mut Report, kind: Kind, names: Result<Vec<String>, String>) {
    match names {
        Ok(names) => report.checked.push(Finding { kind, names }),
        Err(e) => report.unchecked.push((kind, e)),
    }
}

async fn list_ruleset() -> Result<String, String> {
    let args = ["-j", "list", "ruleset"];
    let out = crate::nft::run("nft", &args, None, NFT_TIMEOUT)
        .await
        .map_err(|e| format!("`nft -j list ruleset`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`nft -j list ruleset` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| "`nft -j list ruleset`: not UTF-8".to_string())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// `sluice_leftover_rules{kind}`: what was found of each kind checked (0
/// when none); a kind that could not be checked has no series.
pub fn register(report: &Report, registry: &mut Registry) {
    let family = Family::<KindLabels, Gauge>::default();
    for f in &report.checked {
        family
            .get_or_create(&KindLabels {
                kind: f.kind.as_str(),
            })
            .set(f.names.len() as i64);
    }
    registry.register(
        "leftover_rules",
        "kube-proxy leftovers found on the node at start, per kind (see docs/operations.md)",
        family,
    );
}

/// At start: detects, logs each finding with its remedy, registers the
/// metric, and returns the warnings for `/healthz`.
pub async fn check_at_start(registry: &mut Registry) -> Vec<String> {
    let report = detect().await;
    for f in report.found() {
        warn!(
            kind = f.kind.as_str(),
            count = f.names.len(),
            "{}",
            f.message()
        );
    }
    for (kind, why) in &report.unchecked {
        info!(
            kind = kind.as_str(),
            "cannot check for kube-proxy leftovers: {why}"
        );
    }
    register(&report, registry);
    report.warnings()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP_VS: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60000A:0050 rr
  -> 0AF40014:1F90      Masq    1      0          0
  -> 0AF40015:1F90      Masq    1      0          0
UDP  0A60000A:0035 rr
TCP  [fd00:0096:0000:0000:0000:0000:0000:0010]:0050 rr
FWM  00000001 rr
";

    #[test]
    fn ip_vs_lists_virtual_servers_not_real_servers() {
        assert_eq!(
            parse_ip_vs(IP_VS),
            vec![
                "TCP 10.96.0.10:80",
                "UDP 10.96.0.10:53",
                "TCP [fd00:0096:0000:0000:0000:0000:0000:0010]:0050",
                "FWM 00000001",
            ]
        );
    }

    #[test]
    fn an_empty_ip_vs_table_has_no_virtual_server() {
        let header = IP_VS.lines().take(3).collect::<Vec<_>>().join("\n");
        assert!(parse_ip_vs(&header).is_empty());
        assert!(parse_ip_vs("").is_empty());
    }

    #[test]
    fn devices_are_matched_by_whole_name() {
        let dev = "Inter-|   Receive
 face |bytes    packets
    lo:       0       0
kube-ipvs0:       0       0
  eth0: 1 2
";
        assert!(has_device(dev, "kube-ipvs0"));
        assert!(has_device(dev, "eth0"));
        assert!(!has_device(dev, "kube-ipvs"));
        assert!(!has_device(
            &dev.replace("kube-ipvs0", "sluice0"),
            IPVS_DEVICE
        ));
    }

    #[test]
    fn ruleset_finds_kube_proxy_chains_and_tables_not_kubelets_or_others() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "services", "handle": 1}},
            {"table": {"family": "ip6", "name": "kube-proxy", "handle": 2}},
            {"table": {"family": "inet", "name": "kube-proxy", "handle": 5}},
            {"table": {"family": "ip", "name": "nat", "handle": 3}},
            {"chain": {"family": "ip", "table": "nat", "name": "KUBE-SERVICES", "handle": 1}},
            {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING", "handle": 2, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"chain": {"family": "ip", "table": "nat", "name": "KUBE-KUBELET-CANARY", "handle": 3}},
            {"chain": {"family": "ip6", "table": "filter", "name": "KUBE-FIREWALL", "handle": 3}},
            {"chain": {"family": "ip6", "table": "filter", "name": "KUBE-PROXY-FIREWALL", "handle": 4}},
            {"chain": {"family": "ip", "table": "mangle", "name": "KUBE-IPTABLES-HINT", "handle": 1}},
            {"chain": {"family": "inet", "table": "sluice", "name": "KUBE-LIKE", "handle": 1}},
            {"rule": {"family": "ip", "table": "nat", "chain": "KUBE-SERVICES", "handle": 4, "expr": []}}
        ]}"#;
        let got = parse_ruleset(json).unwrap();
        assert_eq!(
            got.kube_chains,
            vec!["ip nat KUBE-SERVICES", "ip6 filter KUBE-PROXY-FIREWALL"]
        );
        assert_eq!(
            got.kube_proxy_tables,
            vec!["ip kube-proxy", "ip6 kube-proxy"]
        );
    }

    #[test]
    fn an_empty_ruleset_has_no_leftover() {
        let json =
            r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}"#;
        assert_eq!(parse_ruleset(json).unwrap(), NftLeftovers::default());
    }

    #[test]
    fn bad_nft_output_is_an_error_naming_it() {
        let e = parse_ruleset("nft: command not found").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let e = parse_ruleset(r#"{"other": []}"#).unwrap_err();
        assert!(e.contains("\"nftables\""), "{e}");
    }

    #[test]
    fn a_warning_names_what_how_many_and_the_remedy() {
        let f = Finding {
            kind: Kind::IptablesChains,
            names: (0..7).map(|i| format!("ip nat KUBE-SVC-{i}")).collect(),
        };
        let m = f.message();
        assert!(
            m.starts_with("leftover from kube-proxy: 7 kube-proxy KUBE-* chains"),
            "{m}"
        );
        assert!(m.contains("KUBE-SVC-4, ...;"), "{m}");
        assert!(!m.contains("KUBE-SVC-5"), "{m}");
        assert!(m.contains("kube-proxy --cleanup"), "{m}");
        let report = Report {
            checked: vec![
                f,
                Finding {
                    kind: Kind::IpvsDevice,
                    names: vec![],
                },
            ],
            unchecked: vec![],
        };
        assert_eq!(report.warnings().len(), 1);
    }

    #[test]
    fn the_metric_has_one_series_per_checked_kind() {
        let report = Report {
            checked: vec![
                Finding {
                    kind: Kind::IpvsDevice,
                    names: vec![IPVS_DEVICE.into()],
                },
                Finding {
                    kind: Kind::IpvsVirtualServers,
                    names: vec![],
                },
            ],
            unchecked: vec![(Kind::NftablesTables, "no nft".into())],
        };
        let mut registry = Registry::default();
        register(&report, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("leftover_rules{kind=\"kube_ipvs0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("leftover_rules{kind=\"ipvs_virtual_servers\"} 0"),
            "{text}"
        );
        assert!(!text.contains("kube_proxy_nftables"), "{text}");
    }
}
