//! Service addresses on a real device, each test in its own network
//! namespace (`sluice-test-*`, removed at the end even on failure).
//!
//! The code under test runs on a thread that `setns`es into the namespace,
//! with its own current-thread Tokio runtime, so its netlink and TCP sockets
//! are the namespace's. `ip` is used only to set up and to look from
//! outside. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_proxy::vip::{DEFAULT_INTERFACE, VipDevice, VipError};
use sluice_testkit::netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A network namespace for one test; deleted on drop (also on panic).
struct Netns(netns::Netns);

impl Netns {
    fn new(tag: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sluice-test-{tag}-{}-{n}", std::process::id());
        Netns(netns::Netns::new(name).unwrap())
    }

    /// Runs `ip -n NAME ARGS`, which must succeed (set-up only).
    fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap();
    }

    /// Whether `ip -n NAME ARGS` succeeds.
    fn ip_ok(&self, args: &[&str]) -> bool {
        self.0.ip(args).is_ok()
    }

    /// Adds an ifb device (left down).
    fn add_ifb(&self, dev: &str) {
        self.ip(&["link", "add", dev, "type", "ifb"]);
    }

    /// `ip -n NAME -j ARGS`, parsed.
    fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["-n", self.0.name(), "-j"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The addresses on `dev` as the kernel lists them to `ip`: (ip, prefix).
    fn addrs(&self, dev: &str) -> BTreeSet<(IpAddr, u8)> {
        let mut set = BTreeSet::new();
        for link in self
            .ip_json(&["address", "show", "dev", dev])
            .as_array()
            .unwrap()
        {
            for info in link["addr_info"].as_array().unwrap() {
                let ip: IpAddr = info["local"].as_str().unwrap().parse().unwrap();
                let prefix = u8::try_from(info["prefixlen"].as_u64().unwrap()).unwrap();
                set.insert((ip, prefix));
            }
        }
        set
    }

    /// Whether `dev` is administratively up.
    fn is_up(&self, dev: &str) -> bool {
        let json = self.ip_json(&["link", "show", "dev", dev]);
        json[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    }

    fn has_link(&self, dev: &str) -> bool {
        self.ip_ok(&["link", "show", "dev", dev])
    }

    /// Runs `f` inside the namespace on a thread of its own, with a
    /// current-thread runtime (so every socket it makes is the namespace's).
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        self.0.block_on(Duration::from_secs(30), f).unwrap()
    }
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn with_prefix(list: &[&str]) -> BTreeSet<(IpAddr, u8)> {
    list.iter()
        .map(|s| {
            let ip: IpAddr = s.parse().unwrap();
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        })
        .collect()
}

fn sorted(list: &[&str]) -> Vec<IpAddr> {
    ips(list).into_iter().collect()
}

#[test]
fn sync_on_ifb_adds_host_addresses_and_is_idempotent() {
    let ns = Netns::new("add");
    ns.add_ifb("vip0");
    let (first, second, owned, is_owned) = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let want = ips(&["198.51.100.1", "198.51.100.2", "2001:db8::1"]);
        let first = dev.sync(&want).await.unwrap();
        let second = dev.sync(&want).await.unwrap();
        let owned = dev.owned_addresses().await.unwrap();
        (first, second, owned, dev.is_owned())
    });
    assert!(!is_owned, "a --vip-interface device is shared");
    assert!(first.is_complete(), "{:?}", first.failed);
    assert_eq!(
        first.added,
        sorted(&["198.51.100.1", "198.51.100.2", "2001:db8::1"])
    );
    assert!(first.removed.is_empty() && first.kept.is_empty());
    // Idempotent: nothing to do the second time.
    assert!(second.added.is_empty() && second.removed.is_empty());
    assert_eq!(second.kept, first.added);
    assert_eq!(owned, ips(&["198.51.100.1", "198.51.100.2", "2001:db8::1"]));
    // What the kernel shows: exactly /32s and a /128 (nothing else: the
    // device is down, so no IPv6 link-local either).
    assert_eq!(
        ns.addrs("vip0"),
        with_prefix(&["198.51.100.1", "198.51.100.2", "2001:db8::1"])
    );
    assert!(!ns.is_up("vip0"), "sluice must not bring the device up");
}

#[test]
fn resync_with_smaller_set_removes_only_stale() {
    let ns = Netns::new("shrink");
    ns.add_ifb("vip0");
    let report = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let all = ips(&[
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.3",
            "2001:db8::1",
            "2001:db8::2",
        ]);
        let first = dev.sync(&all).await.unwrap();
        assert_eq!(first.added.len(), 5, "{first:?}");
        dev.sync(&ips(&["198.51.100.2", "2001:db8::2"]))
            .await
            .unwrap()
    });
    assert!(report.is_complete(), "{:?}", report.failed);
    assert_eq!(
        report.removed,
        sorted(&["198.51.100.1", "198.51.100.3", "2001:db8::1"])
    );
    assert_eq!(report.kept, sorted(&["198.51.100.2", "2001:db8::2"]));
    assert!(report.added.is_empty());
    assert_eq!(
        ns.addrs("vip0"),
        with_prefix(&["198.51.100.2", "2001:db8::2"])
    );
}

#[test]
fn addresses_of_others_on_the_device_survive() {
    let ns = Netns::new("foreign");
    ns.add_ifb("vip0");
    // Someone else's addresses, one of them also a Service IP sluice wants.
    ns.ip(&["address", "add", "198.51.100.50/32", "dev", "vip0"]);
    ns.ip(&["address", "add", "198.51.100.60/32", "dev", "vip0"]);
    ns.ip(&["address", "add", "203.0.113.1/24", "dev", "vip0"]);
    ns.ip(&["address", "add", "2001:db8::50/128", "dev", "vip0", "nodad"]);
    let (first, last) = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let first = dev
            .sync(&ips(&["198.51.100.1", "198.51.100.60", "2001:db8::1"]))
            .await
            .unwrap();
        let last = dev.sync(&BTreeSet::new()).await.unwrap();
        (first, last)
    });
    assert!(first.is_complete(), "{:?}", first.failed);
    assert_eq!(first.added, sorted(&["198.51.100.1", "2001:db8::1"]));
    assert_eq!(first.foreign, sorted(&["198.51.100.60"]));
    assert!(first.removed.is_empty(), "{first:?}");
    // Syncing to nothing removes exactly what sluice added.
    assert_eq!(last.removed, sorted(&["198.51.100.1", "2001:db8::1"]));
    let mut others = with_prefix(&["198.51.100.50", "198.51.100.60", "2001:db8::50"]);
    others.insert(("203.0.113.1".parse().unwrap(), 24));
    assert_eq!(ns.addrs("vip0"), others);
}

#[test]
fn shared_lo_keeps_its_own_addresses() {
    let ns = Netns::new("lo");
    let before = ns.addrs("lo");
    assert!(
        before.contains(&("127.0.0.1".parse().unwrap(), 8)),
        "{before:?}"
    );
    let (first, last) = ns.run(|| async {
        let mut dev = VipDevice::open(Some("lo")).await.unwrap();
        // 127.0.0.1 and ::1 are the kernel's: sluice does not take them.
        let first = dev
            .sync(&ips(&["198.51.100.9", "2001:db8::9", "127.0.0.1", "::1"]))
            .await
            .unwrap();
        let last = dev.sync(&BTreeSet::new()).await.unwrap();
        (first, last)
    });
    assert!(first.is_complete(), "{:?}", first.failed);
    assert_eq!(first.added, sorted(&["198.51.100.9", "2001:db8::9"]));
    assert_eq!(first.foreign, sorted(&["127.0.0.1", "::1"]));
    assert_eq!(last.removed, sorted(&["198.51.100.9", "2001:db8::9"]));
    assert_eq!(ns.addrs("lo"), before);
}

#[test]
fn next_run_cleans_what_a_previous_run_left() {
    let ns = Netns::new("rerun");
    ns.add_ifb("vip0");
    ns.ip(&["address", "add", "198.51.100.50/32", "dev", "vip0"]);
    let (seen, report) = ns.run(|| async {
        {
            // "Previous run": adds, then goes away without cleaning up.
            let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
            let r = dev
                .sync(&ips(&[
                    "198.51.100.1",
                    "198.51.100.2",
                    "2001:db8::1",
                    "2001:db8::2",
                ]))
                .await
                .unwrap();
            assert_eq!(r.added.len(), 4, "{r:?}");
        }
        // New run: a fresh handle recognises the leftovers by their mark only.
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let seen = dev.owned_addresses().await.unwrap();
        let report = dev
            .sync(&ips(&["198.51.100.2", "2001:db8::1"]))
            .await
            .unwrap();
        (seen, report)
    });
    assert_eq!(
        seen,
        ips(&["198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2"])
    );
    assert!(report.is_complete(), "{:?}", report.failed);
    assert_eq!(report.removed, sorted(&["198.51.100.1", "2001:db8::2"]));
    // Still served: kept, never removed and re-added.
    assert_eq!(report.kept, sorted(&["198.51.100.2", "2001:db8::1"]));
    assert!(report.added.is_empty());
    assert_eq!(
        ns.addrs("vip0"),
        with_prefix(&["198.51.100.2", "2001:db8::1", "198.51.100.50"])
    );
}

#[test]
fn default_dummy_device_or_clear_error() {
    let ns = Netns::new("dummy");
    // Does this kernel have the dummy driver? (Probe in the test's namespace.)
    let dummy_works = ns.ip_ok(&["link", "add", "probe0", "type", "dummy"]);
    let opened = ns.run(|| async {
        VipDevice::open(None)
            .await
            .map(|dev| (dev.name().to_owned(), dev.is_owned()))
    });
    if dummy_works {
        let (name, owned) = opened.unwrap();
        assert_eq!(name, DEFAULT_INTERFACE);
        assert!(owned);
        assert!(ns.has_link(DEFAULT_INTERFACE));
    } else {
        let err = opened.unwrap_err();
        assert!(
            matches!(&err, VipError::DummyUnsupported { name } if name == DEFAULT_INTERFACE),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("--vip-interface"), "{msg}");
        assert!(msg.contains("dummy"), "{msg}");
        assert!(!ns.has_link(DEFAULT_INTERFACE));
    }
}

#[test]
fn default_device_owns_every_address_on_it() {
    // The owned-device rule, on a device named sluice0 that already exists
    // (an ifb here, as this kernel may lack the dummy driver).
    let ns = Netns::new("owned");
    ns.add_ifb(DEFAULT_INTERFACE);
    ns.ip(&[
        "address",
        "add",
        "198.51.100.50/32",
        "dev",
        DEFAULT_INTERFACE,
    ]);
    ns.ip(&[
        "address",
        "add",
        "198.51.100.1/24",
        "dev",
        DEFAULT_INTERFACE,
    ]);
    let report = ns.run(|| async {
        let mut dev = VipDevice::open(None).await.unwrap();
        assert!(dev.is_owned());
        dev.sync(&ips(&["198.51.100.1"])).await.unwrap()
    });
    assert!(report.is_complete(), "{:?}", report.failed);
    // The stray /32 and the /24 are gone; the VIP is now a /32.
    assert_eq!(report.removed, sorted(&["198.51.100.1", "198.51.100.50"]));
    assert_eq!(report.added, sorted(&["198.51.100.1"]));
    assert_eq!(ns.addrs(DEFAULT_INTERFACE), with_prefix(&["198.51.100.1"]));
}

#[test]
fn missing_interface_is_named() {
    let ns = Netns::new("missing");
    let err = ns
        .run(|| async { VipDevice::open(Some("nosuch0")).await.map(|_| ()) })
        .unwrap_err();
    assert!(
        matches!(&err, VipError::InterfaceNotFound { name } if name == "nosuch0"),
        "{err:?}"
    );
    assert!(err.to_string().contains("nosuch0"));
    assert!(
        !ns.has_link("nosuch0"),
        "open(Some) must never create a device"
    );
}

#[test]
fn one_failing_address_does_not_stop_the_others() {
    let ns = Netns::new("fail");
    ns.add_ifb("vip0");
    // IPv6 off on the device: the kernel refuses IPv6 addresses there.
    netns::ip(&[
        "netns",
        "exec",
        ns.0.name(),
        "sysctl",
        "-qw",
        "net.ipv6.conf.vip0.disable_ipv6=1",
    ])
    .unwrap();
    let report = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        dev.sync(&ips(&[
            "198.51.100.1",
            "2001:db8::1",
            "224.0.0.5",
            "198.51.100.2",
        ]))
        .await
        .unwrap()
    });
    assert_eq!(report.added, sorted(&["198.51.100.1", "198.51.100.2"]));
    let failed: BTreeSet<IpAddr> = report.failed.iter().filter_map(|e| e.addr()).collect();
    assert_eq!(failed, ips(&["2001:db8::1", "224.0.0.5"]));
    for e in &report.failed {
        let msg = e.to_string();
        let addr = e.addr().unwrap().to_string();
        assert!(msg.contains(&addr), "{msg}");
    }
    assert!(matches!(
        report
            .failed
            .iter()
            .find(|e| e.addr() == Some("2001:db8::1".parse().unwrap())),
        Some(VipError::AddAddress { .. })
    ));
    assert_eq!(
        ns.addrs("vip0"),
        with_prefix(&["198.51.100.1", "198.51.100.2"])
    );
}

/// A listener bound on a VIP of a down device receives a connection made
/// from inside the namespace, over IPv4 and IPv6.
#[test]
fn listener_on_vip_of_down_device_accepts() {
    let ns = Netns::new("listen");
    ns.add_ifb("vip0");
    let echoed = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let report = dev
            .sync(&ips(&["198.51.100.7", "2001:db8::7"]))
            .await
            .unwrap();
        assert!(report.is_complete(), "{:?}", report.failed);
        let mut echoed = Vec::new();
        for vip in ["198.51.100.7:8080", "[2001:db8::7]:8080"] {
            let vip: SocketAddr = vip.parse().unwrap();
            let listener = tokio::net::TcpListener::bind(vip).await.unwrap();
            let server = tokio::spawn(async move {
                let (mut conn, peer) = listener.accept().await.unwrap();
                let mut buf = [0u8; 5];
                conn.read_exact(&mut buf).await.unwrap();
                conn.write_all(&buf).await.unwrap();
                peer
            });
            // Right after the namespace is made, a connect can briefly find
            // no route ("Network is unreachable", seen about one run in
            // three): retry that for a bounded time, fail on anything else.
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            let mut client = loop {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(vip),
                )
                .await
                .expect("connect timed out")
                {
                    Ok(c) => break c,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NetworkUnreachable
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("connect to {vip}: {e}"),
                }
            };
            client.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.unwrap();
            let peer = server.await.unwrap();
            assert_eq!(client.peer_addr().unwrap(), vip);
            echoed.push((vip, peer, back));
        }
        echoed
    });
    assert!(!ns.is_up("vip0"), "the device stayed down throughout");
    assert_eq!(echoed.len(), 2);
    for (vip, _peer, back) in echoed {
        assert_eq!(&back, b"hello", "via {vip}");
    }
}

/// On a down device that does duplicate address detection (a veth here),
/// an IPv6 address would stay tentative, and unbindable, without NODAD.
#[test]
fn ipv6_vip_on_down_dad_device_is_bindable_at_once() {
    let ns = Netns::new("dad");
    netns::add_veth(ns.0.name(), "vip0", ns.0.name(), "vip1").unwrap();
    let bound = ns.run(|| async {
        let mut dev = VipDevice::open(Some("vip0")).await.unwrap();
        let report = dev.sync(&ips(&["2001:db8::8"])).await.unwrap();
        assert_eq!(report.added, sorted(&["2001:db8::8"]), "{report:?}");
        tokio::net::TcpListener::bind("[2001:db8::8]:8080")
            .await
            .map(|l| l.local_addr().unwrap())
    });
    assert_eq!(bound.unwrap(), "[2001:db8::8]:8080".parse().unwrap());
    assert!(!ns.is_up("vip0"));
}
