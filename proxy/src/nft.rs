//! sluice's own nftables table: Service traffic steered to the intercept
//! port by `redirect`, instead of sockets bound on Service IPs.
//!
//! # The table
//! One `table inet sluice` (one family, so one transaction and one
//! `nft list table inet sluice` cover IPv4 and IPv6; nat chains in the
//! `inet` family need Linux 5.2, older than any kernel Kubernetes
//! supports). kube-proxy's nftables mode uses `ip kube-proxy` and
//! `ip6 kube-proxy` only to support older kernels. Its chains mirror
//! kube-proxy's hooks and priorities:
//!
//! ```text
//! table inet sluice {
//!   set service-ips-v4 { type ipv4_addr . inet_proto . inet_service; elements = { 10.96.0.10 . tcp . 80, ... } }
//!   set service-ips-v6 { type ipv6_addr . inet_proto . inet_service; ... }
//!   chain nat-prerouting { type nat hook prerouting priority dstnat; ...   # traffic from pods and outside
//!     meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :PORT
//!     meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :PORT }
//!   chain nat-output { type nat hook output priority -100; ...           # node-originated traffic
//!     (the same two rules) }
//! }
//! ```
//!
//! The rules never change with the Services: a Service is a set element
//! (`address . protocol . port`, every listen key of the live table:
//! ClusterIPs, external IPs, LoadBalancer IPs and node ports on the node
//! addresses), so 10,000 Services are four rules and a change of one is one
//! element added or removed.
//!
//! # Pure and thin
//! [`Ruleset`] is the desired content computed from a [`Table`];
//! [`Ruleset::full_sync_script`], [`Ruleset::replace_script`] and
//! [`Ruleset::update_script`] render `nft -f` scripts as text (unit-tested
//! as text). [`apply`] runs `nft -f -` with a script on stdin, and
//! [`Programmer`] keeps what it applied last so that an update is a diff.
//!
//! # Atomicity (measured on Linux 6.18, nft 1.0.6)
//! One `nft -f` run is one netlink batch, committed as one transaction: a
//! script whose last line fails leaves the table exactly as it was, even
//! after a `delete table` earlier in the same script. An update only adds
//! and deletes elements. A full sync (start, adoption of the table a
//! previous sluice left, recovery after a failed update) declares the table,
//! its chains and sets (`add` is a no-op for what exists), flushes the
//! chains and sets and refills them, all in one transaction: the hooks stay
//! registered throughout, so a restarting sluice adopts the table with no
//! moment where traffic is unsteered. If that fails (a table of another
//! sluice version whose chain declarations differ), the table is deleted and
//! recreated, again in one transaction.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::process::Stdio;

use sluice_control::{ListenKey, Protocol, Table};
use tokio::io::AsyncWriteExt;

/// The family and name of sluice's table.
pub const TABLE: &str = "inet sluice";

/// Elements per `add element`/`delete element` statement (keeps lines short).
const CHUNK: usize = 1000;

/// One set element: `address . protocol . port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl From<&ListenKey> for Element {
    fn from(key: &ListenKey) -> Self {
        Self {
            addr: key.addr.ip(),
            protocol: key.protocol,
            port: key.addr.port(),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", self.addr, self.protocol, self.port)
    }
}

impl Element {
    fn set(&self) -> &'static str {
        match self.addr {
            IpAddr::V4(_) => "service-ips-v4",
            IpAddr::V6(_) => "service-ips-v6",
        }
    }
}

/// The desired content of sluice's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Where redirected connections go (sluice's intercept listeners).
    pub port: u16,
    /// Every steered `address . protocol . port`, both families.
    pub elements: BTreeSet<Element>,
}

impl Ruleset {
    /// The ruleset that steers every TCP listen key of `table` to `port`.
    /// UDP keys are left out (not served yet): their traffic is not
    /// redirected to a port that would drop it.
    pub fn from_table(table: &Table, port: u16) -> Self {
        Self {
            port,
            elements: table
                .keys()
                .filter(|k| k.protocol == Protocol::Tcp)
                .map(Element::from)
                .collect(),
        }
    }

    /// Declares the table, its sets and chains (a no-op for what exists),
    /// empties them and fills them with this ruleset: one transaction that
    /// never unhooks the chains.
    pub fn full_sync_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "add table {TABLE}");
        for (set, ty) in SETS {
            let _ = writeln!(s, "add set {TABLE} {set} {{ type {ty}; }}");
            let _ = writeln!(s, "flush set {TABLE} {set}");
        }
        for (chain, hook) in CHAINS {
            let _ = writeln!(s, "add chain {TABLE} {chain} {{ {hook}; policy accept; }}");
            let _ = writeln!(s, "flush chain {TABLE} {chain}");
            for rule in self.rules() {
                let _ = writeln!(s, "add rule {TABLE} {chain} {rule}");
            }
        }
        self.write_elements(&mut s, "add", self.elements.iter());
        s
    }

    /// Deletes the table whatever it holds and creates it anew with this
    /// ruleset, in one transaction (`add table` first, so that the delete
    /// succeeds when there is no table).
    pub fn replace_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "add table {TABLE}");
        let _ = writeln!(s, "delete table {TABLE}");
        s.push_str(&self.full_sync_script());
        s
    }

    /// The script that turns `old` (applied) into `self`: element adds and
    /// deletes only. `None` when there is nothing to do. A changed port
    /// changes the rules: that is a full sync.
    pub fn update_script(&self, old: &Ruleset) -> Option<String> {
        if self.port != old.port {
            return Some(self.full_sync_script());
        }
        let mut s = String::new();
        self.write_elements(&mut s, "delete", old.elements.difference(&self.elements));
        self.write_elements(&mut s, "add", self.elements.difference(&old.elements));
        (!s.is_empty()).then_some(s)
    }

    fn rules(&self) -> [String; 2] {
        let port = self.port;
        [
            format!(
                "meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :{port}"
            ),
            format!(
                "meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :{port}"
            ),
        ]
    }

    fn write_elements<'a>(
        &self,
        s: &mut String,
        verb: &str,
        elements: impl Iterator<Item = &'a Element>,
    ) {
        let (v4, v6): (Vec<&Element>, Vec<&Element>) = elements.partition(|e| e.addr.is_ipv4());
        for group in [v4, v6] {
            for chunk in group.chunks(CHUNK) {
                let Some(first) = chunk.first() else { continue };
                let _ = write!(s, "{verb} element {TABLE} {} {{ ", first.set());
                for (i, e) in chunk.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    let _ = write!(s, "{e}");
                }
                s.push_str(" }\n");
            }
        }
    }
}

/// Sluice's sets: name and type.
const SETS: [(&str, &str); 2] = [
    ("service-ips-v4", "ipv4_addr . inet_proto . inet_service"),
    ("service-ips-v6", "ipv6_addr . inet_proto . inet_service"),
];

/// Sluice's chains: name and declaration, kube-proxy's hooks and
/// priorities (`priority dstnat` is -100; nft before 1.0.7 accepts the
/// keyword only in prerouting, so output spells the number).
const CHAINS: [(&str, &str); 2] = [
    ("nat-prerouting", "type nat hook prerouting priority dstnat"),
    ("nat-output", "type nat hook output priority -100"),
];

/// Removes sluice's table if there is one (`sluice --cleanup`).
pub fn cleanup_script() -> String {
    format!("add table {TABLE}\ndelete table {TABLE}\n")
}

/// Why an `nft` run failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "the `nft` command was not found (install the Debian package `nftables`); it is needed by --intercept nftables and --cleanup"
    )]
    NotInstalled,
    #[error("cannot run `nft`: {0}")]
    Io(#[from] std::io::Error),
    #[error("`nft -f -` failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
}

/// Whether `nft` is installed and may read the ruleset (permissions): run
/// at start so that a missing `nft` stops sluice with a clear message.
pub async fn check() -> Result<(), NftError> {
    apply("list tables\n").await
}

/// Runs `nft -f -` with `script` on stdin: one transaction.
pub async fn apply(script: &str) -> Result<(), NftError> {
    apply_with("nft", script).await
}

async fn apply_with(program: &str, script: &str) -> Result<(), NftError> {
    let mut child = match tokio::process::Command::new(program)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(NftError::NotInstalled),
        Err(e) => return Err(e.into()),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A write error (nft exited early) shows up in its status and stderr.
        let _ = stdin.write_all(script.as_bytes()).await;
        drop(stdin);
    }
    let out = child.wait_with_output().await?;
    if out.status.success() {
        return Ok(());
    }
    Err(NftError::Failed {
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// How a [`Programmer::sync`] reached the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Nothing to change.
    Unchanged,
    /// Elements added/deleted.
    Updated { added: usize, deleted: usize },
    /// The table's content replaced (first sync, or recovery).
    Full,
}

/// Keeps sluice's table equal to a desired [`Ruleset`].
#[derive(Debug, Default)]
pub struct Programmer {
    /// What the kernel holds, as far as this process knows; `None` before
    /// the first successful sync and after a failed one.
    applied: Option<Ruleset>,
}

impl Programmer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the table hold `want`: a diff of what was applied last, else a
    /// full sync (and if even that fails, a delete-and-recreate).
    pub async fn sync(&mut self, want: &Ruleset) -> Result<Synced, NftError> {
        if let Some(applied) = self.applied.take() {
            let Some(script) = want.update_script(&applied) else {
                self.applied = Some(applied);
                return Ok(Synced::Unchanged);
            };
            if apply(&script).await.is_ok() {
                let added = want.elements.difference(&applied.elements).count();
                let deleted = applied.elements.difference(&want.elements).count();
                self.applied = Some(want.clone());
                return Ok(Synced::Updated { added, deleted });
            }
            // Someone changed the table under us: resync it whole.
        }
        if let Err(first) = apply(&want.full_sync_script()).await {
            if matches!(first, NftError::NotInstalled) {
                return Err(first);
            }
            apply(&want.replace_script()).await?;
        }
        self.applied = Some(want.clone());
        Ok(Synced::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{Policy, Service};
    use std::sync::Arc;

    fn table(keys: &[&str]) -> Table {
        let mut t = Table::new();
        for k in keys {
            let (addr, proto) = k.split_once('/').unwrap_or((k, "tcp"));
            let key = ListenKey {
                addr: addr.parse().unwrap(),
                protocol: if proto == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
            };
            t.insert(
                key,
                Arc::new(Service::new(*k, Policy::RoundRobin, None, Vec::new())),
            );
        }
        t
    }

    #[test]
    fn ruleset_has_every_tcp_key_and_no_udp() {
        let r = Ruleset::from_table(
            &table(&["10.96.0.10:53/udp", "10.96.0.10:53", "[fd00::1]:443"]),
            10261,
        );
        let shown: Vec<String> = r.elements.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, ["10.96.0.10 . tcp . 53", "fd00::1 . tcp . 443"]);
    }

    #[test]
    fn full_sync_declares_flushes_and_fills_in_one_script() {
        let r = Ruleset::from_table(
            &table(&["10.96.0.10:80", "192.168.1.10:31000", "[fd00::1]:443"]),
            10261,
        );
        let expected = "\
add table inet sluice
add set inet sluice service-ips-v4 { type ipv4_addr . inet_proto . inet_service; }
flush set inet sluice service-ips-v4
add set inet sluice service-ips-v6 { type ipv6_addr . inet_proto . inet_service; }
flush set inet sluice service-ips-v6
add chain inet sluice nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
flush chain inet sluice nat-prerouting
add rule inet sluice nat-prerouting meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :10261
add rule inet sluice nat-prerouting meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :10261
add chain inet sluice nat-output { type nat hook output priority -100; policy accept; }
flush chain inet sluice nat-output
add rule inet sluice nat-output meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :10261
add rule inet sluice nat-output meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :10261
add element inet sluice service-ips-v4 { 10.96.0.10 . tcp . 80, 192.168.1.10 . tcp . 31000 }
add element inet sluice service-ips-v6 { fd00::1 . tcp . 443 }
";
        assert_eq!(r.full_sync_script(), expected);
        assert!(!expected.contains("flush table"));
        let replace = r.replace_script();
        assert!(replace.starts_with("add table inet sluice\ndelete table inet sluice\n"));
        assert!(replace.ends_with(expected));
    }

    #[test]
    fn update_adds_and_deletes_elements_only() {
        let old = Ruleset::from_table(&table(&["10.96.0.10:80", "10.96.0.11:80"]), 10261);
        let new = Ruleset::from_table(&table(&["10.96.0.10:80", "[fd00::2]:8080"]), 10261);
        assert_eq!(
            new.update_script(&old).unwrap(),
            "delete element inet sluice service-ips-v4 { 10.96.0.11 . tcp . 80 }\n\
             add element inet sluice service-ips-v6 { fd00::2 . tcp . 8080 }\n"
        );
        assert_eq!(new.update_script(&new), None);
        // An empty table is an update too: every element deleted, nothing flushed.
        let empty = Ruleset::from_table(&Table::new(), 10261);
        let script = empty.update_script(&old).unwrap();
        assert_eq!(script.lines().count(), 1);
        assert!(script.starts_with("delete element"));
    }

    #[test]
    fn a_changed_port_is_a_full_sync() {
        let old = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10261);
        let new = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10262);
        let script = new.update_script(&old).unwrap();
        assert!(script.contains("flush chain inet sluice nat-output"));
        assert!(script.contains("redirect to :10262"));
    }

    #[test]
    fn ten_thousand_services_are_four_rules_and_chunked_elements() {
        let keys: Vec<String> = (0..10_000u32)
            .map(|i| format!("10.96.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = Ruleset::from_table(&table(&keys), 10261);
        let script = r.full_sync_script();
        assert_eq!(script.matches("add rule").count(), 4);
        assert_eq!(script.matches("add element").count(), 10);
        assert_eq!(script.matches(" . tcp . 80").count(), 10_000);
    }

    #[test]
    fn cleanup_deletes_only_sluices_table() {
        assert_eq!(
            cleanup_script(),
            "add table inet sluice\ndelete table inet sluice\n"
        );
    }

    #[tokio::test]
    async fn a_missing_nft_names_the_package() {
        let e = apply_with("/nonexistent/nft", "list tables\n")
            .await
            .unwrap_err();
        assert!(matches!(e, NftError::NotInstalled));
        assert!(e.to_string().contains("`nftables`"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_script_reports_nft_stderr() {
        // A shell script stands in for nft: reads the script, fails with a message.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nft");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncat >/dev/null\necho 'Error: boom' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = apply_with(fake.to_str().unwrap(), "add table inet sluice\n")
            .await
            .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("Error: boom"), "{shown}");
        assert!(shown.contains("nft -f -"), "{shown}");
    }
}
