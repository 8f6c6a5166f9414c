//! Objects to feed the fixture, as JSON: a ClusterIP Service and its
//! EndpointSlice in namespace `default`, one TCP port named `http` each.

use serde_json::{Value, json};

/// Service `name` at cluster IP `ip`, port 80 ([`with_port`] changes it).
pub fn svc(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

/// EndpointSlice `name` of Service `svc`, endpoints `(ip, ready,
/// terminating)`, all serving, on port 8080 ([`with_port`] changes it).
pub fn slice(name: &str, svc: &str, eps: &[(&str, bool, bool)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, ready, term)| {
            json!({"addresses": [ip], "conditions": {"ready": ready, "serving": true, "terminating": term}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

/// `obj` ([`svc`] or [`slice`]) with its port number set to `port`.
pub fn with_port(mut obj: Value, port: u16) -> Value {
    let ports = match obj.get_mut("spec") {
        Some(spec) => &mut spec["ports"],
        None => &mut obj["ports"],
    };
    ports[0]["port"] = json!(port);
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_set_on_services_and_slices() {
        let s = with_port(svc("web", "10.96.0.1"), 8000);
        assert_eq!(s["spec"]["ports"][0]["port"], 8000);
        let e = with_port(slice("web-1", "web", &[("10.0.0.1", false, true)]), 9000);
        assert_eq!(e["ports"][0]["port"], 9000);
        assert_eq!(e["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        let c = &e["endpoints"][0]["conditions"];
        assert_eq!(
            (&c["ready"], &c["serving"], &c["terminating"]),
            (&json!(false), &json!(true), &json!(true))
        );
    }
}
