//! Fuzzing the Kubernetes conversion and the index with generated objects
//! (proptest, a bounded number of cases so it runs in `cargo test`).
//!
//! Objects are generated as JSON, from a vocabulary of the values that
//! break parsers (leading-zero and out-of-range IPs, port 0, negative and
//! huge numbers, unknown enum strings, missing names, FQDN slices, mixed
//! families), and decoded as the watcher decodes them (serde into the
//! k8s-openapi type; what does not decode is what the watcher reports as
//! undecodable). Then a random sequence of apply / delete / relist
//! operations runs against the [`Index`], building a table after each.
//!
//! Properties: nothing panics; a rejected object changes nothing (the last
//! good table keeps serving); every built table is internally consistent
//! (each eligible backend is one of its Service's backends).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{Value, json};
use sluice_control::Table;
use sluice_control::k8s::{Index, ObjectRef};

fn pick<T: Clone + std::fmt::Debug + 'static>(values: &[T]) -> impl Strategy<Value = T> + use<T> {
    proptest::sample::select(values.to_vec())
}

/// A string that may or may not be an IP address (valid ones most often).
fn ip_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        16 => pick(&["10.96.0.10", "10.96.0.11", "192.0.2.1", "fd00::10"]).prop_map(Value::from),
        2 => pick(&[
            "010.096.000.010",
            "::ffff:10.0.0.1",
            "300.1.1.1",
            "None",
            "",
            "10.96.0.10/32",
        ])
        .prop_map(Value::from),
        1 => "[0-9a-f:.]{0,18}".prop_map(Value::from),
    ]
}

/// Mostly a string; now and then a value of the wrong type, which makes
/// the whole object undecodable (the watcher's other path).
fn ip() -> impl Strategy<Value = Value> {
    prop_oneof![
        20 => ip_text(),
        1 => Just(Value::Null),
        1 => Just(json!(42)),
    ]
}

fn ips() -> impl Strategy<Value = Value> {
    prop_oneof![
        20 => proptest::collection::vec(ip_text(), 0..3).prop_map(Value::from),
        2 => Just(Value::Null),
        1 => Just(json!("10.96.0.10")),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    prop_oneof![
        40 => pick(&[80i64, 443, 30080]).prop_map(Value::from),
        6 => pick(&[0i64, -1, 65535, 65536, i64::from(i32::MAX)]).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!("http")),
        1 => Just(json!(i64::MAX)),
    ]
}

fn maybe<T: Strategy<Value = Value>>(s: T) -> impl Strategy<Value = Value> {
    prop_oneof![1 => Just(Value::Null), 12 => s]
}

/// `common` most of the time, one of `rare` now and then.
fn mostly(common: &'static str, rare: &[&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        16 => Just(Value::from(common)),
        1 => pick(rare).prop_map(Value::from),
        1 => Just(Value::Null),
    ]
}

fn name() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => pick(&["web", "api", "web-1", "web-2"]).prop_map(Value::from),
        1 => Just(json!("")),
        1 => Just(Value::Null),
    ]
}

fn port_name() -> impl Strategy<Value = Value> {
    mostly("http", &["", "grpc"])
}

fn service_port() -> impl Strategy<Value = Value> {
    (
        port_name(),
        mostly("TCP", &["UDP", "SCTP", "tcp", "QUIC"]),
        port(),
        port(),
        maybe(port()),
    )
        .prop_map(|(name, protocol, port, node_port, target)| {
            json!({"name": name, "protocol": protocol, "port": port,
                   "nodePort": node_port, "targetPort": target})
        })
}

fn service() -> impl Strategy<Value = Value> {
    let spec = (
        mostly(
            "ClusterIP",
            &["NodePort", "LoadBalancer", "ExternalName", "Weird"],
        ),
        ip(),
        ips(),
        ips(),
        proptest::collection::vec(service_port(), 1..3),
        mostly("Cluster", &["Local", "Weird"]),
        mostly("Cluster", &["Local", "Weird"]),
        mostly("None", &["ClientIP", "Sticky"]),
        maybe(pick(&[0i64, 1, 10800, 86401, -5]).prop_map(Value::from)),
        maybe(port()),
    );
    let ingress = proptest::collection::vec(
        (
            ip(),
            maybe(pick(&["VIP", "Proxy", "Other"]).prop_map(Value::from)),
        )
            .prop_map(|(ip, mode)| json!({"ip": ip, "ipMode": mode})),
        0..2,
    );
    (
        mostly("web", &["api", ""]),
        mostly("default", &["", "kube-system"]),
        spec,
        ingress,
    )
        .prop_map(|(name, ns, spec, ingress)| {
            let (ty, cip, cips, eips, ports, etp, itp, aff, timeout, hc) = spec;
            // clusterIPs[0] is clusterIP on a real apiserver: mostly so here.
            let cips = match (&cip, cips.as_array().map(Vec::len)) {
                (Value::String(_), Some(0 | 1)) => json!([cip]),
                _ => cips,
            };
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"type": ty, "clusterIP": cip, "clusterIPs": cips, "externalIPs": eips,
                         "ports": ports, "externalTrafficPolicy": etp,
                         "internalTrafficPolicy": itp, "sessionAffinity": aff,
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                         "healthCheckNodePort": hc},
                "status": {"loadBalancer": {"ingress": ingress}},
            })
        })
}

fn endpoint() -> impl Strategy<Value = Value> {
    let cond = || maybe(any::<bool>().prop_map(Value::from));
    let addresses = prop_oneof![
        12 => proptest::collection::vec(ip_text(), 1..3).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!([])),
    ];
    (
        addresses,
        cond(),
        cond(),
        cond(),
        maybe(pick(&["node-a", "node-b", ""]).prop_map(Value::from)),
        maybe(pick(&["zone-a", "zone-b"]).prop_map(Value::from)),
        prop_oneof![6 => Just(Value::Null), 1 => pick(&["zone-a", "zone-b"]).prop_map(Value::from)],
        maybe(pick(&["node-a", "node-b"]).prop_map(Value::from)),
    )
        .prop_map(
            |(addresses, ready, serving, terminating, node, zone, hz, hn)| {
                json!({"addresses": addresses,
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": node, "zone": zone,
                "hints": if hz.is_null() { Value::Null } else {
                    json!({"forZones": [{"name": hz}], "forNodes": [{"name": hn}]})
                }})
            },
        )
}

fn slice() -> impl Strategy<Value = Value> {
    (
        name(),
        mostly("web", &["api", ""]),
        mostly("IPv4", &["IPv6", "FQDN", "Weird"]),
        proptest::collection::vec(endpoint(), 1..4),
        proptest::collection::vec(
            (port_name(), port(), mostly("TCP", &["UDP"]))
                .prop_map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})),
            1..3,
        ),
    )
        .prop_map(|(name, svc, ty, endpoints, ports)| {
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "default",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": ty, "endpoints": endpoints, "ports": ports,
            })
        })
}

fn node() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(
            (pick(&["InternalIP", "ExternalIP", "Hostname"]), ip())
                .prop_map(|(t, a)| json!({"type": t, "address": a})),
            0..3,
        ),
        maybe(pick(&["zone-a", "zone-b"]).prop_map(Value::from)),
    )
        .prop_map(|(addresses, zone)| {
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "node-a",
                                "labels": {"topology.kubernetes.io/zone": zone}},
                   "status": {"addresses": addresses}})
        })
}

#[derive(Debug, Clone)]
enum Op {
    Service(Value),
    Slice(Value),
    Node(Value),
    DeleteService(&'static str),
    DeleteSlice(&'static str),
    RelistServices(Vec<Value>),
    RelistSlices(Vec<Value>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => service().prop_map(Op::Service),
        4 => slice().prop_map(Op::Slice),
        1 => node().prop_map(Op::Node),
        1 => pick(&["web", "api"]).prop_map(Op::DeleteService),
        1 => pick(&["web-1", "web-2", "web"]).prop_map(Op::DeleteSlice),
        1 => proptest::collection::vec(service(), 0..3).prop_map(Op::RelistServices),
        1 => proptest::collection::vec(slice(), 0..3).prop_map(Op::RelistSlices),
    ]
}

/// Decodes as the watcher does; `None` when the object does not decode.
fn decode<K: serde::de::DeserializeOwned>(v: &Value) -> Option<K> {
    serde_json::from_value(v.clone()).ok()
}

fn key(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn consistent(table: &Table) {
    for (listen, svc) in table.iter() {
        for b in svc.eligible_iter() {
            assert!(
                svc.backends().iter().any(|x| x.addr == b.addr),
                "{listen}: eligible {} is not a backend",
                b.addr
            );
            assert_eq!(b.addr.is_ipv4(), listen.addr.is_ipv4(), "{listen}: family");
        }
    }
}

/// Applies one object; a rejected one must leave the table as it was.
fn apply<K: sluice_control::k8s::Watched + serde::de::DeserializeOwned>(
    index: &mut Index,
    v: &Value,
) {
    let Some(obj) = decode::<K>(v) else { return };
    let before = index.table().clone();
    if index.apply(&obj).is_err() {
        index.build();
        assert_eq!(
            index.table(),
            &before,
            "a rejected object changed the table"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_objects_builds_consistent_tables(ops in proptest::collection::vec(op(), 1..12)) {
        let mut index = Index::new(Some("node-a".into()), Vec::new());
        for op in &ops {
            match op {
                Op::Service(v) => apply::<Service>(&mut index, v),
                Op::Slice(v) => apply::<EndpointSlice>(&mut index, v),
                Op::Node(v) => apply::<Node>(&mut index, v),
                Op::DeleteService(n) => index.delete::<Service>(&key(n)),
                Op::DeleteSlice(n) => index.delete::<EndpointSlice>(&key(n)),
                Op::RelistServices(vs) => {
                    let objs: Vec<Service> = vs.iter().filter_map(decode).collect();
                    index.reset(&objs, &[]);
                }
                Op::RelistSlices(vs) => {
                    let objs: Vec<EndpointSlice> = vs.iter().filter_map(decode).collect();
                    index.reset(&objs, &[]);
                }
            }
            index.build();
            consistent(index.table());
            let _ = index.health_checks();
        }
    }
}

/// The generators are worth running: a good share of what they make
/// decodes and is accepted by the index, and tables with entries come out.
#[test]
fn the_generators_reach_the_index() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut decoded, mut accepted, mut non_empty) = (0, 0, 0);
    for _ in 0..300 {
        let svc = service().new_tree(&mut runner).unwrap().current();
        let slices = proptest::collection::vec(slice(), 1..3)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut index = Index::new(Some("node-a".into()), Vec::new());
        if let Some(s) = decode::<Service>(&svc) {
            decoded += 1;
            if index.apply(&s).is_ok() {
                accepted += 1;
            }
        }
        for v in &slices {
            if let Some(s) = decode::<EndpointSlice>(v) {
                let _ = index.apply(&s);
            }
        }
        index.build();
        if index.table().iter().any(|(_, s)| s.eligible_len() > 0) {
            non_empty += 1;
        }
    }
    assert!(decoded > 60, "decoded {decoded} of 300");
    assert!(accepted > 100, "accepted {accepted} of 300");
    assert!(
        non_empty > 12,
        "tables with eligible backends: {non_empty} of 300"
    );
}
