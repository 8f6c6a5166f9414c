//! Pure tests of the index: one per rule of kube-proxy's semantics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus,
    Service as K8sService, ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::convert::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, TRIGGER_TIME_ANNOTATION};
use super::*;
use crate::table::{Conditions, ListenKey, Service, Table};

const NODE: &str = "node-a";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> ListenKey {
    ListenKey::tcp(sa(s))
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A ClusterIP Service `ns/name` on `cluster_ip` with TCP ports `(name, port)`.
fn mk_service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32)]) -> K8sService {
    K8sService {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// NodePort Service `default/np`: 10.96.0.30:80, node port 31000.
fn mk_node_port_service() -> K8sService {
    let mut svc = mk_service("default", "np", "10.96.0.30", &[("", 80)]);
    spec(&mut svc).type_ = Some("NodePort".into());
    spec(&mut svc).ports.as_mut().unwrap()[0].node_port = Some(31000);
    svc
}

/// LoadBalancer Service `d/lb` on `cluster_ip`, port `web` 80, with
/// `externalTrafficPolicy: Local` and `healthCheckNodePort` `health_port`.
fn mk_lb_local_service(cluster_ip: &str, health_port: i32) -> K8sService {
    let mut svc = mk_service("d", "lb", cluster_ip, &[("web", 80)]);
    let s = spec(&mut svc);
    s.type_ = Some("LoadBalancer".into());
    s.external_traffic_policy = Some("Local".into());
    s.health_check_node_port = Some(health_port);
    svc
}

fn spec(svc: &mut K8sService) -> &mut ServiceSpec {
    svc.spec.as_mut().unwrap()
}

/// An IPv4 endpoint with no conditions (all defaults: ready).
fn ep(ip: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        ..Default::default()
    }
}

fn ep_cond(
    ip: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Endpoint {
    Endpoint {
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        ..ep(ip)
    }
}

fn ep_on(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        node_name: Some(node.into()),
        ..ep(ip)
    }
}

fn ep_zones(ip: &str, zones: &[&str]) -> Endpoint {
    Endpoint {
        hints: Some(EndpointHints {
            for_zones: Some(
                zones
                    .iter()
                    .map(|z| ForZone {
                        name: z.to_string(),
                    })
                    .collect(),
            ),
            for_nodes: None,
        }),
        ..ep(ip)
    }
}

/// An EndpointSlice `ns/name` of Service `svc`, with TCP ports
/// `(name, target)` and `eps`.
fn mk_slice(
    ns: &str,
    name: &str,
    svc: &str,
    address_type: &str,
    ports: &[(&str, i32)],
    eps: Vec<Endpoint>,
) -> EndpointSlice {
    let mut m = meta(ns, name);
    m.labels = Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), svc.into())]));
    EndpointSlice {
        metadata: m,
        address_type: address_type.into(),
        endpoints: Some(eps),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: (!n.is_empty()).then(|| n.to_string()),
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                })
                .collect(),
        ),
    }
}

fn mk_node(name: &str, zone: Option<&str>, addrs: &[(&str, &str)]) -> Node {
    let mut m = ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    if let Some(z) = zone {
        m.labels = Some(BTreeMap::from([(
            "topology.kubernetes.io/zone".into(),
            z.into(),
        )]));
    }
    Node {
        metadata: m,
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

fn index() -> Index {
    Index::new(Some(NODE.into()), vec![])
}

fn built(idx: &mut Index) -> Table {
    idx.build();
    idx.table().clone()
}

fn svc_at(t: &Table, k: &str) -> Arc<Service> {
    t.get(&key(k))
        .unwrap_or_else(|| panic!("no entry for {k}; keys: {:?}", t.keys().collect::<Vec<_>>()))
        .clone()
}

fn all(s: &Service) -> Vec<SocketAddr> {
    let mut v: Vec<_> = s.backends().iter().map(|b| b.addr).collect();
    v.sort();
    v
}

fn eligible(s: &Service) -> Vec<SocketAddr> {
    let mut v: Vec<_> = s.eligible_iter().map(|b| b.addr).collect();
    v.sort();
    v
}

/// Every listen address of a table, as text, sorted.
fn listen_addrs(t: &Table) -> Vec<String> {
    let mut keys: Vec<String> = t.keys().map(|k| k.addr.to_string()).collect();
    keys.sort();
    keys
}

/// A Service status with load-balancer ingress `ips`.
fn lb_status(ips: &[&str]) -> Option<ServiceStatus> {
    let ingress = ips.iter().map(|ip| LoadBalancerIngress {
        ip: Some(ip.to_string()),
        ..Default::default()
    });
    Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(ingress.collect()),
        }),
        conditions: None,
    })
}

fn addrs(v: &[&str]) -> Vec<SocketAddr> {
    let mut v: Vec<_> = v.iter().map(|s| sa(s)).collect();
    v.sort();
    v
}

/// The common case: web on 10.96.0.10, ports http 80 -> 8080.
fn web_index() -> Index {
    let mut idx = index();
    idx.apply(&mk_service("default", "web", "10.96.0.10", &[("http", 80)]))
        .unwrap();
    idx.apply(&mk_slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.1"), ep("10.0.0.2")],
    ))
    .unwrap();
    idx
}

#[test]
fn service_and_slice_make_an_entry_named_after_the_port() {
    let mut idx = web_index();
    let t = built(&mut idx);
    assert_eq!(t.len(), 1);
    let s = svc_at(&t, "10.96.0.10:80");
    assert_eq!(s.name, "default/web:http");
    assert_eq!(eligible(&s), addrs(&["10.0.0.1:8080", "10.0.0.2:8080"]));
    assert_eq!(s.affinity, None);
}

#[test]
fn unnamed_port_is_named_by_number() {
    let mut idx = index();
    idx.apply(&mk_service("ns", "db", "10.96.0.11", &[("", 5432)]))
        .unwrap();
    idx.apply(&mk_slice(
        "ns",
        "db-x",
        "db",
        "IPv4",
        &[("", 5433)],
        vec![ep("10.0.1.1")],
    ))
    .unwrap();
    let t = built(&mut idx);
    let s = svc_at(&t, "10.96.0.11:5432");
    assert_eq!(s.name, "ns/db:5432");
    assert_eq!(eligible(&s), addrs(&["10.0.1.1:5433"]));
}

#[test]
fn slices_merge_and_duplicates_are_kept_once() {
    let mut idx = web_index();
    idx.apply(&mk_slice(
        "default",
        "web-2",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.2"), ep("10.0.0.3")],
    ))
    .unwrap();
    let t = built(&mut idx);
    let s = svc_at(&t, "10.96.0.10:80");
    assert_eq!(
        all(&s),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
    );
    // Deleting one slice keeps the other's endpoints.
    idx.delete::<EndpointSlice>(&ObjectRef::new("default", "web-1"));
    let t = built(&mut idx);
    assert_eq!(
        all(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.2:8080", "10.0.0.3:8080"])
    );
}

#[test]
fn named_port_resolves_per_slice() {
    let mut idx = web_index();
    idx.apply(&mk_slice(
        "default",
        "web-2",
        "web",
        "IPv4",
        &[("http", 9090), ("metrics", 9100)],
        vec![ep("10.0.0.9")],
    ))
    .unwrap();
    // A slice without the port contributes nothing to it.
    idx.apply(&mk_slice(
        "default",
        "web-3",
        "web",
        "IPv4",
        &[("metrics", 9100)],
        vec![ep("10.0.0.7")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        all(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.9:9090"])
    );
}

#[test]
fn conditions_default_as_the_api_says() {
    let mut idx = index();
    idx.apply(&mk_service("d", "s", "10.96.0.1", &[("", 80)]))
        .unwrap();
    idx.apply(&mk_slice(
        "d",
        "s-1",
        "s",
        "IPv4",
        &[("", 80)],
        vec![
            ep("10.0.0.1"),                               // nothing set
            ep_cond("10.0.0.2", Some(false), None, None), // serving follows ready
            ep_cond("10.0.0.3", None, None, Some(true)),  // ready unset = true
            ep_cond("10.0.0.4", Some(false), Some(true), Some(true)),
        ],
    ))
    .unwrap();
    let t = built(&mut idx);
    let s = svc_at(&t, "10.96.0.1:80");
    let cond = |a: &str| {
        s.backends()
            .iter()
            .find(|b| b.addr == sa(a))
            .unwrap()
            .conditions
    };
    assert_eq!(cond("10.0.0.1:80"), Conditions::READY);
    assert_eq!(
        cond("10.0.0.2:80"),
        Conditions {
            ready: false,
            serving: false,
            terminating: false
        }
    );
    assert_eq!(
        cond("10.0.0.3:80"),
        Conditions {
            ready: true,
            serving: true,
            terminating: true
        }
    );
    assert_eq!(cond("10.0.0.4:80"), Conditions::TERMINATING);
    assert_eq!(eligible(&s), addrs(&["10.0.0.1:80"]));
}

#[test]
fn terminating_serving_endpoints_only_when_none_ready() {
    let mut idx = web_index();
    let rolling = |eps| mk_slice("default", "web-1", "web", "IPv4", &[("http", 8080)], eps);
    idx.apply(&rolling(vec![
        ep_cond("10.0.0.1", Some(false), Some(true), Some(true)),
        ep("10.0.0.2"),
    ]))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.2:8080"])
    );
    // Both terminating: the serving one takes new connections.
    idx.apply(&rolling(vec![
        ep_cond("10.0.0.1", Some(false), Some(true), Some(true)),
        ep_cond("10.0.0.2", Some(false), Some(false), Some(true)),
    ]))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.1:8080"])
    );
    // None serving: nothing.
    idx.apply(&rolling(vec![ep_cond(
        "10.0.0.1",
        Some(false),
        Some(false),
        Some(true),
    )]))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.10:80").eligible_len(), 0);
}

#[test]
fn udp_ports_are_served_and_sctp_skipped_and_counted() {
    let mut idx = index();
    let mut svc = mk_service(
        "kube-system",
        "dns",
        "10.96.0.53",
        &[("dns-tcp", 53), ("dns", 53)],
    );
    spec(&mut svc).ports.as_mut().unwrap()[1].protocol = Some("UDP".into());
    let mut sctp = ServicePort {
        name: Some("sctp".into()),
        port: 9999,
        protocol: Some("SCTP".into()),
        ..Default::default()
    };
    sctp.node_port = None;
    spec(&mut svc).ports.as_mut().unwrap().push(sctp);
    idx.apply(&svc).unwrap();
    let mut slice = mk_slice(
        "kube-system",
        "dns-1",
        "dns",
        "IPv4",
        &[("dns-tcp", 53), ("dns", 53)],
        vec![ep("10.0.5.5")],
    );
    slice.ports.as_mut().unwrap()[1].protocol = Some("UDP".into());
    idx.apply(&slice).unwrap();
    let t = built(&mut idx);
    assert_eq!(t.len(), 2, "TCP 53 and UDP 53 are served, SCTP is not");
    assert_eq!(svc_at(&t, "10.96.0.53:53").name, "kube-system/dns:dns-tcp");
    let udp = t.get(&ListenKey::udp(sa("10.96.0.53:53"))).unwrap();
    assert_eq!(udp.name, "kube-system/dns:dns");
    assert_eq!(udp.backends()[0].addr, sa("10.0.5.5:53"));
    assert_eq!(idx.stats().skipped_ports, 1);
    // Re-applying the same Service does not count again.
    idx.apply(&svc).unwrap();
    assert_eq!(idx.stats().skipped_ports, 1);
}

#[test]
fn udp_timeout_annotation() {
    use super::convert::UDP_TIMEOUT_ANNOTATION;
    let mut idx = index();
    let mut svc = mk_service("kube-system", "dns", "10.96.0.53", &[("dns", 53)]);
    spec(&mut svc).ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    svc.metadata.annotations = Some([(UDP_TIMEOUT_ANNOTATION.to_owned(), "2m".to_owned())].into());
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    let udp = t.get(&ListenKey::udp(sa("10.96.0.53:53"))).unwrap();
    assert_eq!(udp.settings.udp_timeout, Some(Duration::from_secs(120)));
    // A bad value is skipped (the default applies), the Service still served.
    for bad in ["0", "5x", "", "-1", "86401"] {
        svc.metadata.annotations =
            Some([(UDP_TIMEOUT_ANNOTATION.to_owned(), bad.to_owned())].into());
        idx.apply(&svc).unwrap();
        let t = built(&mut idx);
        let udp = t.get(&ListenKey::udp(sa("10.96.0.53:53"))).unwrap();
        assert_eq!(udp.settings.udp_timeout, None, "{bad:?}");
    }
}

#[test]
fn udp_resend_annotation() {
    use super::convert::UDP_RESEND_ANNOTATION;
    let mut idx = index();
    let mut svc = mk_service("kube-system", "dns", "10.96.0.53", &[("dns", 53)]);
    spec(&mut svc).ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    let key = ListenKey::udp(sa("10.96.0.53:53"));
    idx.apply(&svc).unwrap();
    assert_eq!(built(&mut idx).get(&key).unwrap().settings.udp_resend, None);
    for (value, want) in [("true", Some(true)), ("false", Some(false)), ("yes", None)] {
        svc.metadata.annotations =
            Some([(UDP_RESEND_ANNOTATION.to_owned(), value.to_owned())].into());
        idx.apply(&svc).unwrap();
        let t = built(&mut idx);
        assert_eq!(t.get(&key).unwrap().settings.udp_resend, want, "{value:?}");
    }
}

#[test]
fn external_lb_and_node_port_addresses() {
    let mut idx = Index::new(Some(NODE.into()), vec![]);
    idx.apply(&mk_node(
        NODE,
        None,
        &[
            ("InternalIP", "192.0.2.10"),
            ("Hostname", "node-a"),
            ("ExternalIP", "198.51.100.10"),
        ],
    ))
    .unwrap();
    let mut svc = mk_service("default", "web", "10.96.0.10", &[("http", 80)]);
    {
        let s = spec(&mut svc);
        s.type_ = Some("LoadBalancer".into());
        s.external_ips = Some(vec!["203.0.113.7".into()]);
        s.ports.as_mut().unwrap()[0].node_port = Some(30080);
    }
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![
                LoadBalancerIngress {
                    ip: Some("203.0.113.8".into()),
                    ip_mode: Some("VIP".into()),
                    ..Default::default()
                },
                LoadBalancerIngress {
                    ip: Some("203.0.113.9".into()),
                    ip_mode: Some("Proxy".into()),
                    ..Default::default()
                },
                LoadBalancerIngress {
                    hostname: Some("lb.example".into()),
                    ..Default::default()
                },
            ]),
        }),
        conditions: None,
    });
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.1")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        listen_addrs(&t),
        vec![
            "10.96.0.10:80",
            "192.0.2.10:30080",
            "198.51.100.10:30080",
            "203.0.113.7:80",
            "203.0.113.8:80"
        ]
    );
    for (_, s) in t.iter() {
        assert_eq!(eligible(s), addrs(&["10.0.0.1:8080"]));
    }

    // Operator-given node addresses win over the Node's.
    let mut idx2 = Index::new(Some(NODE.into()), vec!["127.0.0.1".parse().unwrap()]);
    idx2.apply(&mk_node(NODE, None, &[("InternalIP", "192.0.2.10")]))
        .unwrap();
    idx2.apply(&svc).unwrap();
    let t2 = built(&mut idx2);
    assert!(t2.get(&key("127.0.0.1:30080")).is_some());
    assert!(t2.get(&key("192.0.2.10:30080")).is_none());

    // A ClusterIP Service with a stray nodePort gets no node port.
    let mut plain = mk_service("default", "plain", "10.96.0.20", &[("http", 80)]);
    spec(&mut plain).ports.as_mut().unwrap()[0].node_port = Some(30081);
    idx.apply(&plain).unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("192.0.2.10:30081")).is_none());
    assert!(t.get(&key("10.96.0.20:80")).is_some());
}

#[test]
fn node_address_change_moves_node_ports() {
    let mut idx = index();
    idx.apply(&mk_node_port_service()).unwrap();
    let t = built(&mut idx);
    assert_eq!(t.len(), 1, "no node address known yet");
    idx.apply(&mk_node(NODE, None, &[("InternalIP", "192.0.2.10")]))
        .unwrap();
    // Another node's object is ignored.
    idx.apply(&mk_node("node-b", None, &[("InternalIP", "192.0.2.11")]))
        .unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("192.0.2.10:31000")).is_some());
    assert!(t.get(&key("192.0.2.11:31000")).is_none());
    idx.apply(&mk_node(NODE, None, &[("InternalIP", "192.0.2.12")]))
        .unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("192.0.2.10:31000")).is_none());
    assert!(t.get(&key("192.0.2.12:31000")).is_some());
}

#[test]
fn node_deleted_or_missing_from_a_relist_keeps_its_addresses() {
    let mut idx = index();
    idx.apply(&mk_node_port_service()).unwrap();
    let ours = mk_node(NODE, None, &[("InternalIP", "192.0.2.10")]);
    let other = mk_node("node-b", None, &[("InternalIP", "192.0.2.11")]);
    assert!(idx.reset([&other, &ours], &[]).is_empty());
    let node_port = |idx: &mut Index| built(idx).get(&key("192.0.2.10:31000")).is_some();
    assert!(node_port(&mut idx));
    // Relisted but undecodable: the previous version stays.
    idx.reset::<Node>([], &[NODE.to_owned()]);
    assert!(!idx.is_dirty());
    // Deleted while the watch was down: the relist without it removes the
    // Node, but node ports stay on its last known addresses (kube-proxy
    // keeps the addresses it found at start-up).
    idx.reset([&other], &[]);
    assert!(node_port(&mut idx));
    assert_eq!(idx.table().len(), 2, "the cluster IP and the node port");
    // Deleted: the same.
    idx.apply(&ours).unwrap();
    idx.delete::<Node>(&NODE.to_owned());
    assert!(node_port(&mut idx));
    // Back with another address: the node port moves.
    idx.apply(&mk_node(NODE, None, &[("InternalIP", "192.0.2.12")]))
        .unwrap();
    assert!(!node_port(&mut idx));
    assert!(idx.table().get(&key("192.0.2.12:31000")).is_some());
}

#[test]
fn node_eligibility_follows_deletion_and_the_autoscaler_taint() {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let mut idx = index();
    assert!(idx.node_eligible(), "never seen: eligible");
    let ours = mk_node(NODE, None, &[("InternalIP", "192.0.2.10")]);
    idx.apply(&ours).unwrap();
    assert!(idx.node_eligible());
    let mut tainted = ours.clone();
    tainted.spec = Some(NodeSpec {
        taints: Some(vec![Taint {
            key: "ToBeDeletedByClusterAutoscaler".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    idx.apply(&tainted).unwrap();
    assert!(!idx.node_eligible(), "autoscaler taint");
    idx.apply(&ours).unwrap();
    assert!(idx.node_eligible(), "taint removed");
    let mut deleting = ours.clone();
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    idx.apply(&deleting).unwrap();
    assert!(!idx.node_eligible(), "deletion timestamp");
    idx.apply(&ours).unwrap();
    idx.delete::<Node>(&NODE.to_owned());
    assert!(!idx.node_eligible(), "deleted");
    // Another node's taint is not ours.
    let mut idx = index();
    let mut other = tainted.clone();
    other.metadata.name = Some("node-b".into());
    idx.apply(&other).unwrap();
    assert!(idx.node_eligible());
}

#[test]
fn deleted_node_keeps_addresses_but_not_its_zone() {
    let mut idx = index();
    idx.apply(&mk_node(NODE, Some("z1"), &[("InternalIP", "192.0.2.10")]))
        .unwrap();
    let mut svc = mk_node_port_service();
    spec(&mut svc).traffic_distribution = Some("PreferClose".into());
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "default",
        "np-1",
        "np",
        "IPv4",
        &[("", 80)],
        vec![ep_zones("10.0.0.1", &["z1"]), ep_zones("10.0.0.2", &["z2"])],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.30:80").eligible_len(), 1);
    idx.delete::<Node>(&NODE.to_owned());
    let t = built(&mut idx);
    assert_eq!(
        svc_at(&t, "10.96.0.30:80").eligible_len(),
        2,
        "no zone known: hints unused, as kube-proxy"
    );
    assert_eq!(svc_at(&t, "192.0.2.10:31000").eligible_len(), 2);
}

#[test]
fn headless_external_name_and_other_proxies_are_skipped() {
    let mut idx = index();
    idx.apply(&mk_service("d", "headless", "None", &[("", 80)]))
        .unwrap();
    let mut en = mk_service("d", "ext", "", &[("", 80)]);
    spec(&mut en).type_ = Some("ExternalName".into());
    spec(&mut en).external_name = Some("example.org".into());
    idx.apply(&en).unwrap();
    let mut other = mk_service("d", "other", "10.96.0.40", &[("", 80)]);
    idx.apply(&other).unwrap();
    for name in ["headless", "ext", "other"] {
        idx.apply(&mk_slice(
            "d",
            &format!("{name}-1"),
            name,
            "IPv4",
            &[("", 80)],
            vec![ep("10.0.0.1")],
        ))
        .unwrap();
    }
    let t = built(&mut idx);
    assert_eq!(t.len(), 1, "only 'other' so far");
    // Labelled for another proxy: taken out.
    other.metadata.labels = Some(BTreeMap::from([(
        SERVICE_PROXY_NAME_LABEL.into(),
        "someone-else".into(),
    )]));
    idx.apply(&other).unwrap();
    let t = built(&mut idx);
    assert!(t.is_empty());
    assert_eq!(idx.service_count(), 0);
}

#[test]
fn fqdn_and_unlabelled_slices_are_ignored() {
    let mut idx = web_index();
    let mut fqdn = mk_slice(
        "default",
        "web-fqdn",
        "web",
        "FQDN",
        &[("http", 8080)],
        vec![ep("example.org")],
    );
    idx.apply(&fqdn).unwrap();
    fqdn.address_type = "IPv4".into();
    fqdn.metadata.name = Some("web-nolabel".into());
    fqdn.metadata.labels = None;
    fqdn.endpoints = Some(vec![ep("10.0.0.99")]);
    idx.apply(&fqdn).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        all(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

#[test]
fn internal_traffic_policy_local_uses_only_this_node() {
    let mut idx = index();
    let mut svc = mk_service("d", "s", "10.96.0.1", &[("", 80)]);
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    spec(&mut svc).external_ips = Some(vec!["203.0.113.1".into()]);
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "s-1",
        "s",
        "IPv4",
        &[("", 8080)],
        vec![ep_on("10.0.0.1", NODE), ep_on("10.0.0.2", "node-b")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:8080"])
    );
    // External traffic stays cluster-wide.
    assert_eq!(
        eligible(&svc_at(&t, "203.0.113.1:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    // No local endpoint: no endpoint at all, no fallback.
    idx.apply(&mk_slice(
        "d",
        "s-1",
        "s",
        "IPv4",
        &[("", 8080)],
        vec![ep_on("10.0.0.2", "node-b")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.1:80").eligible_len(), 0);
    assert_eq!(svc_at(&t, "203.0.113.1:80").eligible_len(), 1);
}

#[test]
fn local_policy_without_node_name_selects_nothing() {
    let mut idx = Index::new(None, vec![]);
    let mut svc = mk_service("d", "s", "10.96.0.1", &[("", 80)]);
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "s-1",
        "s",
        "IPv4",
        &[("", 8080)],
        vec![ep("10.0.0.1")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.1:80").eligible_len(), 0);
}

#[test]
fn external_traffic_policy_local_and_health_check() {
    let mut idx = Index::new(Some(NODE.into()), vec!["192.0.2.10".parse().unwrap()]);
    let mut svc = mk_lb_local_service("10.96.0.2", 32000);
    {
        let s = spec(&mut svc);
        s.external_ips = Some(vec!["203.0.113.2".into()]);
        s.ports.as_mut().unwrap()[0].node_port = Some(30002);
    }
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "lb-1",
        "lb",
        "IPv4",
        &[("web", 8080)],
        vec![
            ep_on("10.0.0.1", NODE),
            ep_on("10.0.0.2", "node-b"),
            Endpoint {
                node_name: Some(NODE.into()),
                ..ep_cond("10.0.0.3", Some(false), Some(true), Some(true))
            },
        ],
    ))
    .unwrap();
    let t = built(&mut idx);
    // Cluster IP: every endpoint.
    assert_eq!(
        all(&svc_at(&t, "10.96.0.2:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
    );
    // External addresses: local endpoints only.
    for k in ["203.0.113.2:80", "192.0.2.10:30002"] {
        assert_eq!(
            all(&svc_at(&t, k)),
            addrs(&["10.0.0.1:8080", "10.0.0.3:8080"]),
            "{k}"
        );
        assert_eq!(eligible(&svc_at(&t, k)), addrs(&["10.0.0.1:8080"]), "{k}");
    }
    // The built table carries the health check; nothing new, no change.
    assert!(!idx.build());
    assert_eq!(
        t.health_checks(),
        vec![HealthCheck {
            service: ObjectRef::new("d", "lb"),
            port: 32000,
            local_endpoints: 1,
        }]
    );
    // The local ready endpoint goes: the local terminating one serves
    // (fallback within local), the health check says 0.
    idx.apply(&mk_slice(
        "d",
        "lb-1",
        "lb",
        "IPv4",
        &[("web", 8080)],
        vec![
            ep_on("10.0.0.2", "node-b"),
            Endpoint {
                node_name: Some(NODE.into()),
                ..ep_cond("10.0.0.3", Some(false), Some(true), Some(true))
            },
        ],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "203.0.113.2:80")),
        addrs(&["10.0.0.3:8080"])
    );
    assert_eq!(t.health_checks()[0].local_endpoints, 0);
    // Cluster policy: no health check.
    spec(&mut svc).external_traffic_policy = Some("Cluster".into());
    idx.apply(&svc).unwrap();
    built(&mut idx);
    assert!(idx.health_checks().is_empty());
}

#[test]
fn health_check_node_port_is_built_into_the_table() {
    let mut idx = index();
    let mut svc = mk_lb_local_service("10.96.0.3", 32100);
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "lb-1",
        "lb",
        "IPv4",
        &[("web", 8080)],
        vec![ep_on("10.0.0.1", NODE), ep_on("10.0.0.2", NODE)],
    ))
    .unwrap();
    assert!(idx.build());
    let with = idx.table().clone();
    let expected = vec![HealthCheck {
        service: ObjectRef::new("d", "lb"),
        port: 32100,
        local_endpoints: 2,
    }];
    assert_eq!(with.health_checks(), expected);
    // The Service loses its health check port: the next table has none,
    // the build says the table changed, the published one keeps its own.
    spec(&mut svc).health_check_node_port = None;
    idx.apply(&svc).unwrap();
    assert!(idx.build());
    assert!(idx.table().health_checks().is_empty());
    assert!(crate::table::TableDiff::between(&with, idx.table()).health_checks);
    assert_eq!(with.health_checks(), expected);
    // Back, then the Service goes: removed again.
    spec(&mut svc).health_check_node_port = Some(32100);
    idx.apply(&svc).unwrap();
    assert!(idx.build());
    assert_eq!(idx.table().health_checks(), expected);
    idx.delete::<K8sService>(&ObjectRef::new("d", "lb"));
    assert!(idx.build());
    assert!(idx.table().health_checks().is_empty());
    assert!(idx.table().is_empty());
}

#[test]
fn session_affinity_client_ip() {
    let mut idx = web_index();
    let mut svc = mk_service("default", "web", "10.96.0.10", &[("http", 80)]);
    spec(&mut svc).session_affinity = Some("ClientIP".into());
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        svc_at(&t, "10.96.0.10:80").affinity.unwrap().timeout,
        Duration::from_secs(10_800)
    );
    spec(&mut svc).session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(60),
        }),
    });
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        svc_at(&t, "10.96.0.10:80").affinity.unwrap().timeout,
        Duration::from_secs(60)
    );
    // Out of range: rejected, the previous version (60 s) stays.
    spec(&mut svc).session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(0),
        }),
    });
    let err = idx.apply(&svc).unwrap_err();
    assert!(err.to_string().contains("default/web"), "{err}");
    assert!(err.to_string().contains("timeoutSeconds"), "{err}");
    let t = built(&mut idx);
    assert_eq!(
        svc_at(&t, "10.96.0.10:80").affinity.unwrap().timeout,
        Duration::from_secs(60)
    );
}

fn zoned_index(node_zone: Option<&str>, eps: Vec<Endpoint>) -> Table {
    let mut idx = index();
    idx.apply(&mk_node(NODE, node_zone, &[])).unwrap();
    let mut svc = mk_service("d", "s", "10.96.0.1", &[("", 80)]);
    spec(&mut svc).traffic_distribution = Some("PreferClose".into());
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice("d", "s-1", "s", "IPv4", &[("", 80)], eps))
        .unwrap();
    built(&mut idx)
}

#[test]
fn topology_hints_for_this_zone() {
    let hinted = || {
        vec![
            ep_zones("10.0.0.1", &["z1"]),
            ep_zones("10.0.0.2", &["z2"]),
            ep_zones("10.0.0.3", &["z1", "z3"]),
        ]
    };
    let t = zoned_index(Some("z1"), hinted());
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80", "10.0.0.3:80"])
    );
    // Node has no zone: all.
    let t = zoned_index(None, hinted());
    assert_eq!(svc_at(&t, "10.96.0.1:80").eligible_len(), 3);
    // Zone hinted nowhere: all.
    let t = zoned_index(Some("z9"), hinted());
    assert_eq!(svc_at(&t, "10.96.0.1:80").eligible_len(), 3);
    // One ready endpoint without hints: all.
    let mut partial = hinted();
    partial.push(ep("10.0.0.4"));
    let t = zoned_index(Some("z1"), partial);
    assert_eq!(svc_at(&t, "10.96.0.1:80").eligible_len(), 4);
    // A not-ready endpoint without hints does not disable hints.
    let mut with_unready = hinted();
    with_unready.push(ep_cond("10.0.0.5", Some(false), Some(true), Some(true)));
    let t = zoned_index(Some("z1"), with_unready);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80", "10.0.0.3:80"])
    );
}

#[test]
fn dual_stack_each_family_gets_its_endpoints() {
    let mut idx = index();
    let mut svc = mk_service("d", "ds", "10.96.0.5", &[("", 80)]);
    spec(&mut svc).cluster_ips = Some(vec!["10.96.0.5".into(), "fd00::5".into()]);
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "ds-v4",
        "ds",
        "IPv4",
        &[("", 8080)],
        vec![ep("10.0.0.1")],
    ))
    .unwrap();
    idx.apply(&mk_slice(
        "d",
        "ds-v6",
        "ds",
        "IPv6",
        &[("", 8080)],
        vec![ep("fd00:1::1")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(t.len(), 2);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.5:80")),
        addrs(&["10.0.0.1:8080"])
    );
    assert_eq!(
        eligible(&svc_at(&t, "[fd00::5]:80")),
        addrs(&["[fd00:1::1]:8080"])
    );
}

#[test]
fn bad_slice_fields_are_skipped_and_the_rest_served() {
    let mut idx = web_index();
    idx.apply(&mk_service("default", "api", "10.96.0.12", &[("", 80)]))
        .unwrap();
    built(&mut idx);
    let mut bad = mk_slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080), ("zero", 0)],
        vec![
            ep("10.0.0.1"),
            ep("not-an-ip"),
            ep("fd00::1"),         // not IPv4
            Endpoint::default(),   // no address
            ep("010.000.000.002"), // kube-proxy's sloppy parse: 10.0.0.2
        ],
    );
    bad.ports.as_mut().unwrap().push(EndpointPort {
        name: Some("big".into()),
        port: Some(70000),
        protocol: Some("TCP".into()),
        app_protocol: None,
    });
    idx.apply(&bad).unwrap();
    // Other objects still update.
    idx.apply(&mk_slice(
        "default",
        "api-1",
        "api",
        "IPv4",
        &[("", 80)],
        vec![ep("10.0.2.1")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"]),
        "the good endpoints of web-1 are used"
    );
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.12:80")),
        addrs(&["10.0.2.1:80"])
    );
    assert_eq!(idx.stats().malformed, 0);
    assert_eq!(idx.stats().skipped_fields, 5, "3 endpoints, 2 ports");
    // The same object again: not counted again.
    idx.apply(&bad).unwrap();
    assert_eq!(idx.stats().skipped_fields, 5);
    // A nameless slice is still malformed as a whole.
    bad.metadata.name = None;
    let err = idx.apply(&bad).unwrap_err();
    assert!(err.to_string().contains("no namespace or name"), "{err}");
    assert_eq!(idx.stats().malformed, 1);
}

#[test]
fn bad_service_fields_are_skipped_and_the_rest_served() {
    let mut idx = Index::new(Some(NODE.into()), vec!["192.0.2.10".parse().unwrap()]);
    let mut svc = mk_service(
        "d",
        "s",
        "10.96.0.3",
        &[("http", 80), ("zero", 0), ("admin", 81)],
    );
    {
        let s = spec(&mut svc);
        s.type_ = Some("LoadBalancer".into());
        s.external_ips = Some(vec![
            "nope".into(),
            "203.000.113.007".into(), // sloppy: 203.0.113.7
        ]);
        let ports = s.ports.as_mut().unwrap();
        ports[0].node_port = Some(30080);
        ports[2].node_port = Some(70000);
    }
    svc.status = lb_status(&["203.0.113.300", "203.0.113.8"]);
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        listen_addrs(&t),
        vec![
            "10.96.0.3:80",
            "10.96.0.3:81",
            "192.0.2.10:30080",
            "203.0.113.7:80",
            "203.0.113.7:81",
            "203.0.113.8:80",
            "203.0.113.8:81",
        ]
    );
    assert_eq!(idx.stats().skipped_fields, 4);
    assert_eq!(idx.stats().malformed, 0);
    idx.apply(&svc).unwrap();
    assert_eq!(idx.stats().skipped_fields, 4, "counted once per object");
    // A bad cluster IP is skipped too: the good one of the pair is served.
    let mut pair = mk_service("d", "pair", "10.96.0.300", &[("", 80)]);
    spec(&mut pair).cluster_ips = Some(vec!["10.96.0.300".into(), "10.96.0.4".into()]);
    idx.apply(&pair).unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("10.96.0.4:80")).is_some());
    assert_eq!(idx.stats().skipped_fields, 5);
}

#[test]
fn malformed_service_is_rejected() {
    let mut idx = index();
    let mut nameless = mk_service("d", "x", "10.96.0.3", &[("", 80)]);
    nameless.metadata.name = None;
    assert!(idx.apply(&nameless).is_err());
    let mut specless = mk_service("d", "bad", "10.96.0.3", &[("", 80)]);
    specless.spec = None;
    let err = idx.apply(&specless).unwrap_err();
    assert_eq!(err.object, "d/bad");
    assert!(err.reason.contains("no spec"), "{err}");
    assert!(built(&mut idx).is_empty());
    assert_eq!(idx.stats().malformed, 2);
}

#[test]
fn deleting_the_service_removes_its_keys_and_slices_wait_for_it() {
    let mut idx = web_index();
    built(&mut idx);
    idx.delete::<K8sService>(&ObjectRef::new("default", "web"));
    assert!(idx.build());
    assert!(idx.table().is_empty());
    // The slices are still indexed: the Service coming back finds them.
    idx.apply(&mk_service("default", "web", "10.96.0.10", &[("http", 80)]))
        .unwrap();
    let t = built(&mut idx);
    assert_eq!(eligible(&svc_at(&t, "10.96.0.10:80")).len(), 2);
}

#[test]
fn slice_before_service_is_kept() {
    let mut idx = index();
    idx.apply(&mk_slice(
        "d",
        "s-1",
        "s",
        "IPv4",
        &[("", 80)],
        vec![ep("10.0.0.1")],
    ))
    .unwrap();
    assert!(!idx.build(), "no Service yet: no entry");
    idx.apply(&mk_service("d", "s", "10.96.0.1", &[("", 80)]))
        .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80"])
    );
}

#[test]
fn relist_replaces_everything_and_touches_only_what_changed() {
    let mut idx = web_index();
    idx.apply(&mk_service("default", "api", "10.96.0.12", &[("", 80)]))
        .unwrap();
    let keep_slice = mk_slice(
        "default",
        "api-1",
        "api",
        "IPv4",
        &[("", 80)],
        vec![ep("10.0.2.1")],
    );
    idx.apply(&keep_slice).unwrap();
    let before = built(&mut idx);
    // Relist: web and its slice were deleted while disconnected; api unchanged.
    let services = [mk_service("default", "api", "10.96.0.12", &[("", 80)])];
    assert!(idx.reset(&services, &[]).is_empty());
    assert!(idx.reset([&keep_slice], &[]).is_empty());
    assert!(idx.build());
    let after = idx.table().clone();
    assert_eq!(after.len(), 1);
    assert!(after.get(&key("10.96.0.10:80")).is_none());
    assert!(Arc::ptr_eq(
        before.get(&key("10.96.0.12:80")).unwrap(),
        after.get(&key("10.96.0.12:80")).unwrap()
    ));
    // Relisting the same again changes nothing.
    idx.reset(&services, &[]);
    idx.reset([&keep_slice], &[]);
    assert!(!idx.is_dirty());
    assert!(!idx.build());
}

#[test]
fn relist_keeps_last_good_version_of_a_malformed_object() {
    let mut idx = web_index();
    built(&mut idx);
    let mut bad = mk_service("default", "web", "10.96.0.11", &[("http", 80)]);
    spec(&mut bad).session_affinity = Some("ClientIP".into());
    spec(&mut bad).session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(86_401),
        }),
    });
    let errs = idx.reset([&bad], &[]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].object, "default/web");
    assert!(!idx.build(), "old web kept");
    assert_eq!(eligible(&svc_at(idx.table(), "10.96.0.10:80")).len(), 2);
    spec(&mut bad).session_affinity_config = None;
    assert!(idx.reset([&bad], &[]).is_empty());
    assert!(idx.build());
    assert!(idx.table().get(&key("10.96.0.10:80")).is_none());
    assert_eq!(eligible(&svc_at(idx.table(), "10.96.0.11:80")).len(), 2);
}

#[test]
fn single_slice_update_touches_only_its_service() {
    let mut idx = index();
    for i in 0..50u8 {
        let name = format!("s{i}");
        idx.apply(&mk_service(
            "d",
            &name,
            &format!("10.96.1.{i}"),
            &[("", 80)],
        ))
        .unwrap();
        idx.apply(&mk_slice(
            "d",
            &format!("{name}-1"),
            &name,
            "IPv4",
            &[("", 80)],
            vec![ep(&format!("10.1.0.{i}"))],
        ))
        .unwrap();
    }
    let before = built(&mut idx);
    idx.apply(&mk_slice(
        "d",
        "s7-1",
        "s7",
        "IPv4",
        &[("", 80)],
        vec![ep("10.1.1.7")],
    ))
    .unwrap();
    assert!(idx.build());
    let after = idx.table().clone();
    let mut changed = Vec::new();
    for (k, s) in before.iter() {
        if !Arc::ptr_eq(s, after.get(k).unwrap()) {
            changed.push(k.addr.to_string());
        }
    }
    assert_eq!(changed, vec!["10.96.1.7:80"]);
    // The old table (already published) is unaffected.
    assert_eq!(
        eligible(&svc_at(&before, "10.96.1.7:80")),
        addrs(&["10.1.0.7:80"])
    );
    assert_eq!(
        eligible(&svc_at(&after, "10.96.1.7:80")),
        addrs(&["10.1.1.7:80"])
    );
    // Re-applying an identical slice changes nothing.
    idx.apply(&mk_slice(
        "d",
        "s7-1",
        "s7",
        "IPv4",
        &[("", 80)],
        vec![ep("10.1.1.7")],
    ))
    .unwrap();
    assert!(!idx.is_dirty());
    assert!(!idx.build());
}

#[test]
fn conflicting_claims_resolve_by_name_and_hand_over() {
    let mut idx = index();
    for name in ["a", "b"] {
        let cluster_ip = if name == "a" {
            "10.96.2.1"
        } else {
            "10.96.2.2"
        };
        let mut svc = mk_service("d", name, cluster_ip, &[("", 80)]);
        spec(&mut svc).external_ips = Some(vec!["203.0.113.50".into()]);
        idx.apply(&svc).unwrap();
    }
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "203.0.113.50:80").name, "d/a:80");
    assert!(idx.stats().conflicts >= 1);
    idx.delete::<K8sService>(&ObjectRef::new("d", "a"));
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "203.0.113.50:80").name, "d/b:80");
}

#[test]
fn trigger_times_are_collected_for_latency() {
    let mut idx = web_index();
    idx.take_trigger_times();
    let mut s = mk_slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.8")],
    );
    s.metadata.annotations = Some(BTreeMap::from([(
        TRIGGER_TIME_ANNOTATION.into(),
        "2026-01-02T03:04:05Z".into(),
    )]));
    idx.apply(&s).unwrap();
    assert_eq!(
        idx.take_trigger_times(),
        vec![1_767_323_045_000_000_000i128]
    );
    assert!(idx.take_trigger_times().is_empty());
}

#[test]
fn relist_keeps_undecodable_objects_by_reference() {
    let mut idx = web_index();
    built(&mut idx);
    // Both web and its slice came back from the relist as undecodable.
    let web = ObjectRef::new("default", "web");
    let web1 = ObjectRef::new("default", "web-1");
    idx.reset::<K8sService>([], std::slice::from_ref(&web));
    idx.reset::<EndpointSlice>([], std::slice::from_ref(&web1));
    assert!(!idx.build(), "previous versions kept");
    assert_eq!(eligible(&svc_at(idx.table(), "10.96.0.10:80")).len(), 2);
    // Without keep, the same relist removes them.
    idx.reset::<EndpointSlice>([], &[]);
    assert!(idx.build());
    assert_eq!(svc_at(idx.table(), "10.96.0.10:80").eligible_len(), 0);
    idx.delete::<K8sService>(&web);
    assert!(idx.build());
    assert!(idx.table().is_empty());
}

#[test]
fn relabelled_slice_moves_to_its_new_service() {
    let mut idx = web_index();
    idx.apply(&mk_service("default", "api", "10.96.0.12", &[("http", 80)]))
        .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.12:80").backends().len(), 0);
    // The same slice now names 'api'.
    idx.apply(&mk_slice(
        "default",
        "web-1",
        "api",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.1"), ep("10.0.0.2")],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(svc_at(&t, "10.96.0.10:80").backends().len(), 0);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.12:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

#[test]
fn type_change_removes_external_addresses() {
    let mut idx = Index::new(Some(NODE.into()), vec!["192.0.2.10".parse().unwrap()]);
    let mut svc = mk_service("default", "web", "10.96.0.10", &[("http", 80)]);
    spec(&mut svc).type_ = Some("NodePort".into());
    spec(&mut svc).ports.as_mut().unwrap()[0].node_port = Some(30080);
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("192.0.2.10:30080")).is_some());
    spec(&mut svc).type_ = Some("ClusterIP".into());
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert!(t.get(&key("192.0.2.10:30080")).is_none());
    assert_eq!(t.len(), 1);
}

#[test]
fn duplicate_address_keeps_the_most_ready_copy() {
    // A new pod reuses the IP of a terminating one; the terminating copy sits
    // in the slice whose name sorts first.
    let mut idx = web_index();
    let slice = |name: &str, conditions: (bool, bool, bool)| {
        let (ready, serving, terminating) = conditions;
        let ep = ep_cond("10.0.0.9", Some(ready), Some(serving), Some(terminating));
        mk_slice("default", name, "web", "IPv4", &[("http", 8080)], vec![ep])
    };
    idx.apply(&slice("web-0", (false, true, true))).unwrap();
    // The copies of 10.0.0.9 in the table once web-2 has `conditions`.
    let mut copies = |conditions| {
        idx.apply(&slice("web-2", conditions)).unwrap();
        let s = svc_at(&built(&mut idx), "10.96.0.10:80");
        (s.backends().iter())
            .filter(|b| b.addr == sa("10.0.0.9:8080"))
            .map(|b| b.conditions)
            .collect::<Vec<_>>()
    };
    assert_eq!(copies((true, true, false)), [Conditions::READY]);
    // Serving (not ready, not terminating) beats serving-terminating too.
    let serving = copies((false, true, false));
    assert!(serving.len() == 1 && !serving[0].terminating, "{serving:?}");
    // Equal copies: one is kept (the first slice's).
    assert_eq!(copies((false, true, true)), [Conditions::TERMINATING]);
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.10:80")),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

#[test]
fn a_service_is_served_only_in_the_families_of_its_cluster_ips() {
    let node_ips = vec![
        "192.0.2.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    let mut idx = Index::new(Some(NODE.into()), node_ips);
    let mut svc = mk_service("d", "v4", "10.96.0.7", &[("", 80)]);
    {
        let s = spec(&mut svc);
        s.type_ = Some("LoadBalancer".into());
        s.external_ips = Some(vec!["203.0.113.7".into(), "2001:db8:1::7".into()]);
        s.ports.as_mut().unwrap()[0].node_port = Some(30007);
    }
    svc.status = lb_status(&["2001:db8:2::7"]);
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        listen_addrs(&t),
        vec!["10.96.0.7:80", "192.0.2.10:30007", "203.0.113.7:80"],
        "no IPv6 listener for an IPv4-only Service"
    );
    // Dual-stack: both families.
    spec(&mut svc).cluster_ips = Some(vec!["10.96.0.7".into(), "fd00::7".into()]);
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    for k in [
        "[fd00::7]:80",
        "[2001:db8::10]:30007",
        "[2001:db8:1::7]:80",
        "[2001:db8:2::7]:80",
    ] {
        assert!(t.get(&key(k)).is_some(), "{k}");
    }
    assert_eq!(t.len(), 7);
    // No cluster IP at all (not allocated yet): not served, as kube-proxy.
    spec(&mut svc).cluster_ips = Some(vec![]);
    spec(&mut svc).cluster_ip = Some(String::new());
    idx.apply(&svc).unwrap();
    assert!(built(&mut idx).is_empty());
}

/// `ep(ip)` with `hints.forZones` and `hints.forNodes`.
fn ep_hints(ip: &str, zones: &[&str], nodes: &[&str]) -> Endpoint {
    Endpoint {
        hints: Some(EndpointHints {
            for_zones: Some(
                zones
                    .iter()
                    .map(|z| ForZone {
                        name: z.to_string(),
                    })
                    .collect(),
            ),
            for_nodes: Some(
                nodes
                    .iter()
                    .map(|n| ForNode {
                        name: n.to_string(),
                    })
                    .collect(),
            ),
        }),
        ..ep(ip)
    }
}

#[test]
fn same_node_hints_before_zone_hints() {
    let hinted = || {
        vec![
            ep_hints("10.0.0.1", &["z1"], &[NODE]),
            ep_hints("10.0.0.2", &["z1"], &["node-b"]),
            ep_hints("10.0.0.3", &["z2"], &["node-c"]),
        ]
    };
    // trafficDistribution: PreferSameNode; this node is hinted.
    let t = zoned_index(Some("z1"), hinted());
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80"])
    );
    // Node hints need no zone.
    let t = zoned_index(None, hinted());
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80"])
    );
    // No endpoint for this node: zone hints apply.
    let mut elsewhere = hinted();
    elsewhere.remove(0);
    elsewhere.push(ep_hints("10.0.0.4", &["z1"], &["node-d"]));
    let t = zoned_index(Some("z1"), elsewhere);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.2:80", "10.0.0.4:80"])
    );
    // A ready endpoint without a node hint: zone hints apply.
    let mut partial = hinted();
    partial.push(ep_zones("10.0.0.5", &["z1"]));
    let t = zoned_index(Some("z1"), partial);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.5:80"])
    );
    // A not-ready endpoint without hints does not disable them.
    let mut with_unready = hinted();
    with_unready.push(ep_cond("10.0.0.6", Some(false), Some(true), Some(true)));
    let t = zoned_index(Some("z1"), with_unready);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.1:80")),
        addrs(&["10.0.0.1:80"])
    );
}

// ----- What the nftables table does without endpoints, source ranges -----

fn no_endpoints_at(t: &Table, k: &str) -> crate::table::NoEndpoints {
    svc_at(t, k).settings.no_endpoints
}

#[test]
fn no_endpoints_anywhere_rejects_and_none_local_drops() {
    use crate::table::NoEndpoints::{Drop, Reject};
    // iTP=Local and eTP=Local NodePort (on 192.0.2.10), no slices at all.
    let mut idx = Index::new(Some(NODE.into()), vec!["192.0.2.10".parse().unwrap()]);
    let mut svc = mk_node_port_service();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    spec(&mut svc).external_traffic_policy = Some("Local".into());
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    for k in ["10.96.0.30:80", "192.0.2.10:31000"] {
        assert_eq!(svc_at(&t, k).eligible_len(), 0, "{k}");
        assert_eq!(no_endpoints_at(&t, k), Reject, "{k}");
    }
    // A ready endpoint on another node: none local, so drop.
    let slice = |eps| mk_slice("default", "np-1", "np", "IPv4", &[("", 8080)], eps);
    idx.apply(&slice(vec![ep_on("10.0.0.1", "node-b")]))
        .unwrap();
    let t = built(&mut idx);
    for k in ["10.96.0.30:80", "192.0.2.10:31000"] {
        assert_eq!(svc_at(&t, k).eligible_len(), 0, "{k}");
        assert_eq!(no_endpoints_at(&t, k), Drop, "{k}");
    }
    // A local one: served (the verdict is not used while eligible).
    idx.apply(&slice(vec![
        ep_on("10.0.0.1", "node-b"),
        ep_on("10.0.0.2", NODE),
    ]))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "192.0.2.10:31000")),
        addrs(&["10.0.0.2:8080"])
    );
    // Only a serving, terminating endpoint elsewhere: with both policies
    // Local it does not count (kube-proxy counts ready ones only) ...
    let terminating = || {
        let mut e = ep_cond("10.0.0.3", Some(false), Some(true), Some(true));
        e.node_name = Some("node-b".into());
        e
    };
    idx.apply(&slice(vec![terminating()])).unwrap();
    let t = built(&mut idx);
    assert_eq!(no_endpoints_at(&t, "192.0.2.10:31000"), Reject);
    // ... but with the cluster IP under Cluster it does: the cluster IP
    // serves it, the Local node port drops.
    spec(&mut svc).internal_traffic_policy = None;
    idx.apply(&svc).unwrap();
    let t = built(&mut idx);
    assert_eq!(
        eligible(&svc_at(&t, "10.96.0.30:80")),
        addrs(&["10.0.0.3:8080"])
    );
    assert_eq!(svc_at(&t, "192.0.2.10:31000").eligible_len(), 0);
    assert_eq!(no_endpoints_at(&t, "192.0.2.10:31000"), Drop);
    // A Cluster Service whose slice empties: reject.
    let mut idx = web_index();
    idx.apply(&mk_slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![],
    ))
    .unwrap();
    let t = built(&mut idx);
    assert_eq!(no_endpoints_at(&t, "10.96.0.10:80"), Reject);
}

/// LoadBalancer `default/lb`: cluster IP 10.96.0.40, external IP
/// 203.0.113.7, LB IP 203.0.113.8, node port 31500, with `ranges`, and one
/// ready endpoint.
fn lb_index(node_ip: &str, ranges: &[&str]) -> Index {
    let mut idx = Index::new(Some(NODE.into()), vec![node_ip.parse().unwrap()]);
    let mut svc = mk_service("default", "lb", "10.96.0.40", &[("http", 80)]);
    {
        let s = spec(&mut svc);
        s.type_ = Some("LoadBalancer".into());
        s.external_ips = Some(vec!["203.0.113.7".into()]);
        s.ports.as_mut().unwrap()[0].node_port = Some(31500);
        s.load_balancer_source_ranges = Some(ranges.iter().map(|r| r.to_string()).collect());
    }
    svc.status = lb_status(&["203.0.113.8"]);
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "default",
        "lb-1",
        "lb",
        "IPv4",
        &[("http", 8080)],
        vec![ep("10.0.0.1")],
    ))
    .unwrap();
    idx
}

fn ranges_at(t: &Table, k: &str) -> Vec<String> {
    (svc_at(t, k).settings.source_ranges.iter())
        .map(|c| c.to_string())
        .collect()
}

#[test]
fn load_balancer_source_ranges_apply_to_load_balancer_ips_only() {
    // Spaces trimmed; a bad range skipped and counted, the rest kept; the
    // other family's range left to the other family; a nested one folded.
    let ranges = [
        " 198.51.100.0/24 ",
        "10.0.0.0/33",
        "fd00::/8",
        "198.51.100.128/25",
    ];
    let mut idx = lb_index("192.0.2.10", &ranges);
    let t = built(&mut idx);
    assert_eq!(idx.stats().skipped_fields, 1);
    assert_eq!(ranges_at(&t, "203.0.113.8:80"), ["198.51.100.0/24"]);
    // Cluster IP, external IP and node port are never filtered.
    for k in ["10.96.0.40:80", "203.0.113.7:80", "192.0.2.10:31500"] {
        assert!(ranges_at(&t, k).is_empty(), "{k}");
    }
    // The LB entry serves the same backends.
    assert_eq!(
        eligible(&svc_at(&t, "203.0.113.8:80")),
        addrs(&["10.0.0.1:8080"])
    );
    assert_eq!(
        svc_at(&t, "203.0.113.8:80").name,
        svc_at(&t, "203.0.113.7:80").name
    );
    // The same bad range again is not counted again.
    idx.apply(&{
        let mut svc = mk_service("default", "lb", "10.96.0.40", &[("http", 80)]);
        spec(&mut svc).load_balancer_source_ranges =
            Some(ranges.iter().map(|r| r.to_string()).collect());
        svc
    })
    .unwrap();
    idx.build();
    assert_eq!(idx.stats().skipped_fields, 1);
    // Only bad ranges: nothing to filter with (kube-proxy's behaviour).
    let mut idx = lb_index("192.0.2.10", &["nonsense"]);
    let t = built(&mut idx);
    assert!(ranges_at(&t, "203.0.113.8:80").is_empty());
}

#[test]
fn a_range_holding_the_node_also_admits_the_load_balancer_ip() {
    // kube-proxy's allowFromNode: a VIP-like load balancer loops a node's
    // request back with the LB IP as its source.
    let mut idx = lb_index("192.0.2.10", &["192.0.2.0/24"]);
    let t = built(&mut idx);
    assert_eq!(
        ranges_at(&t, "203.0.113.8:80"),
        ["192.0.2.0/24", "203.0.113.8/32"]
    );
    let mut idx = lb_index("192.0.2.10", &["198.51.100.0/24"]);
    let t = built(&mut idx);
    assert_eq!(ranges_at(&t, "203.0.113.8:80"), ["198.51.100.0/24"]);
}

/// An eTP=Local LoadBalancer Service `d/lb` (10.96.0.2:80, external IP
/// 203.0.113.2, node port 30002, LB IP 198.51.100.2) with one local
/// endpoint.
fn etp_index(policy: &str) -> Index {
    let mut idx = Index::new(Some(NODE.into()), vec!["192.0.2.10".parse().unwrap()]);
    let mut svc = mk_service("d", "lb", "10.96.0.2", &[("web", 80)]);
    {
        let s = spec(&mut svc);
        s.type_ = Some("LoadBalancer".into());
        s.external_traffic_policy = Some(policy.into());
        s.external_ips = Some(vec!["203.0.113.2".into()]);
        s.ports.as_mut().unwrap()[0].node_port = Some(30002);
    }
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some("198.51.100.2".into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    idx.apply(&svc).unwrap();
    idx.apply(&mk_slice(
        "d",
        "lb-1",
        "lb",
        "IPv4",
        &[("web", 8080)],
        vec![ep_on("10.0.0.1", NODE)],
    ))
    .unwrap();
    idx
}

#[test]
fn external_keys_of_local_policy_keep_the_client_ip() {
    let keep = |t: &Table, k: &str| svc_at(t, k).settings.keep_external_client_ip;
    let t = built(&mut etp_index("Local"));
    assert!(!keep(&t, "10.96.0.2:80"), "the cluster IP never");
    for k in ["203.0.113.2:80", "192.0.2.10:30002", "198.51.100.2:80"] {
        assert!(keep(&t, k), "{k}");
    }
    let t = built(&mut etp_index("Cluster"));
    for k in [
        "10.96.0.2:80",
        "203.0.113.2:80",
        "192.0.2.10:30002",
        "198.51.100.2:80",
    ] {
        assert!(!keep(&t, k), "{k}");
    }
}

fn with_pod_cidrs(mut node: Node, cidrs: &[&str], single: Option<&str>) -> Node {
    node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        pod_cidrs: (!cidrs.is_empty()).then(|| cidrs.iter().map(|c| c.to_string()).collect()),
        pod_cidr: single.map(str::to_string),
        ..Default::default()
    });
    node
}

#[test]
fn this_nodes_pod_cidrs_are_published_with_the_table() {
    let mut idx = index();
    idx.apply(&mk_service("d", "a", "10.96.0.1", &[("", 80)]))
        .unwrap();
    assert!(idx.build());
    assert!(idx.table().local_pod_cidrs().is_empty());
    let node = mk_node(NODE, None, &[("InternalIP", "192.0.2.10")]);
    // Bad ones are skipped, the rest is used; IPv4 and IPv6.
    idx.apply(&with_pod_cidrs(
        node.clone(),
        &["fd00:244::/64", "10.244.0.0/24", "nonsense"],
        None,
    ))
    .unwrap();
    assert!(idx.build(), "a pod CIDR change is a table change");
    let cidrs: Vec<String> = (idx.table().local_pod_cidrs().iter())
        .map(|c| c.to_string())
        .collect();
    assert_eq!(cidrs, ["10.244.0.0/24", "fd00:244::/64"]);
    // The same again: no change.
    idx.apply(&with_pod_cidrs(
        node.clone(),
        &["10.244.0.0/24", "fd00:244::/64"],
        None,
    ))
    .unwrap();
    assert!(!idx.build());
    // Only the old single field: used.
    idx.apply(&with_pod_cidrs(node.clone(), &[], Some("10.244.7.0/24")))
        .unwrap();
    assert!(idx.build());
    assert_eq!(
        idx.table().local_pod_cidrs()[0].to_string(),
        "10.244.7.0/24"
    );
    // Another node's Node: ignored.
    idx.apply(&with_pod_cidrs(
        mk_node("node-b", None, &[]),
        &["10.244.9.0/24"],
        None,
    ))
    .unwrap();
    assert!(!idx.build());
    // Deleted: the last ones stay (the pods are still here).
    idx.delete::<Node>(&NODE.to_string());
    idx.build();
    assert_eq!(
        idx.table().local_pod_cidrs()[0].to_string(),
        "10.244.7.0/24"
    );
}
