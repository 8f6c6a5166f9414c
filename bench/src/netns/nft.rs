//! The kernel path: nftables DNAT rules shaped like kube-proxy's nftables
//! mode, replaced atomically as a whole table.
//!
//! kube-proxy (nftables mode) has, in `table ip kube-proxy`: a
//! `services` chain matching `ip daddr . meta l4proto . th dport` against
//! the `service-ips` verdict map; one chain per service port whose rule is
//! `numgen random mod N vmap { 0 : goto endpoint-…, … }`; one chain per
//! endpoint doing `dnat to IP:PORT`. Only ready endpoints are listed (a
//! terminating one only when none is ready). This module writes the same
//! shape (without the masquerade and filter chains the scenario does not
//! need) as one `nft -f` transaction that deletes and recreates the table,
//! so a packet sees either the old or the new rules.

use std::fmt::Write as _;
use std::net::SocketAddrV4;

use anyhow::Result;

pub const TABLE: &str = "kube-proxy";

fn chain_id(a: &SocketAddrV4) -> String {
    format!("{}-{}", a.ip().to_string().replace('.', "-"), a.port())
}

/// The whole table for one TCP service at `vip` with `endpoints` (the
/// ready ones). Fails on an empty list: the scenario always has one.
pub fn ruleset(service: &str, vip: SocketAddrV4, endpoints: &[SocketAddrV4]) -> Result<String> {
    ruleset_proto(service, "tcp", vip, endpoints)
}

/// [`ruleset`] for `proto` (`tcp` or `udp`): kube-proxy writes the same
/// chains for a UDP service port, with `udp` in the map key, the port
/// match and the DNAT rule.
pub fn ruleset_proto(
    service: &str,
    proto: &str,
    vip: SocketAddrV4,
    endpoints: &[SocketAddrV4],
) -> Result<String> {
    ruleset_services(&[(service, proto, vip, endpoints)])
}

/// The whole table for several service ports, each `(name, proto, vip,
/// ready endpoints)`: one `service-ips` element and one service chain per
/// service port, one endpoint chain per distinct endpoint.
pub fn ruleset_services(
    services: &[(&str, &str, SocketAddrV4, &[SocketAddrV4])],
) -> Result<String> {
    for (service, proto, _, endpoints) in services {
        anyhow::ensure!(
            *proto == "tcp" || *proto == "udp",
            "service {service}: protocol {proto:?} is not tcp or udp"
        );
        anyhow::ensure!(
            !endpoints.is_empty(),
            "service {service}: no endpoint to DNAT to"
        );
    }
    let svc_chain = |service: &str, proto: &str, vip: &SocketAddrV4| {
        format!("service-{service}-{proto}-{}", vip.port())
    };
    let mut s = String::new();
    // Declaring the table first makes the delete valid when it is absent;
    // the whole file is one transaction.
    let _ = writeln!(s, "table ip {TABLE}");
    let _ = writeln!(s, "delete table ip {TABLE}");
    let _ = writeln!(s, "table ip {TABLE} {{");
    let _ = writeln!(s, "  map service-ips {{");
    let _ = writeln!(
        s,
        "    type ipv4_addr . inet_proto . inet_service : verdict"
    );
    let elements: Vec<String> = services
        .iter()
        .map(|(service, proto, vip, _)| {
            format!(
                "{} . {proto} . {} : goto {}",
                vip.ip(),
                vip.port(),
                svc_chain(service, proto, vip)
            )
        })
        .collect();
    let _ = writeln!(s, "    elements = {{ {} }}", elements.join(", "));
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain nat-prerouting {{");
    let _ = writeln!(
        s,
        "    type nat hook prerouting priority dstnat; policy accept;"
    );
    let _ = writeln!(s, "    jump services");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain nat-output {{");
    let _ = writeln!(s, "    type nat hook output priority -100; policy accept;");
    let _ = writeln!(s, "    jump services");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain services {{");
    let _ = writeln!(
        s,
        "    ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(s, "  }}");
    let mut endpoint_chains: Vec<(&str, SocketAddrV4)> = Vec::new();
    for (service, proto, vip, endpoints) in services {
        let arms: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(k, e)| format!("{k} : goto endpoint-{}", chain_id(e)))
            .collect();
        let _ = writeln!(s, "  chain {} {{", svc_chain(service, proto, vip));
        let _ = writeln!(
            s,
            "    ip daddr {} {proto} dport {} numgen random mod {} vmap {{ {} }}",
            vip.ip(),
            vip.port(),
            endpoints.len(),
            arms.join(", ")
        );
        let _ = writeln!(s, "  }}");
        for e in endpoints.iter() {
            if !endpoint_chains.contains(&(*proto, *e)) {
                endpoint_chains.push((*proto, *e));
            }
        }
    }
    for (proto, e) in endpoint_chains {
        let _ = writeln!(s, "  chain endpoint-{} {{", chain_id(&e));
        let _ = writeln!(s, "    meta l4proto {proto} dnat to {e}");
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    Ok(s)
}

/// Replaces the table inside namespace `ns` (`ip netns exec NS nft -f -`).
pub fn apply(ns: &str, rules: &str) -> Result<()> {
    super::topo::run("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_has_kube_proxys_shape() {
        let vip: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        let eps: Vec<SocketAddrV4> = vec![
            "10.244.0.10:8080".parse().unwrap(),
            "10.244.0.11:8080".parse().unwrap(),
        ];
        let r = ruleset("web", vip, &eps).unwrap();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "table ip kube-proxy");
        assert_eq!(lines[1], "delete table ip kube-proxy");
        assert!(r.contains("10.96.0.10 . tcp . 80 : goto service-web-tcp-80"));
        assert!(r.contains("type nat hook prerouting priority dstnat"));
        assert!(r.contains(
            "numgen random mod 2 vmap { 0 : goto endpoint-10-244-0-10-8080, 1 : goto endpoint-10-244-0-11-8080 }"
        ));
        assert!(r.contains("chain endpoint-10-244-0-11-8080 {"));
        assert!(r.contains("meta l4proto tcp dnat to 10.244.0.11:8080"));
        assert_eq!(r.matches("dnat to").count(), 2);
        // Balanced braces: nft would reject the file otherwise.
        assert_eq!(r.matches('{').count(), r.matches('}').count());
        assert!(ruleset("web", vip, &[]).is_err());
        let u = ruleset_proto("dns", "udp", "10.96.0.10:53".parse().unwrap(), &eps).unwrap();
        assert!(u.contains("10.96.0.10 . udp . 53 : goto service-dns-udp-53"));
        assert!(u.contains("ip daddr 10.96.0.10 udp dport 53 numgen random mod 2"));
        assert!(u.contains("meta l4proto udp dnat to 10.244.0.10:8080"));
        assert!(!u.contains("tcp"));
        assert!(ruleset_proto("dns", "sctp", vip, &eps).is_err());
        // Two service ports in one table, one endpoint chain each.
        let vip2: SocketAddrV4 = "10.96.0.11:443".parse().unwrap();
        let two = ruleset_services(&[
            ("web", "tcp", vip, &eps[..1]),
            ("tls", "tcp", vip2, &eps[1..]),
        ])
        .unwrap();
        assert!(two.contains(
            "elements = { 10.96.0.10 . tcp . 80 : goto service-web-tcp-80, 10.96.0.11 . tcp . 443 : goto service-tls-tcp-443 }"
        ));
        assert!(two.contains("numgen random mod 1 vmap { 0 : goto endpoint-10-244-0-11-8080 }"));
        assert_eq!(two.matches("dnat to").count(), 2);
        assert_eq!(two.matches('{').count(), two.matches('}').count());
    }
}
