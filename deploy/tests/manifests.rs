#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Checks sluice's deployment files without a cluster or a container engine.
//!
//! 1. `kustomization.yaml` lists every `.yaml` file under `deploy/`, and every
//!    file it lists exists.
//! 2. Every document of every listed manifest deserializes into its
//!    k8s-openapi type, and nothing is lost on the way: k8s-openapi ignores
//!    fields it does not know, so the original YAML is compared with the typed
//!    object serialized again. A field that did not survive is a typo, and the
//!    test names its path.
//! 3. The objects say what issue 5 asks of them (RBAC, DaemonSet, security
//!    context, probes, ...), and the Dockerfile agrees with the DaemonSet.
//!
//! The `*_fails_*` tests break a copy of the real manifests in memory, one
//! point at a time, and expect the checker to name what was broken: every
//! assertion below is seen failing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const APP_LABEL: &str = "app.kubernetes.io/name";
const APP: &str = "sluice";
const HEALTH_PORT: i32 = 10256;
const HEALTHZ_ARG: &str = "--healthz-bind-address=0.0.0.0:10256";
const METRICS_ARG: &str = "--metrics-bind-address=127.0.0.1:10249";
const CAPS: [&str; 2] = ["NET_ADMIN", "NET_BIND_SERVICE"];
const MIN_GRACE_SECONDS: i64 = 30;
/// sluice's own grace (`--shutdown-grace`) ends at least this long before
/// the kubelet's SIGKILL, so that the cut connections are counted and
/// logged and sluice exits on its own.
const GRACE_MARGIN_SECONDS: i64 = 5;
const SHUTDOWN_GRACE_ARG: &str = "--shutdown-grace=";
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
const REQUIRE_DIRECT_ARG: &str = "--require-direct-apiserver";
const APISERVER_CONFIGMAP: &str = "sluice-apiserver";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dockerfile_path() -> PathBuf {
    deploy_dir().join("..").join("Dockerfile")
}

/// One YAML document of one manifest file.
#[derive(Clone)]
struct Doc {
    file: String,
    value: Value,
}

// ---------------------------------------------------------------------------
// Loading

/// The `resources` of kustomization.yaml, after checking its keys.
fn kustomization_resources(text: &str) -> Result<Vec<String>, String> {
    let value: Value =
        serde_saphyr::from_str(text).map_err(|e| format!("kustomization.yaml: {e}"))?;
    let map = value
        .as_object()
        .ok_or("kustomization.yaml: not a mapping")?;
    // Only the keys this directory uses: a misspelt key (`resource:`,
    // `namspace:`) would otherwise be ignored by this test.
    let known = ["apiVersion", "kind", "namespace", "resources"];
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            return Err(format!(
                "kustomization.yaml: key `{key}` is not one this test knows ({known:?}); \
                 a typo, or teach deploy/tests/manifests.rs about it"
            ));
        }
    }
    if map.get("kind") != Some(&Value::from("Kustomization")) {
        return Err("kustomization.yaml: kind is not Kustomization".into());
    }
    let resources = map
        .get("resources")
        .and_then(Value::as_array)
        .ok_or("kustomization.yaml: no `resources` list")?;
    resources
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("kustomization.yaml: resource {r} is not a string"))
        })
        .collect()
}

/// Every .yaml/.yml file under `dir`, relative to it, without the crate's own
/// build output.
fn yaml_files(dir: &Path, rel: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        let rel = rel.join(&name);
        if path.is_dir() {
            if name != "target" {
                yaml_files(&path, &rel, out);
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
}

/// Splits a manifest into its YAML documents (empty documents skipped).
fn parse_docs(file: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("{file}: {e}"))?;
    for value in values {
        if !value.is_null() {
            docs.push(Doc {
                file: file.to_owned(),
                value,
            });
        }
    }
    Ok(docs)
}

/// Reads kustomization.yaml and every manifest it lists.
fn load() -> Result<Vec<Doc>, Vec<String>> {
    let dir = deploy_dir();
    let text =
        std::fs::read_to_string(dir.join("kustomization.yaml")).map_err(|e| vec![e.to_string()])?;
    let listed = kustomization_resources(&text).map_err(|e| vec![e])?;
    let mut problems = Vec::new();
    let mut on_disk = BTreeSet::new();
    yaml_files(&dir, Path::new(""), &mut on_disk);
    on_disk.remove("kustomization.yaml");
    for file in &on_disk {
        if !listed.iter().any(|l| l.trim_start_matches("./") == file) {
            problems.push(format!(
                "{file} is not listed in kustomization.yaml `resources`: `kubectl apply -k` would skip it"
            ));
        }
    }
    let mut docs = Vec::new();
    for file in &listed {
        match std::fs::read_to_string(dir.join(file)) {
            Err(e) => problems.push(format!("kustomization.yaml lists {file}: {e}")),
            Ok(text) => match parse_docs(file, &text) {
                Ok(mut d) => docs.append(&mut d),
                Err(e) => problems.push(e),
            },
        }
    }
    if problems.is_empty() {
        Ok(docs)
    } else {
        Err(problems)
    }
}

// ---------------------------------------------------------------------------
// Typed deserialization that rejects unknown fields

/// Paths present in `original` that are missing or different in `typed`.
fn lost_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (key, value) in o {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match t.get(key) {
                    None => out.push(format!(
                        "unknown field `{child}` (not in the Kubernetes API: a typo?)"
                    )),
                    Some(tv) => lost_fields(value, tv, &child, out),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) if o.len() == t.len() => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                lost_fields(ov, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ if original == typed => {}
        _ => out.push(format!(
            "field `{path}`: {original} reads back as {typed} (wrong type or shape?)"
        )),
    }
}

fn describe(doc: &Doc) -> String {
    let kind = doc.value.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = doc
        .value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{}: {kind}/{name}", doc.file)
}

/// The typed object (if it deserializes at all), and every field the typed
/// object lost: the object is still checked, so one typo does not hide the
/// other problems.
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc, problems: &mut Vec<String>) -> Option<T> {
    let what = describe(doc);
    let object: T = match serde_json::from_value(doc.value.clone()) {
        Ok(object) => object,
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            return None;
        }
    };
    match serde_json::to_value(&object) {
        Ok(back) => {
            let mut lost = Vec::new();
            lost_fields(&doc.value, &back, "", &mut lost);
            problems.extend(lost.into_iter().map(|l| format!("{what}: {l}")));
        }
        Err(e) => problems.push(format!("{what}: serializing again: {e}")),
    }
    Some(object)
}

#[derive(Default)]
struct Objects {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

fn to_objects(docs: &[Doc], problems: &mut Vec<String>) -> Objects {
    fn push<T: DeserializeOwned + Serialize>(
        doc: &Doc,
        into: &mut Vec<T>,
        problems: &mut Vec<String>,
    ) {
        into.extend(typed::<T>(doc, problems));
    }
    let mut objects = Objects::default();
    for doc in docs {
        let api_version = doc.value.get("apiVersion").and_then(Value::as_str);
        let kind = doc.value.get("kind").and_then(Value::as_str);
        match (api_version, kind) {
            (Some("v1"), Some("ServiceAccount")) => {
                push(doc, &mut objects.service_accounts, problems)
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                push(doc, &mut objects.cluster_roles, problems)
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                push(doc, &mut objects.bindings, problems)
            }
            (Some("apps/v1"), Some("DaemonSet")) => push(doc, &mut objects.daemon_sets, problems),
            _ => problems.push(format!(
                "{}: apiVersion {api_version:?} kind {kind:?} is not one sluice deploys \
                 (ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet)",
                describe(doc)
            )),
        }
    }
    objects
}

// ---------------------------------------------------------------------------
// What the objects must say

fn check_meta(
    what: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    p: &mut Vec<String>,
) {
    if let Some(ns) = &meta.namespace {
        p.push(format!(
            "{what}: metadata.namespace is {ns:?}: the manifests must be namespace-agnostic \
             (kustomization.yaml sets the namespace)"
        ));
    }
    let label = meta.labels.as_ref().and_then(|l| l.get(APP_LABEL));
    if label.map(String::as_str) != Some(APP) {
        p.push(format!(
            "{what}: label {APP_LABEL} is {label:?}, want {APP:?}"
        ));
    }
}

fn one<'a, T>(kind: &str, items: &'a [T], p: &mut Vec<String>) -> Option<&'a T> {
    match items {
        [one] => Some(one),
        _ => {
            p.push(format!("want exactly one {kind}, found {}", items.len()));
            None
        }
    }
}

fn check_cluster_role(role: &ClusterRole, p: &mut Vec<String>) {
    check_meta("ClusterRole", &role.metadata, p);
    if role.aggregation_rule.is_some() {
        p.push("ClusterRole: has an aggregationRule".into());
    }
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        if rule.non_resource_urls.is_some() {
            p.push(format!("ClusterRole: rules[{i}] grants nonResourceURLs"));
        }
        if rule.resource_names.is_some() {
            p.push(format!("ClusterRole: rules[{i}] restricts resourceNames"));
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    for extra in granted.difference(&wanted) {
        p.push(format!(
            "ClusterRole grants more than get/list/watch on services, endpointslices, nodes: \
             group {:?} resource {:?} verb {:?}",
            extra.0, extra.1, extra.2
        ));
    }
    for missing in wanted.difference(&granted) {
        p.push(format!(
            "ClusterRole does not grant group {:?} resource {:?} verb {:?}",
            missing.0, missing.1, missing.2
        ));
    }
}

fn check_binding(b: &ClusterRoleBinding, role: &str, account: &str, p: &mut Vec<String>) {
    check_meta("ClusterRoleBinding", &b.metadata, p);
    let r = &b.role_ref;
    if r.api_group.as_deref() != Some("rbac.authorization.k8s.io")
        || r.kind != "ClusterRole"
        || r.name != role
    {
        p.push(format!(
            "ClusterRoleBinding: roleRef is {:?}/{} {:?}, want ClusterRole {role:?}",
            r.api_group, r.kind, r.name
        ));
    }
    match b.subjects.as_deref() {
        Some([s]) => {
            if s.kind != "ServiceAccount" || s.name != account {
                p.push(format!(
                    "ClusterRoleBinding: subject is {} {:?}, want ServiceAccount {account:?}",
                    s.kind, s.name
                ));
            }
            if let Some(ns) = &s.namespace {
                p.push(format!(
                    "ClusterRoleBinding: subject namespace is {ns:?}: leave it out, kustomize \
                     fills it in from the ServiceAccount (an overlay's namespace would not \
                     reach a hard-coded one)"
                ));
            }
        }
        other => p.push(format!(
            "ClusterRoleBinding: want exactly one subject, found {}",
            other.map_or(0, <[_]>::len)
        )),
    }
}

/// The container port a probe's `port` names (a number or a port name).
fn probe_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.container_port),
    }
}

fn check_probe(c: &Container, which: &str, path: &str, p: &mut Vec<String>) {
    let probe = match which {
        "livenessProbe" => c.liveness_probe.as_ref(),
        _ => c.readiness_probe.as_ref(),
    };
    let Some(get) = probe.and_then(|pr| pr.http_get.as_ref()) else {
        p.push(format!("DaemonSet: container has no {which} with httpGet"));
        return;
    };
    if get.path.as_deref() != Some(path) {
        p.push(format!(
            "DaemonSet: {which} path is {:?}, want {path:?}",
            get.path
        ));
    }
    let port = probe_port(c, &get.port);
    if port != Some(HEALTH_PORT) {
        p.push(format!(
            "DaemonSet: {which} port {:?} is {port:?}, want the health port {HEALTH_PORT}",
            get.port
        ));
    }
    if let Some(scheme) = get.scheme.as_deref().filter(|s| *s != "HTTP") {
        p.push(format!(
            "DaemonSet: {which} scheme is {scheme}, the health port speaks HTTP"
        ));
    }
}

fn check_pod(pod: &PodSpec, account: &str, p: &mut Vec<String>) {
    if pod.service_account_name.as_deref() != Some(account) {
        p.push(format!(
            "DaemonSet: serviceAccountName is {:?}, want {account:?}",
            pod.service_account_name
        ));
    }
    if pod.host_network != Some(true) {
        p.push(format!(
            "DaemonSet: hostNetwork is {:?}, want true",
            pod.host_network
        ));
    }
    if pod.dns_policy.as_deref() != Some("Default") {
        p.push(format!(
            "DaemonSet: dnsPolicy is {:?}, want Default: cluster DNS is a Service only sluice serves",
            pod.dns_policy
        ));
    }
    if pod.dns_config.is_some() || pod.host_aliases.is_some() {
        p.push("DaemonSet: dnsConfig/hostAliases: sluice resolves with the node's resolver".into());
    }
    check_no_service_dependency(pod, p);
    if pod.priority_class_name.as_deref() != Some("system-node-critical") {
        p.push(format!(
            "DaemonSet: priorityClassName is {:?}, want system-node-critical",
            pod.priority_class_name
        ));
    }
    match pod.termination_grace_period_seconds {
        Some(s) if s >= MIN_GRACE_SECONDS => {}
        other => p.push(format!(
            "DaemonSet: terminationGracePeriodSeconds is {other:?}, want at least \
             {MIN_GRACE_SECONDS} to drain connections"
        )),
    }
    // A toleration with operator Exists and neither key nor effect tolerates
    // every taint: the proxy runs on every node.
    let everywhere =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    if !everywhere {
        p.push(
            "DaemonSet: no toleration {operator: Exists} without key and effect: \
             sluice would not run on tainted nodes"
                .into(),
        );
    }
    if pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        p.push("DaemonSet: hostPID/hostIPC are not needed".into());
    }

    check_no_host_ports(pod, p);
    check_migrate_req(pod, p);
    let Some(c) = one("container in the DaemonSet", &pod.containers, p) else {
        return;
    };
    check_shutdown_grace(c, pod.termination_grace_period_seconds, p);
    check_container(c, pod, p);
}

/// Under hostNetwork a containerPort is a host port: the surge pod would
/// not fit beside the old one. None may be declared.
fn check_no_host_ports(pod: &PodSpec, p: &mut Vec<String>) {
    if pod.host_network != Some(true) {
        return;
    }
    let all = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in all {
        if c.ports.as_ref().is_some_and(|ports| !ports.is_empty()) {
            p.push(format!(
                "DaemonSet: container {:?} declares containerPorts under hostNetwork: host \
                 ports block the surge pod of an upgrade",
                c.name
            ));
        }
    }
}

/// Some init container sets net.ipv4.tcp_migrate_req (queued connections
/// follow the hand-over).
fn check_migrate_req(pod: &PodSpec, p: &mut Vec<String>) {
    let sets_it = pod.init_containers.iter().flatten().any(|c| {
        c.command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .any(|a| a.contains(MIGRATE_REQ_SYSCTL) && a.contains("echo 1"))
    });
    if !sets_it {
        p.push(format!(
            "DaemonSet: no init container writes 1 to {MIGRATE_REQ_SYSCTL}: queued connections \
             would be reset at each upgrade"
        ));
    }
}

/// `--shutdown-grace=Ns` is given and ends at least
/// [`GRACE_MARGIN_SECONDS`] before terminationGracePeriodSeconds.
fn check_shutdown_grace(c: &Container, termination: Option<i64>, p: &mut Vec<String>) {
    let args = c.args.clone().unwrap_or_default();
    let grace = args
        .iter()
        .find_map(|a| a.strip_prefix(SHUTDOWN_GRACE_ARG))
        .map(|v| v.strip_suffix('s').and_then(|n| n.parse::<i64>().ok()));
    let Some(termination) = termination else {
        return; // reported by check_pod
    };
    match grace {
        None => p.push(format!(
            "DaemonSet: container args lack {SHUTDOWN_GRACE_ARG}<seconds>s: sluice's default \
             (30s) would not match terminationGracePeriodSeconds {termination}"
        )),
        Some(None) => p.push(format!(
            "DaemonSet: {SHUTDOWN_GRACE_ARG} is not a whole number of seconds (`590s`)"
        )),
        Some(Some(g)) if g <= 0 || g + GRACE_MARGIN_SECONDS > termination => p.push(format!(
            "DaemonSet: --shutdown-grace={g}s must end at least {GRACE_MARGIN_SECONDS}s before \
             terminationGracePeriodSeconds {termination}, so that sluice cuts and logs before \
             the kubelet's SIGKILL"
        )),
        Some(Some(_)) => {}
    }
}

/// Nothing in the pod spec names a Service (cluster DNS names): sluice must
/// start on a node where no Service is reachable yet.
fn check_no_service_dependency(pod: &PodSpec, p: &mut Vec<String>) {
    fn walk(v: &Value, path: &str, p: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                let lower = s.to_ascii_lowercase();
                if [".svc", "cluster.local", "kubernetes.default"]
                    .iter()
                    .any(|n| lower.contains(n))
                {
                    p.push(format!(
                        "DaemonSet: {path} is {s:?}, a Service name: sluice cannot depend on Services"
                    ));
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}/{i}"), p);
                }
            }
            Value::Object(map) => {
                for (k, item) in map {
                    walk(item, &format!("{path}/{k}"), p);
                }
            }
            _ => {}
        }
    }
    match serde_json::to_value(pod) {
        Ok(v) => walk(&v, "spec.template.spec", p),
        Err(e) => p.push(format!("DaemonSet: pod spec does not serialize: {e}")),
    }
}

fn check_container(c: &Container, pod: &PodSpec, p: &mut Vec<String>) {
    if c.command.is_some() {
        p.push(
            "DaemonSet: container sets `command`: the image's ENTRYPOINT is the sluice binary"
                .into(),
        );
    }
    let args = c.args.clone().unwrap_or_default();
    for want in [HEALTHZ_ARG, METRICS_ARG] {
        if !args.iter().any(|a| a == want) {
            p.push(format!("DaemonSet: container args {args:?} lack {want:?}"));
        }
    }
    if let Some(a) = args.iter().find(|a| a.starts_with("--kubeconfig")) {
        p.push(format!(
            "DaemonSet: {a:?}: sluice uses the in-cluster config"
        ));
    }
    if !args.iter().any(|a| a == REQUIRE_DIRECT_ARG) {
        p.push(format!(
            "DaemonSet: container args {args:?} lack {REQUIRE_DIRECT_ARG:?}: sluice would start \
             with the apiserver reachable only through a Service it serves"
        ));
    }
    let apiserver_ref = c
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref())
        .find(|r| r.name == APISERVER_CONFIGMAP);
    match apiserver_ref {
        None => p.push(format!(
            "DaemonSet: no envFrom configMapRef {APISERVER_CONFIGMAP:?}: the apiserver's real address"
        )),
        Some(r) if r.optional == Some(true) => p.push(format!(
            "DaemonSet: configMapRef {APISERVER_CONFIGMAP:?} is optional: without it sluice \
             would reach the apiserver through a Service it serves"
        )),
        Some(_) => {}
    }

    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
    let field = node_name
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    if field != Some("spec.nodeName") || node_name.is_some_and(|e| e.value.is_some()) {
        p.push(format!(
            "DaemonSet: env NODE_NAME comes from {field:?}, want the downward API fieldRef spec.nodeName"
        ));
    }

    let Some(sc) = c.security_context.as_ref() else {
        p.push("DaemonSet: container has no securityContext".into());
        return;
    };
    if sc.privileged != Some(false) {
        p.push(format!(
            "DaemonSet: privileged is {:?}, want false",
            sc.privileged
        ));
    }
    if sc.allow_privilege_escalation != Some(false) {
        p.push(format!(
            "DaemonSet: allowPrivilegeEscalation is {:?}, want false",
            sc.allow_privilege_escalation
        ));
    }
    if sc.read_only_root_filesystem != Some(true) {
        p.push(format!(
            "DaemonSet: readOnlyRootFilesystem is {:?}, want true",
            sc.read_only_root_filesystem
        ));
    }
    let pod_sc = pod.security_context.as_ref();
    let non_root = sc
        .run_as_non_root
        .or(pod_sc.and_then(|s| s.run_as_non_root));
    if non_root != Some(true) {
        p.push(format!(
            "DaemonSet: runAsNonRoot is {non_root:?}, want true"
        ));
    }
    match sc.run_as_user.or(pod_sc.and_then(|s| s.run_as_user)) {
        Some(uid) if uid > 0 => {}
        other => p.push(format!(
            "DaemonSet: runAsUser is {other:?}, want a fixed non-root uid"
        )),
    }
    let caps = sc.capabilities.as_ref();
    let mut add: Vec<String> = caps.and_then(|c| c.add.clone()).unwrap_or_default();
    add.sort();
    if add != CAPS {
        p.push(format!(
            "DaemonSet: capabilities.add is {add:?}, want exactly {CAPS:?}"
        ));
    }
    let drop = caps.and_then(|c| c.drop.clone()).unwrap_or_default();
    if drop != ["ALL"] {
        p.push(format!(
            "DaemonSet: capabilities.drop is {drop:?}, want [\"ALL\"]"
        ));
    }

    check_probe(c, "livenessProbe", "/livez", p);
    check_probe(c, "readinessProbe", "/readyz", p);

    let res = c.resources.as_ref();
    let requests = res.and_then(|r| r.requests.as_ref());
    for r in ["cpu", "memory"] {
        if !requests.is_some_and(|q| q.contains_key(r)) {
            p.push(format!("DaemonSet: no {r} request"));
        }
    }
    if !res
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key("memory"))
    {
        p.push("DaemonSet: no memory limit".into());
    }
}

fn check_daemon_set(ds: &DaemonSet, account: &str, p: &mut Vec<String>) {
    check_meta("DaemonSet", &ds.metadata, p);
    let spec = &ds.spec;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if template_labels.get(APP_LABEL).map(String::as_str) != Some(APP) {
        p.push(format!(
            "DaemonSet: pod template lacks label {APP_LABEL}: {APP}"
        ));
    }
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    if selector.is_empty()
        || selector
            .iter()
            .any(|(k, v)| template_labels.get(k) != Some(v))
    {
        p.push(format!(
            "DaemonSet: selector {selector:?} does not select the pod template's labels {template_labels:?}"
        ));
    }
    let strategy = spec.update_strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate") {
        p.push("DaemonSet: updateStrategy.type is not RollingUpdate".into());
    }
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let max_unavailable = rolling.and_then(|r| r.max_unavailable.as_ref());
    if max_unavailable != Some(&IntOrString::Int(0)) {
        p.push(format!(
            "DaemonSet: rollingUpdate.maxUnavailable is {max_unavailable:?}, want 0: a node \
             keeps its sluice until the new one is ready"
        ));
    }
    let max_surge = rolling.and_then(|r| r.max_surge.as_ref());
    if max_surge != Some(&IntOrString::Int(1)) {
        p.push(format!(
            "DaemonSet: rollingUpdate.maxSurge is {max_surge:?}, want 1: the new sluice starts \
             beside the old one"
        ));
    }
    match spec.template.spec.as_ref() {
        Some(pod) => check_pod(pod, account, p),
        None => p.push("DaemonSet: pod template has no spec".into()),
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile

struct Stage {
    image: String,
    name: Option<String>,
    /// (INSTRUCTION, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else if !trimmed.starts_with('#') {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        logical.push(current);
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let instruction = instruction.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if instruction == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                image: words.first().copied().unwrap_or("").to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((instruction, args));
        }
    }
    stages
}

fn runs(stage: &Stage) -> impl Iterator<Item = &str> {
    stage
        .instructions
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
}

/// `cargo build --release ... -p sluice` (or `--package sluice`) in a RUN.
fn builds_sluice_release(run: &str) -> bool {
    run.split("&&").any(|cmd| {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let Some(at) = words.windows(2).position(|w| w == ["cargo", "build"]) else {
            return false;
        };
        let rest = &words[at + 2..];
        rest.contains(&"--release")
            && (rest
                .windows(2)
                .any(|w| (w[0] == "-p" || w[0] == "--package") && w[1] == "sluice")
                || rest.contains(&"-p=sluice")
                || rest.contains(&"--package=sluice"))
    })
}

/// (capability names upper-cased without `cap_`, flags, target) of every
/// `setcap CAPS+FLAGS PATH` (not `setcap -v`) in a RUN.
fn setcaps(run: &str) -> Vec<(Vec<String>, String, String)> {
    let mut out = Vec::new();
    for cmd in run.split("&&") {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        if let ["setcap", spec, target] = words.as_slice() {
            let (caps, flags) = spec.split_once(['+', '=']).unwrap_or((spec, ""));
            let mut caps: Vec<String> = caps
                .split(',')
                .map(|c| c.trim_start_matches("cap_").to_ascii_uppercase())
                .collect();
            caps.sort();
            out.push((caps, flags.to_owned(), (*target).to_owned()));
        }
    }
    out
}

fn check_dockerfile(text: &str, ds: &DaemonSet, p: &mut Vec<String>) {
    let stages = parse_dockerfile(text);
    if stages.len() < 2 {
        p.push(format!(
            "Dockerfile: {} stage(s), want a build stage and a runtime stage",
            stages.len()
        ));
        return;
    }
    let build = &stages[0];
    let runtime = &stages[stages.len() - 1];

    if !(build.image.starts_with("rust:")
        && ["bookworm", "trixie", "bullseye"]
            .iter()
            .any(|d| build.image.contains(d)))
    {
        p.push(format!(
            "Dockerfile: build stage is FROM {}, want a Debian-based rust image",
            build.image
        ));
    }
    if !runs(build).any(builds_sluice_release) {
        p.push("Dockerfile: build stage has no `cargo build --release -p sluice`".into());
    }
    let minimal = (runtime.image.starts_with("debian:") && runtime.image.ends_with("-slim"))
        || runtime.image.starts_with("gcr.io/distroless/");
    if !minimal {
        p.push(format!(
            "Dockerfile: runtime stage is FROM {}, want a minimal image (debian:*-slim, distroless)",
            runtime.image
        ));
    }
    let build_name = build.name.as_deref().unwrap_or("0");
    let takes_from_build = runtime.instructions.iter().any(|(_, a)| {
        a.contains(&format!("from={build_name} ")) || a.contains(&format!("from={build_name},"))
    });
    if !takes_from_build {
        p.push(format!(
            "Dockerfile: the runtime stage takes nothing from the build stage {build_name:?}"
        ));
    }

    let pod = ds.spec.template.spec.as_ref();
    let c = pod.and_then(|pod| pod.containers.first());
    let sc = c.and_then(|c| c.security_context.as_ref());
    let pod_sc = pod.and_then(|pod| pod.security_context.as_ref());
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));

    let user = runtime
        .instructions
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone());
    match user
        .as_deref()
        .map(|u| u.split_once(':').unwrap_or((u, "")))
    {
        None => p.push("Dockerfile: runtime stage has no USER: it would run as root".into()),
        Some((uid, gid)) => match uid.parse::<i64>() {
            Ok(0) | Err(_) => p.push(format!(
                "Dockerfile: USER {uid:?} is not a numeric non-root uid (runAsNonRoot needs one)"
            )),
            Ok(uid) => {
                if run_as_user != Some(uid) {
                    p.push(format!(
                        "Dockerfile: USER {uid} but the DaemonSet's runAsUser is {run_as_user:?}"
                    ));
                }
                if !gid.is_empty() && run_as_group.is_some_and(|g| gid.parse() != Ok(g)) {
                    p.push(format!(
                        "Dockerfile: group {gid} but the DaemonSet's runAsGroup is {run_as_group:?}"
                    ));
                }
            }
        },
    }

    let entrypoint = runtime
        .instructions
        .iter()
        .rev()
        .find(|(i, _)| i == "ENTRYPOINT")
        .and_then(|(_, a)| serde_json::from_str::<Vec<String>>(a).ok());
    let Some(binary) = entrypoint.as_ref().and_then(|e| e.first()) else {
        p.push(
            "Dockerfile: runtime stage has no exec-form ENTRYPOINT [\"/path/to/sluice\"]".into(),
        );
        return;
    };
    if !binary.ends_with("/sluice") {
        p.push(format!(
            "Dockerfile: ENTRYPOINT runs {binary:?}, not the sluice binary"
        ));
    }
    // The file capabilities: set in the runtime stage on the binary that
    // ENTRYPOINT runs, exactly the capabilities the DaemonSet adds.
    let mut add: Vec<String> = sc
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    add.sort();
    let set: Vec<_> = runs(runtime).flat_map(setcaps).collect();
    match set.iter().find(|(_, _, target)| target == binary) {
        None => p.push(format!(
            "Dockerfile: the runtime stage does not `setcap` {binary}: a non-root process \
             gets no capability from the DaemonSet without file capabilities"
        )),
        Some((caps, flags, _)) => {
            if *caps != add {
                p.push(format!(
                    "Dockerfile: setcap gives {caps:?}, the DaemonSet adds {add:?}: they must be equal \
                     (more and the kernel refuses to exec, fewer and sluice lacks them)"
                ));
            }
            if !(flags.contains('e') && flags.contains('p')) {
                p.push(format!("Dockerfile: setcap flags {flags:?}, want +ep"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Putting it together

/// Every problem found in these documents and this Dockerfile.
fn check(docs: &[Doc], dockerfile: &str) -> Vec<String> {
    let mut p = Vec::new();
    let objects = to_objects(docs, &mut p);
    let account = one("ServiceAccount", &objects.service_accounts, &mut p);
    if let Some(sa) = account {
        check_meta("ServiceAccount", &sa.metadata, &mut p);
    }
    let account_name = account
        .and_then(|sa| sa.metadata.name.clone())
        .unwrap_or_default();
    let role = one("ClusterRole", &objects.cluster_roles, &mut p);
    if let Some(role) = role {
        check_cluster_role(role, &mut p);
    }
    let role_name = role
        .and_then(|r| r.metadata.name.clone())
        .unwrap_or_default();
    if let Some(b) = one("ClusterRoleBinding", &objects.bindings, &mut p) {
        check_binding(b, &role_name, &account_name, &mut p);
    }
    if let Some(ds) = one("DaemonSet", &objects.daemon_sets, &mut p) {
        check_daemon_set(ds, &account_name, &mut p);
        check_dockerfile(dockerfile, ds, &mut p);
    }
    p
}

fn report(problems: &[String]) -> String {
    let mut s = String::new();
    for problem in problems {
        let _ = writeln!(s, "  - {problem}");
    }
    s
}

fn real() -> (Vec<Doc>, String) {
    let docs = match load() {
        Ok(docs) => docs,
        Err(problems) => panic!("deploy/ is inconsistent:\n{}", report(&problems)),
    };
    let dockerfile = std::fs::read_to_string(dockerfile_path()).unwrap();
    (docs, dockerfile)
}

#[test]
fn manifests_and_dockerfile_say_what_sluice_needs() {
    let (docs, dockerfile) = real();
    let kinds: BTreeMap<String, usize> = docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(describe(d)).or_default() += 1;
        m
    });
    assert_eq!(kinds.len(), 4, "documents: {kinds:?}");
    let problems = check(&docs, &dockerfile);
    assert!(
        problems.is_empty(),
        "deploy/ or the Dockerfile is wrong:\n{}",
        report(&problems)
    );
}

// ---------------------------------------------------------------------------
// Each check, seen failing on a broken copy of the real files

/// Applies `mutate` to the document of `kind` and returns the problems found.
fn problems_after(kind: &str, mutate: impl FnOnce(&mut Value)) -> Vec<String> {
    let (mut docs, dockerfile) = real();
    let doc = docs
        .iter_mut()
        .find(|d| d.value.get("kind").and_then(Value::as_str) == Some(kind))
        .unwrap();
    mutate(&mut doc.value);
    check(&docs, &dockerfile)
}

fn assert_caught(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got:\n{}",
        report(problems)
    );
}

fn at<'a>(v: &'a mut Value, pointer: &str) -> &'a mut Value {
    v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} not in the manifest"))
}

/// A change to one manifest, in a table of cases.
type Mutation = Box<dyn FnOnce(&mut Value)>;

const POD: &str = "/spec/template/spec";
const CONTAINER: &str = "/spec/template/spec/containers/0";

#[test]
fn a_misspelt_field_fails_with_its_path() {
    let problems = problems_after("DaemonSet", |ds| {
        let sc = at(ds, CONTAINER).as_object_mut().unwrap();
        let value = sc.remove("securityContext").unwrap();
        sc.insert("securityContxt".into(), value);
    });
    assert_caught(
        &problems,
        "unknown field `spec.template.spec.containers[0].securityContxt`",
    );
    let problems = problems_after("ClusterRole", |role| {
        at(role, "/rules/0")
            .as_object_mut()
            .unwrap()
            .insert("verb".into(), serde_json::json!(["get"]));
    });
    assert_caught(&problems, "unknown field `rules[0].verb`");
    let problems = problems_after("DaemonSet", |ds| {
        *at(ds, &format!("{POD}/hostNetwork")) = Value::from("yes");
    });
    assert_caught(&problems, "DaemonSet/sluice: invalid type");
}

#[test]
fn an_unlisted_or_unknown_file_fails() {
    assert!(kustomization_resources("kind: Kustomization\nresource: [a.yaml]\n").is_err());
    assert!(kustomization_resources("kind: Kustomization\nresources: [a.yaml]\n").is_ok());
    let docs = parse_docs(
        "x.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    let (mut real_docs, dockerfile) = real();
    real_docs.extend(docs);
    assert_caught(&check(&real_docs, &dockerfile), "ConfigMap/x");
}

#[test]
fn rbac_beyond_read_only_or_short_of_it_fails() {
    let p = problems_after("ClusterRole", |r| {
        at(r, "/rules/0/verbs")
            .as_array_mut()
            .unwrap()
            .push("create".into());
    });
    assert_caught(&p, "verb \"create\"");
    let p = problems_after("ClusterRole", |r| {
        at(r, "/rules/1/resources")
            .as_array_mut()
            .unwrap()
            .push("pods".into());
    });
    assert_caught(&p, "resource \"pods\"");
    let p = problems_after("ClusterRole", |r| {
        *at(r, "/rules/1/apiGroups") = serde_json::json!(["*"]);
    });
    assert_caught(&p, "group \"*\"");
    let p = problems_after("ClusterRole", |r| {
        *at(r, "/rules/0/resources") = serde_json::json!(["services"]);
    });
    assert_caught(&p, "does not grant group \"\" resource \"nodes\"");
    let p = problems_after("ClusterRoleBinding", |b| {
        *at(b, "/subjects/0/name") = Value::from("default");
    });
    assert_caught(&p, "subject is ServiceAccount \"default\"");
    let p = problems_after("ClusterRoleBinding", |b| {
        at(b, "/subjects/0")
            .as_object_mut()
            .unwrap()
            .insert("namespace".into(), Value::from("kube-system"));
    });
    assert_caught(&p, "subject namespace");
    let p = problems_after("ClusterRoleBinding", |b| {
        *at(b, "/roleRef/name") = Value::from("cluster-admin");
    });
    assert_caught(&p, "roleRef");
}

#[test]
fn daemonset_pod_level_points_fail_when_broken() {
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "hostNetwork is Some(false), want true",
            Box::new(|d| *at(d, &format!("{POD}/hostNetwork")) = false.into()),
        ),
        (
            "dnsPolicy",
            Box::new(|d| *at(d, &format!("{POD}/dnsPolicy")) = "ClusterFirst".into()),
        ),
        (
            "dnsPolicy",
            Box::new(|d| *at(d, &format!("{POD}/dnsPolicy")) = "ClusterFirstWithHostNet".into()),
        ),
        (
            "dnsConfig/hostAliases",
            Box::new(|d| {
                at(d, POD).as_object_mut().unwrap().insert(
                    "dnsConfig".into(),
                    serde_json::json!({"nameservers": ["10.96.0.10"]}),
                );
            }),
        ),
        (
            "a Service name",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/env/0")) = serde_json::json!(
                    {"name": "KUBERNETES_SERVICE_HOST", "value": "kubernetes.default.svc"}
                )
            }),
        ),
        (
            "priorityClassName",
            Box::new(|d| {
                *at(d, &format!("{POD}/priorityClassName")) = "system-cluster-critical".into()
            }),
        ),
        (
            "terminationGracePeriodSeconds",
            Box::new(|d| *at(d, &format!("{POD}/terminationGracePeriodSeconds")) = 5.into()),
        ),
        (
            "toleration",
            Box::new(|d| {
                *at(d, &format!("{POD}/tolerations/0")) =
                    serde_json::json!({"operator": "Exists", "effect": "NoSchedule"})
            }),
        ),
        (
            "serviceAccountName",
            Box::new(|d| *at(d, &format!("{POD}/serviceAccountName")) = "default".into()),
        ),
        (
            "maxUnavailable",
            Box::new(|d| *at(d, "/spec/updateStrategy/rollingUpdate/maxUnavailable") = 1.into()),
        ),
        (
            "maxUnavailable",
            Box::new(|d| *at(d, "/spec/updateStrategy/rollingUpdate/maxUnavailable") = "0".into()),
        ),
        (
            "maxSurge is Some(Int(0)), want 1",
            Box::new(|d| *at(d, "/spec/updateStrategy/rollingUpdate/maxSurge") = 0.into()),
        ),
        (
            "maxSurge is None",
            Box::new(|d| {
                at(d, "/spec/updateStrategy/rollingUpdate")
                    .as_object_mut()
                    .unwrap()
                    .remove("maxSurge");
            }),
        ),
        (
            "declares containerPorts under hostNetwork",
            Box::new(|d| {
                at(d, CONTAINER).as_object_mut().unwrap().insert(
                    "ports".into(),
                    serde_json::json!([{"name": "healthz", "containerPort": 10256}]),
                );
            }),
        ),
        (
            "declares containerPorts under hostNetwork",
            Box::new(|d| {
                at(d, &format!("{POD}/initContainers/0"))
                    .as_object_mut()
                    .unwrap()
                    .insert("ports".into(), serde_json::json!([{"containerPort": 1}]));
            }),
        ),
        (
            "no init container writes 1 to /proc/sys/net/ipv4/tcp_migrate_req",
            Box::new(|d| {
                at(d, POD).as_object_mut().unwrap().remove("initContainers");
            }),
        ),
        (
            "no init container writes 1 to /proc/sys/net/ipv4/tcp_migrate_req",
            Box::new(|d| {
                *at(d, &format!("{POD}/initContainers/0/command/2")) =
                    "echo 0 > /proc/sys/net/ipv4/tcp_migrate_req".into()
            }),
        ),
        (
            "must end at least 5s before terminationGracePeriodSeconds",
            Box::new(|d| *at(d, &format!("{POD}/terminationGracePeriodSeconds")) = 592.into()),
        ),
        (
            "must end at least 5s before terminationGracePeriodSeconds",
            Box::new(|d| *at(d, &format!("{CONTAINER}/args/4")) = "--shutdown-grace=900s".into()),
        ),
        (
            "is not a whole number of seconds",
            Box::new(|d| *at(d, &format!("{CONTAINER}/args/4")) = "--shutdown-grace=10m".into()),
        ),
        (
            "lack --shutdown-grace=<seconds>s",
            Box::new(|d| *at(d, &format!("{CONTAINER}/args/4")) = "--log-format=json".into()),
        ),
        (
            "RollingUpdate",
            Box::new(|d| *at(d, "/spec/updateStrategy") = serde_json::json!({"type": "OnDelete"})),
        ),
        (
            "selector",
            Box::new(|d| *at(d, "/spec/selector/matchLabels") = serde_json::json!({"app": "x"})),
        ),
        (
            "metadata.namespace",
            Box::new(
                |d| *at(d, "/metadata") = serde_json::json!({"name": "sluice", "namespace": "kube-system", "labels": {APP_LABEL: APP}}),
            ),
        ),
        (
            "label app.kubernetes.io/name",
            Box::new(|d| *at(d, "/metadata/labels") = serde_json::json!({"app": "sluice"})),
        ),
    ];
    for (needle, mutate) in cases {
        assert_caught(&problems_after("DaemonSet", mutate), needle);
    }
}

#[test]
fn daemonset_container_points_fail_when_broken() {
    let sc = format!("{CONTAINER}/securityContext");
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "lack \"--healthz-bind-address=0.0.0.0:10256\"",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/args/0")) =
                    "--healthz-bind-address=0.0.0.0:10257".into()
            }),
        ),
        (
            "lack \"--require-direct-apiserver\"",
            Box::new(|d| *at(d, &format!("{CONTAINER}/args/2")) = "--log-format=json".into()),
        ),
        (
            "configMapRef \"sluice-apiserver\" is optional",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/envFrom/0/configMapRef/optional")) = true.into()
            }),
        ),
        (
            "no envFrom configMapRef \"sluice-apiserver\"",
            Box::new(|d| *at(d, &format!("{CONTAINER}/envFrom")) = serde_json::json!([])),
        ),
        (
            "lack \"--metrics-bind-address=127.0.0.1:10249\"",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/args/1")) =
                    "--metrics-bind-address=0.0.0.0:10249".into()
            }),
        ),
        (
            "in-cluster config",
            Box::new(|d| {
                at(d, &format!("{CONTAINER}/args"))
                    .as_array_mut()
                    .unwrap()
                    .push("--kubeconfig=/k".into())
            }),
        ),
        (
            "`command`",
            Box::new(|d| {
                at(d, CONTAINER)
                    .as_object_mut()
                    .unwrap()
                    .insert("command".into(), serde_json::json!(["/bin/sh"]));
            }),
        ),
        (
            "NODE_NAME",
            Box::new(|d| {
                *at(
                    d,
                    &format!("{CONTAINER}/env/0/valueFrom/fieldRef/fieldPath"),
                ) = "metadata.name".into()
            }),
        ),
        (
            "NODE_NAME",
            Box::new(|d| *at(d, &format!("{CONTAINER}/env")) = serde_json::json!([])),
        ),
        (
            "privileged is Some(true), want false",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/privileged")) = true.into()
            }),
        ),
        (
            "allowPrivilegeEscalation",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/allowPrivilegeEscalation")) = true.into()
            }),
        ),
        (
            "readOnlyRootFilesystem",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/readOnlyRootFilesystem")) = false.into()
            }),
        ),
        (
            "runAsNonRoot",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/runAsNonRoot")) = false.into()
            }),
        ),
        (
            "runAsUser is Some(0), want a fixed non-root uid",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/runAsUser")) = 0.into()
            }),
        ),
        (
            "capabilities.add",
            Box::new({
                let sc = sc.clone();
                move |d| {
                    at(d, &format!("{sc}/capabilities/add"))
                        .as_array_mut()
                        .unwrap()
                        .push("SYS_ADMIN".into())
                }
            }),
        ),
        (
            "capabilities.add",
            Box::new({
                let sc = sc.clone();
                move |d| {
                    *at(d, &format!("{sc}/capabilities/add")) = serde_json::json!(["NET_ADMIN"])
                }
            }),
        ),
        (
            "capabilities.drop",
            Box::new({
                let sc = sc.clone();
                move |d| *at(d, &format!("{sc}/capabilities/drop")) = serde_json::json!(["NET_RAW"])
            }),
        ),
        (
            "livenessProbe path",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/livenessProbe/httpGet/path")) = "/healthz".into()
            }),
        ),
        (
            "readinessProbe path",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/readinessProbe/httpGet/path")) = "/livez".into()
            }),
        ),
        (
            "livenessProbe port",
            Box::new(|d| *at(d, &format!("{CONTAINER}/livenessProbe/httpGet/port")) = 10249.into()),
        ),
        (
            "readinessProbe port",
            Box::new(|d| {
                *at(d, &format!("{CONTAINER}/readinessProbe/httpGet/port")) = "metrics".into()
            }),
        ),
        (
            "no readinessProbe",
            Box::new(|d| {
                at(d, CONTAINER)
                    .as_object_mut()
                    .unwrap()
                    .remove("readinessProbe");
            }),
        ),
        (
            "no cpu request",
            Box::new(|d| {
                at(d, &format!("{CONTAINER}/resources/requests"))
                    .as_object_mut()
                    .unwrap()
                    .remove("cpu");
            }),
        ),
        (
            "no memory limit",
            Box::new(|d| {
                at(d, &format!("{CONTAINER}/resources"))
                    .as_object_mut()
                    .unwrap()
                    .remove("limits");
            }),
        ),
    ];
    for (needle, mutate) in cases {
        assert_caught(&problems_after("DaemonSet", mutate), needle);
    }
}

#[test]
fn a_probe_on_a_named_port_needs_a_container_port_hostnetwork_forbids() {
    // No containerPorts under hostNetwork: a port name resolves to nothing.
    let p = problems_after("DaemonSet", |d| {
        *at(d, &format!("{CONTAINER}/livenessProbe/httpGet/port")) = "healthz".into();
    });
    assert_caught(&p, "livenessProbe port");
    // With the port declared it resolves, and the declaration is refused.
    let p = problems_after("DaemonSet", |d| {
        *at(d, &format!("{CONTAINER}/livenessProbe/httpGet/port")) = "healthz".into();
        at(d, CONTAINER).as_object_mut().unwrap().insert(
            "ports".into(),
            serde_json::json!([{"name": "healthz", "containerPort": 10256}]),
        );
    });
    assert_eq!(p.len(), 1, "{}", report(&p));
    assert_caught(&p, "declares containerPorts under hostNetwork");
}

#[test]
fn dockerfile_points_fail_when_broken() {
    let (docs, dockerfile) = real();
    let cases = [
        ("USER 65532:65532", "USER root", "numeric non-root uid"),
        ("USER 65532:65532", "USER 0", "numeric non-root uid"),
        (
            "USER 65532:65532",
            "USER 1000:1000",
            "but the DaemonSet's runAsUser is Some(65532)",
        ),
        ("USER 65532:65532", "", "no USER"),
        (
            "ENTRYPOINT [\"/usr/local/bin/sluice\"]",
            "ENTRYPOINT [\"/bin/sh\"]",
            "not the sluice binary",
        ),
        (
            "ENTRYPOINT [\"/usr/local/bin/sluice\"]",
            "ENTRYPOINT /usr/local/bin/sluice",
            "exec-form ENTRYPOINT",
        ),
        (
            "-p sluice",
            "-p sluice-bench",
            "cargo build --release -p sluice",
        ),
        ("--release", "", "cargo build --release -p sluice"),
        (
            "FROM debian:bookworm-slim",
            "FROM debian:bookworm",
            "minimal image",
        ),
        (
            "FROM rust:${RUST_VERSION}-bookworm",
            "FROM rust:${RUST_VERSION}-alpine",
            "Debian-based rust image",
        ),
        (
            "from=build,",
            "from=other,",
            "takes nothing from the build stage",
        ),
        (
            "setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/sluice \\\n    && setcap -v",
            "setcap cap_net_bind_service+ep /usr/local/bin/sluice \\\n    && setcap -v",
            "setcap gives",
        ),
        (
            "setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/sluice \\\n    && setcap -v",
            "setcap cap_net_admin,cap_net_bind_service+p /usr/local/bin/sluice \\\n    && setcap -v",
            "want +ep",
        ),
        (
            "setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/sluice \\\n    && setcap -v",
            "true \\\n    && setcap -v",
            "does not `setcap`",
        ),
    ];
    for (from, to, needle) in cases {
        assert!(
            dockerfile.contains(from),
            "the Dockerfile no longer contains {from:?}"
        );
        let broken = dockerfile.replacen(from, to, 1);
        assert_caught(&check(&docs, &broken), needle);
    }
}
