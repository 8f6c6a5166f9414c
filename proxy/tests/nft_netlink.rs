//! sluice's nftables table updated over nf_tables netlink, for real, in a
//! network namespace made here: a table applied with `nft -f`, then one
//! Service changed at a time over netlink, checked against `nft list
//! table inet sluice` and against the same ruleset applied whole with
//! `nft -f` in a second namespace. Needs root, `ip` and `nft`; skipped
//! with a message otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_control::{
    Backend, Cidr, Conditions, ListenKey, NoEndpoints, Policy, Protocol, Service, Settings, Table,
};
use sluice_proxy::nft::{Programmer, Ruleset, Synced};
use sluice_proxy::nft_netlink;
use sluice_testkit::netns;

macro_rules! require_root {
    () => {
        if let Some(why) = netns::unusable(&["ip", "nft"]) {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn netns() -> netns::Netns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    netns::Netns::new(format!("n-nftnl-{}-{n}", std::process::id())).unwrap()
}

fn key(k: &str) -> ListenKey {
    let (addr, proto) = k.split_once('/').unwrap_or((k, "tcp"));
    ListenKey {
        addr: addr.parse().unwrap(),
        protocol: if proto == "udp" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
    }
}

fn service(served: bool, settings: Settings) -> Arc<Service> {
    let ready = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    let backends = match served {
        true => vec![Backend::new("10.244.0.20:8080".parse().unwrap(), ready)],
        false => Vec::new(),
    };
    Arc::new(Service::new("svc", Policy::RoundRobin, None, backends).with_settings(settings))
}

fn ranges(v: &[&str]) -> Settings {
    Settings {
        source_ranges: v.iter().map(|c| c.parse::<Cidr>().unwrap()).collect(),
        ..Settings::default()
    }
}

/// Every kind of element: steered v4 and v6 keys, a rejected and a dropped
/// key, a firewalled LB key with two ranges, a UDP key with its port.
fn first_table() -> Table {
    let mut t = Table::new();
    for k in ["10.96.0.10:80", "10.96.0.11:443", "[fd00::10]:80"] {
        t.insert(key(k), service(true, Settings::default()));
    }
    t.insert(key("10.96.0.20:80"), service(false, Settings::default()));
    let drop = Settings {
        no_endpoints: NoEndpoints::Drop,
        ..Settings::default()
    };
    t.insert(key("192.168.50.1:30080"), service(false, drop));
    t.insert(
        key("203.0.113.8:80"),
        service(true, ranges(&["198.51.100.0/24", "10.0.0.0/8"])),
    );
    t.insert(
        key("[fd00:60::1]:443"),
        service(true, ranges(&["fd00:1::/64"])),
    );
    t.insert(key("10.96.0.53:53/udp"), service(true, Settings::default()));
    t
}

fn ruleset(t: &Table, udp: &[(&str, u16)]) -> Ruleset {
    let ports: Vec<(ListenKey, u16)> = udp.iter().map(|(k, p)| (key(k), *p)).collect();
    Ruleset::from_table(t, 10261).with_udp(ports.iter().map(|(k, p)| (k, *p)), (20000, 20009))
}

/// `nft list table inet sluice` in `ns`: the sets' and maps' lines only
/// (name and elements), normalised to one element per line.
fn listed(ns: &netns::Netns) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "nft",
            "list",
            "table",
            "inet",
            "sluice",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // Sets come first in the listing; chains after.
    let sets = text.split("\tchain ").next().unwrap();
    sets.replace(",\n", "\n")
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches("elements = { ")
                .trim_end_matches(" }")
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn sync(ns: &netns::Netns, programmer: Programmer, want: Ruleset) -> (Programmer, Synced) {
    ns.block_on(Duration::from_secs(20), move || async move {
        let mut programmer = programmer;
        let how = programmer.sync(&want).await.unwrap();
        (programmer, how)
    })
    .unwrap()
}

/// Applies `want` whole with `nft -f` in a fresh namespace and lists it.
fn reference(want: &Ruleset) -> String {
    let ns = netns();
    let script = want.full_sync_script();
    netns::run(
        "ip",
        &["netns", "exec", ns.name(), "nft", "-f", "-"],
        Some(&script),
    )
    .unwrap();
    listed(&ns)
}

/// What changed, the table after it, the UDP ports.
type Step = (&'static str, Table, Vec<(&'static str, u16)>);

#[test]
fn one_service_change_over_netlink_leaves_exactly_the_expected_elements() {
    require_root!();
    let ns = netns();
    let udp = [("10.96.0.53:53/udp", 20000)];
    let t1 = first_table();
    let r1 = ruleset(&t1, &udp);
    let (programmer, how) = sync(&ns, Programmer::new(), r1.clone());
    assert_eq!(how, Synced::Full);
    assert_eq!(listed(&ns), reference(&r1));

    // One change of each kind, each applied directly over netlink (no
    // fallback can hide a failure) and compared with the listing.
    let mut t = t1.clone();
    let mut steps: Vec<Step> = Vec::new();
    t.insert(key("10.96.0.10:80"), service(false, Settings::default()));
    steps.push(("endpoints gone: steered -> reject", t.clone(), udp.to_vec()));
    let drop = Settings {
        no_endpoints: NoEndpoints::Drop,
        ..Settings::default()
    };
    t.insert(key("10.96.0.10:80"), service(false, drop));
    steps.push(("reject -> drop", t.clone(), udp.to_vec()));
    t.insert(key("10.96.0.12:8080"), service(true, Settings::default()));
    steps.push(("a Service added", t.clone(), udp.to_vec()));
    t.remove(&key("[fd00::10]:80"));
    steps.push(("an IPv6 Service removed", t.clone(), udp.to_vec()));
    t.insert(
        key("203.0.113.8:80"),
        service(true, ranges(&["10.0.0.0/8"])),
    );
    steps.push(("a source range removed", t.clone(), udp.to_vec()));
    t.insert(
        key("[fd00:60::1]:443"),
        service(true, ranges(&["fd00:1::/64", "fd00:2::/48"])),
    );
    steps.push(("an IPv6 source range added", t.clone(), udp.to_vec()));
    steps.push((
        "a UDP key's port moved",
        t.clone(),
        vec![("10.96.0.53:53/udp", 20005)],
    ));

    let mut applied = r1;
    for (what, table, udp) in steps {
        let want = ruleset(&table, &udp);
        let ops = want.element_ops(&applied).unwrap();
        assert!(!ops.is_empty() && ops.len() <= 3, "{what}: {ops:?}");
        ns.block_on(Duration::from_secs(5), move || async move {
            nft_netlink::apply(&ops)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(listed(&ns), reference(&want), "after: {what}");
        applied = want;
    }
    let shown = listed(&ns);
    for line in [
        "10.96.0.10 . tcp . 80 : drop",
        "10.96.0.12 . tcp . 8080",
        "203.0.113.8 . tcp . 80 . 10.0.0.0/8",
        "fd00:60::1 . tcp . 443 . fd00:2::/48",
        "10.96.0.53 . 53 : 20005",
    ] {
        assert!(shown.lines().any(|l| l == line), "{line} not in:\n{shown}");
    }
    for gone in ["fd00::10 . tcp . 80", "198.51.100.0/24", ": 20000"] {
        assert!(!shown.contains(gone), "{gone} still in:\n{shown}");
    }

    // The programmer, which last applied r1, cannot delete what is gone
    // (over netlink, then `nft -f`): it resyncs the table whole.
    let (_, how) = sync(&ns, programmer, applied.clone());
    assert!(matches!(how, Synced::Full), "{how:?}"); // its deletes were gone: recovered
    assert_eq!(listed(&ns), reference(&applied));
}

#[test]
fn an_update_over_netlink_and_recovery_when_the_table_changed_underneath() {
    require_root!();
    let ns = netns();
    let t1 = first_table();
    let r1 = ruleset(&t1, &[]);
    let (programmer, how) = sync(&ns, Programmer::new(), r1.clone());
    assert_eq!(how, Synced::Full);
    let mut t2 = t1.clone();
    t2.insert(key("10.96.0.11:443"), service(false, Settings::default()));
    let r2 = ruleset(&t2, &[]);
    let (programmer, how) = sync(&ns, programmer, r2.clone());
    assert_eq!(
        how,
        Synced::Updated {
            added: 1,
            deleted: 1
        }
    );
    assert_eq!(listed(&ns), reference(&r2));

    // Someone deletes the element the next update deletes: the netlink
    // batch fails as a whole (nothing half-applied), so does the script,
    // and the full sync puts the table right.
    netns::run(
        "ip",
        &[
            "netns",
            "exec",
            ns.name(),
            "nft",
            "delete",
            "element",
            "inet",
            "sluice",
            "no-endpoint-services-v4",
            "{ 10.96.0.11 . tcp . 443 }",
        ],
        None,
    )
    .unwrap();
    let r3 = r1;
    let ops = r3.element_ops(&r2).unwrap();
    let failed = ns
        .block_on(Duration::from_secs(5), move || async move {
            nft_netlink::apply(&ops)
        })
        .unwrap();
    let e = failed.unwrap_err().to_string();
    assert!(e.contains("no-endpoint-services-v4"), "{e}");
    // Nothing of the failed batch was applied (its add of 10.96.0.11 to
    // service-ips came after the failed delete).
    assert!(!listed(&ns).contains("10.96.0.11 . tcp . 443"));
    let (_, how) = sync(&ns, programmer, r3.clone());
    assert_eq!(how, Synced::Full);
    assert_eq!(listed(&ns), reference(&r3));
}

/// The chains of sluice's table in `ns` (`nft list chains`).
fn chains(ns: &netns::Netns) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "list", "chains", "inet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_sluice_without_transparent_dials_removes_the_steer_chain_an_earlier_one_left() {
    require_root!();
    let ns = netns();
    let apply = |script: String| {
        netns::run(
            "ip",
            &["netns", "exec", ns.name(), "nft", "-f", "-"],
            Some(&script),
        )
        .unwrap();
    };
    let plain = ruleset(&first_table(), &[]);
    // The first sluice of the node, without transparent dials: the delete
    // of a chain that was never there is not an error.
    apply(plain.full_sync_script());
    assert!(!chains(&ns).contains("steer-replies"), "{}", chains(&ns));
    // A transparent one, then a plain one again (a restart with another
    // --source-ip): its full sync takes the chain and its mark away.
    apply(
        plain
            .clone()
            .with_steer_mark(Some(0x1000))
            .full_sync_script(),
    );
    assert!(
        chains(&ns).contains("chain steer-replies"),
        "{}",
        chains(&ns)
    );
    apply(plain.full_sync_script());
    let left = chains(&ns);
    assert!(!left.contains("steer-replies"), "{left}");
    assert!(
        left.contains("chain "),
        "the table's other chains stay: {left}"
    );
}
