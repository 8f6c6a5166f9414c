//! Whether the apiserver would be reached only through a Service that
//! sluice itself serves.
//!
//! In a cluster, the kubelet gives every pod `KUBERNETES_SERVICE_HOST` and
//! `KUBERNETES_SERVICE_PORT`: the ClusterIP of the `default/kubernetes`
//! Service. kube's in-cluster config dials that address. Once sluice has
//! replaced kube-proxy, that ClusterIP is steered by sluice alone, so a
//! sluice that starts (or restarts) with an empty table can never reach the
//! apiserver to fill it: the node deadlocks. kube-proxy avoids this by being
//! given the apiserver's real address (a kubeconfig ConfigMap); sluice's
//! DaemonSet does the same with the `sluice-apiserver` ConfigMap, whose
//! `KUBERNETES_SERVICE_HOST`/`PORT` override the kubelet's values.
//!
//! The kubelet also sets `KUBERNETES_PORT=tcp://<ClusterIP>:<port>`, which
//! the ConfigMap does not override: when the host sluice dials differs from
//! it, the in-cluster variables were overridden with a real address.

/// Why the apiserver at `host:port` would be reached only through the
/// in-cluster `kubernetes` Service, or `None` when it would not. `env`
/// reads an environment variable (`std::env::var` in the daemon).
pub fn reached_through_service(
    host: &str,
    port: u16,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let fix = "give sluice the apiserver's real address: create the ConfigMap \
               `sluice-apiserver` (docs/operations.md) or pass --kubeconfig";
    if is_service_dns_name(host) {
        return Some(format!(
            "the apiserver address {host}:{port} is a Service DNS name, which needs \
             cluster DNS and the Service's ClusterIP, both served through sluice; {fix}"
        ));
    }
    let env_host = env("KUBERNETES_SERVICE_HOST")?;
    let env_port = env("KUBERNETES_SERVICE_PORT")?;
    let env_host = env_host.trim_start_matches('[').trim_end_matches(']');
    if !same_host(host, env_host) || env_port.trim().parse::<u16>().ok() != Some(port) {
        return None;
    }
    // The kubelet's own record of the Service address. When it names
    // another host, KUBERNETES_SERVICE_HOST was overridden on purpose.
    if let Some(link) = env("KUBERNETES_PORT")
        && let Some(link_host) = link_host(&link)
        && !same_host(link_host, env_host)
    {
        return None;
    }
    Some(format!(
        "the apiserver is reached only through the in-cluster `kubernetes` Service \
         address {host}:{port} (KUBERNETES_SERVICE_HOST/PORT), which sluice itself \
         serves: a restarting sluice cannot reach it; {fix}"
    ))
}

/// `kubernetes.default.svc` or `x.y.svc.cluster.local` (the default
/// cluster domain; a custom one is not recognised, rather than refusing a
/// real host name that merely contains `.svc.`).
fn is_service_dns_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.ends_with(".svc") || host.ends_with(".svc.cluster.local")
}

/// Hosts compared as IP addresses when both parse (so `::1` equals
/// `0:0::1`), else as case-insensitive names.
fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The host of a docker-link style `tcp://10.96.0.1:443`.
fn link_host(link: &str) -> Option<&str> {
    let rest = link.trim().strip_prefix("tcp://")?;
    let (host, _port) = rest.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const KUBELET: &[(&str, &str)] = &[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
        ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
    ];

    #[test]
    fn the_kubelet_service_address_is_flagged_with_the_fix() {
        let why = reached_through_service("10.96.0.1", 443, env(KUBELET)).unwrap();
        assert!(why.contains("10.96.0.1:443"), "{why}");
        assert!(why.contains("KUBERNETES_SERVICE_HOST"), "{why}");
        assert!(why.contains("sluice-apiserver"), "{why}");
    }

    #[test]
    fn only_host_and_port_set_is_the_service_address() {
        let vars = [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "6443"),
        ];
        assert!(reached_through_service("127.0.0.1", 6443, env(&vars)).is_some());
        assert!(reached_through_service("127.0.0.1", 6444, env(&vars)).is_none());
    }

    #[test]
    fn an_overridden_host_is_the_real_address() {
        // The ConfigMap replaced HOST/PORT; the kubelet's KUBERNETES_PORT
        // still names the ClusterIP.
        let vars = [
            ("KUBERNETES_SERVICE_HOST", "192.0.2.10"),
            ("KUBERNETES_SERVICE_PORT", "6443"),
            ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
        ];
        assert!(reached_through_service("192.0.2.10", 6443, env(&vars)).is_none());
    }

    #[test]
    fn a_kubeconfig_server_elsewhere_is_not_flagged() {
        assert!(reached_through_service("192.0.2.10", 6443, env(KUBELET)).is_none());
        assert!(reached_through_service("api.example.com", 443, env(KUBELET)).is_none());
        assert!(reached_through_service("10.96.0.1", 443, env(&[])).is_none());
    }

    #[test]
    fn a_kubeconfig_pointing_at_the_cluster_ip_is_flagged() {
        // A kubeconfig whose server is the ClusterIP is no better than the
        // in-cluster config.
        assert!(reached_through_service("10.96.0.1", 443, env(KUBELET)).is_some());
    }

    #[test]
    fn ipv6_hosts_compare_as_addresses() {
        let vars = [
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_PORT", "tcp://[fd00:0::1]:443"),
        ];
        assert!(reached_through_service("[fd00::1]", 443, env(&vars)).is_some());
    }

    #[test]
    fn service_dns_names_are_flagged_whatever_the_environment() {
        for host in [
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local.",
        ] {
            let why = reached_through_service(host, 443, env(&[])).unwrap();
            assert!(why.contains("DNS"), "{why}");
        }
        for host in ["svc.example.com", "api.svc.example.com"] {
            assert!(
                reached_through_service(host, 443, env(&[])).is_none(),
                "{host}"
            );
        }
    }
}
