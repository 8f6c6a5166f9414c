//! Parse tests: every default, every rejection with its message and the
//! position it is reported at; and the watch loop's decisions ([`Tracker`]).

use std::net::SocketAddr;

use super::*;
use crate::table::{Affinity, Conditions, ListenKey, Policy, ProxyProtocol};

/// Drops the first newline and the indentation common to all lines, so that
/// a test's YAML can be written indented in the source.
fn yaml(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn ok(text: &str) -> Table {
    match parse("t.yaml", &yaml(text)) {
        Ok(t) => t,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The error as (line, column, message), checking that Display is
/// `t.yaml:LINE:COLUMN: MESSAGE`.
fn err(text: &str) -> (usize, usize, String) {
    let e = parse("t.yaml", &yaml(text)).expect_err("should be rejected");
    let shown = e.to_string();
    let ConfigError::Invalid {
        path,
        position: Some(Position { line, column }),
        message,
    } = e
    else {
        panic!("no position: {shown}");
    };
    assert_eq!(path, "t.yaml");
    assert_eq!(shown, format!("t.yaml:{line}:{column}: {message}"));
    assert!(!shown.contains('\n'), "one line: {shown}");
    (line, column, message)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn only(table: &Table) -> (&ListenKey, &crate::table::Service) {
    assert_eq!(table.len(), 1);
    let (k, s) = table.iter().next().unwrap();
    (k, s)
}

const MINIMAL: &str = "
    services:
      - name: web
        listen: 127.0.0.1:8080
        backends:
          - address: 10.0.0.1:80
";

#[test]
fn defaults_of_a_minimal_service() {
    let t = ok(MINIMAL);
    let (key, svc) = only(&t);
    assert_eq!(*key, ListenKey::tcp(addr("127.0.0.1:8080")));
    assert_eq!(svc.name, "web");
    assert_eq!(svc.policy, Policy::RoundRobin);
    assert_eq!(svc.affinity, None);
    let b = &svc.backends()[0];
    assert_eq!(b.addr, addr("10.0.0.1:80"));
    assert_eq!(b.conditions, Conditions::READY);
    assert_eq!(b.weight, 1);
    assert_eq!(svc.eligible_len(), 1);
}

#[test]
fn every_field_given() {
    let t = ok("
        services:
          - backends:
              - weight: 7
                terminating: true
                serving: true
                ready: false
                address: 10.0.0.1:80
            affinity: { timeoutSeconds: 600 }
            policy: least-connections
            protocol: tcp
            listen: \"[::1]:8443\"
            name: api
    ");
    let (key, svc) = only(&t);
    assert_eq!(*key, ListenKey::tcp(addr("[::1]:8443")));
    assert_eq!(svc.name, "api");
    assert_eq!(svc.policy, Policy::LeastConnections);
    assert_eq!(
        svc.affinity,
        Some(Affinity {
            timeout: Duration::from_secs(600)
        })
    );
    let b = &svc.backends()[0];
    assert_eq!(b.conditions, Conditions::TERMINATING);
    assert_eq!(b.weight, 7);
}

#[test]
fn empty_services_is_an_empty_table() {
    assert!(ok("services: []").is_empty());
}

#[test]
fn empty_backends_is_a_service_with_none() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends: []
    ");
    assert_eq!(only(&t).1.backends().len(), 0);
}

#[test]
fn empty_affinity_means_the_default_timeout() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            affinity: {}
            backends: []
    ");
    assert_eq!(
        only(&t).1.affinity,
        Some(Affinity {
            timeout: Affinity::DEFAULT_TIMEOUT
        })
    );
    assert_eq!(Affinity::DEFAULT_TIMEOUT, Duration::from_secs(10_800));
}

#[test]
fn affinity_timeout_bounds_are_inclusive() {
    for secs in [1, 86_400] {
        let t = ok(&format!(
            "
            services:
              - name: web
                listen: 127.0.0.1:80
                affinity: {{ timeoutSeconds: {secs} }}
                backends: []
            "
        ));
        assert_eq!(
            only(&t).1.affinity.map(|a| a.timeout),
            Some(Duration::from_secs(secs))
        );
    }
}

#[test]
fn serving_defaults_to_ready() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - address: 10.0.0.1:80
                ready: false
              - address: 10.0.0.2:80
                ready: false
                serving: true
              - address: 10.0.0.3:80
                terminating: true
    ");
    let b = only(&t).1.backends();
    let not_ready = Conditions {
        ready: false,
        serving: false,
        terminating: false,
    };
    assert_eq!(b[0].conditions, not_ready);
    assert!(b[1].conditions.serving);
    assert!(!b[1].conditions.terminating);
    assert_eq!(
        b[2].conditions,
        Conditions {
            ready: true,
            serving: true,
            terminating: true
        }
    );
}

#[test]
fn weight_zero_is_valid_and_drains() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - { address: 10.0.0.1:80, weight: 0 }
              - { address: 10.0.0.2:80, weight: 4294967295 }
    ");
    let svc = only(&t).1;
    assert_eq!(svc.backends()[0].weight, 0);
    assert_eq!(svc.backends()[1].weight, u32::MAX);
    assert!(!svc.is_eligible(addr("10.0.0.1:80")));
}

#[test]
fn several_services() {
    let t = ok("
        services:
          - name: a
            listen: 127.0.0.1:80
            backends: []
          - name: b
            listen: 127.0.0.1:81
            backends: []
          - name: a   # names need not be unique: the key is the listen address
            listen: 127.0.0.2:80
            backends: []
    ");
    assert_eq!(t.len(), 3);
    assert_eq!(
        t.get(&ListenKey::tcp(addr("127.0.0.1:81"))).unwrap().name,
        "b"
    );
}

// ---- rejections, with the position they are reported at ----

#[test]
fn invalid_backend_address() {
    assert_eq!(
        err("
            services:
              - name: web
                listen: 127.0.0.1:80
                backends: []
              - name: api
                listen: 127.0.0.1:81
                backends:
                  - address: 10.0.0.1:80
                  - address: 10.0.0.1:99999
        "),
        (
            9,
            18,
            "services[1] \"api\": backends[1]: address: invalid socket address \
             \"10.0.0.1:99999\" (expected IP:port (IPv6 quoted: \"[::1]:80\"))"
                .into()
        )
    );
}

#[test]
fn backend_port_zero() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - address: 10.0.0.1:0
    ");
    assert_eq!((line, col), (5, 18));
    assert_eq!(
        msg,
        "services[0] \"web\": backend 10.0.0.1:0: port 0 is not a valid backend port"
    );
}

#[test]
fn invalid_listen_address() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: localhost:80
            backends: []
    ");
    assert_eq!((line, col), (3, 13));
    assert_eq!(
        msg,
        "services[0] \"web\": listen: invalid socket address \"localhost:80\" \
         (expected IP:port (IPv6 quoted: \"[::1]:80\"))"
    );
}

#[test]
fn unquoted_ipv6_listen_says_to_quote_it() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: [::1]:80
            backends: []
    ");
    assert_eq!((line, col), (3, 13));
    assert!(msg.contains("IPv6 quoted"), "{msg}");
    assert!(msg.ends_with("found a list"), "{msg}");
}

#[test]
fn duplicate_listen_names_both_services() {
    let (line, col, msg) = err("
        services:
          - name: a
            listen: 127.0.0.1:80
            backends: []
          - name: b
            listen: 127.0.0.1:81
            backends: []
          - name: c
            listen: 127.0.0.1:80
            backends: []
    ");
    assert_eq!((line, col), (9, 13));
    assert_eq!(
        msg,
        "services[2] \"c\": listen: 127.0.0.1:80 is already used by services[0] \"a\""
    );
}

#[test]
fn duplicate_backend_in_one_service() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - address: 10.0.0.1:80
              - address: 10.0.0.2:80
              - address: 10.0.0.1:80
    ");
    assert_eq!((line, col), (7, 18));
    assert_eq!(
        msg,
        "services[0] \"web\": backend 10.0.0.1:80: duplicate address (first listed as backends[0])"
    );
}

#[test]
fn same_backend_in_two_services_is_fine() {
    let t = ok("
        services:
          - name: a
            listen: 127.0.0.1:80
            backends: [{ address: 10.0.0.1:80 }]
          - name: b
            listen: 127.0.0.1:81
            backends: [{ address: 10.0.0.1:80 }]
    ");
    assert_eq!(t.len(), 2);
}

#[test]
fn bad_policy_lists_valid_values() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            policy: random
            backends: []
    ");
    assert_eq!((line, col), (4, 13));
    assert_eq!(
        msg,
        "services[0] \"web\": policy: unknown policy \"random\" (valid: round-robin, least-connections, maglev, source-hash)"
    );
    // Every scheduler is a policy value.
    for p in Policy::ALL {
        let t = ok(&format!(
            "services:\n  - {{name: web, listen: 127.0.0.1:80, policy: {p}, backends: []}}\n"
        ));
        assert_eq!(only(&t).1.policy, p);
    }
}

#[test]
fn udp_and_tcp_share_a_listen_address() {
    let t = ok("
        services:
          - name: dns
            listen: 127.0.0.1:53
            protocol: udp
            udpTimeoutSeconds: 5
            backends: [{address: 127.0.0.2:53}]
          - name: dns-tcp
            listen: 127.0.0.1:53
            backends: [{address: 127.0.0.2:53}]
    ");
    let addr = "127.0.0.1:53".parse().unwrap();
    let udp = t.get(&ListenKey::udp(addr)).unwrap();
    assert_eq!(udp.name, "dns");
    assert_eq!(udp.settings.udp_timeout, Some(Duration::from_secs(5)));
    let tcp = t.get(&ListenKey::tcp(addr)).unwrap();
    assert_eq!(tcp.name, "dns-tcp");
    assert_eq!(tcp.settings.udp_timeout, None);
}

#[test]
fn udp_resend_is_read_and_only_for_udp() {
    let t = ok("
        services:
          - name: syslog
            listen: 127.0.0.1:514
            protocol: udp
            udpResend: false
            backends: []
    ");
    let key = ListenKey::udp("127.0.0.1:514".parse().unwrap());
    assert_eq!(t.get(&key).unwrap().settings.udp_resend, Some(false));
    let (_, _, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            udpResend: true
            backends: []
    ");
    assert_eq!(
        msg,
        "services[0] \"web\": udpResend: is only for protocol: udp"
    );
}

#[test]
fn udp_timeout_is_checked() {
    let (line, col, msg) = err("
        services:
          - name: dns
            listen: 127.0.0.1:53
            protocol: udp
            udpTimeoutSeconds: 0
            backends: []
    ");
    assert_eq!((line, col), (5, 24));
    assert_eq!(
        msg,
        "services[0] \"dns\": udpTimeoutSeconds: 0 is out of range (valid: 1..=86400 seconds)"
    );
    let (_, _, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            udpTimeoutSeconds: 5
            backends: []
    ");
    assert_eq!(
        msg,
        "services[0] \"web\": udpTimeoutSeconds: is only for protocol: udp"
    );
    let (_, _, msg) = err("
        services:
          - name: dns
            listen: 127.0.0.1:53
            protocol: udp
            backends: []
          - name: dns2
            listen: 127.0.0.1:53
            protocol: udp
            backends: []
    ");
    assert_eq!(
        msg,
        "services[1] \"dns2\": listen: 127.0.0.1:53 is already used by services[0] \"dns\""
    );
    let (_, _, msg) = err("
        services:
          - name: x
            listen: 127.0.0.1:53
            protocol: TCP
            backends: []
    ");
    assert!(
        msg.contains("unknown protocol \"TCP\" (valid: tcp"),
        "{msg}"
    );
}

#[test]
fn affinity_timeout_out_of_range() {
    for (value, shown) in [("0", "0"), ("86401", "86401"), ("-5", "-5")] {
        let (line, col, msg) = err(&format!(
            "
            services:
              - name: web
                listen: 127.0.0.1:80
                affinity:
                  timeoutSeconds: {value}
                backends: []
            "
        ));
        assert_eq!((line, col), (5, 23), "{value}");
        assert_eq!(
            msg,
            format!(
                "services[0] \"web\": affinity.timeoutSeconds: {shown} is out of range \
                 (valid: 1..=86400 seconds)"
            )
        );
    }
}

#[test]
fn affinity_timeout_must_be_an_integer() {
    for (value, found) in [("ten", "\"ten\""), ("1.5", "1.5"), ("[600]", "a list")] {
        let expected = if value == "[600]" {
            "a single value"
        } else {
            "an integer"
        };
        let (line, col, msg) = err(&format!(
            "
            services:
              - name: web
                listen: 127.0.0.1:80
                affinity: {{ timeoutSeconds: {value} }}
                backends: []
            "
        ));
        assert_eq!((line, col), (4, 33), "{value}");
        assert_eq!(
            msg,
            format!(
                "services[0] \"web\": affinity.timeoutSeconds: expected {expected}, found {found}"
            )
        );
    }
    // A quoted number is read as the number.
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            affinity: { timeoutSeconds: \"600\" }
            backends: []
    ");
    assert_eq!(
        only(&t).1.affinity.map(|a| a.timeout),
        Some(Duration::from_secs(600))
    );
}

#[test]
fn null_affinity_is_an_error_not_a_default() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            affinity:
            backends: []
    ");
    assert_eq!((line, col), (4, 13));
    assert!(
        msg.contains("`affinity: {}` for the default timeout"),
        "{msg}"
    );
}

#[test]
fn empty_name() {
    for name in ["\"\"", "\"  \""] {
        let (line, col, msg) = err(&format!(
            "
            services:
              - listen: 127.0.0.1:80
                name: {name}
                backends: []
            "
        ));
        assert_eq!((line, col), (3, 11));
        assert_eq!(msg, "services[0]: name: must not be empty");
    }
}

#[test]
fn name_must_be_a_string() {
    let (line, _, msg) = err("
        services:
          - name: [a]
            listen: 127.0.0.1:80
            backends: []
    ");
    assert_eq!(line, 2);
    assert_eq!(
        msg,
        "services[0]: name: expected a single value, found a list"
    );
    let (line, col, msg) = err("
        services:
          - name: 5
            listen: 127.0.0.1:80
            backends: []
    ");
    assert_eq!((line, col), (2, 11));
    assert_eq!(
        msg,
        "services[0]: name: expected a string (quoted), found 5"
    );
}

#[test]
fn missing_required_fields_point_at_their_mapping() {
    let cases = [
        (
            "listen: 127.0.0.1:80\n    backends: []",
            "services[0]: missing field \"name\"",
        ),
        (
            "name: web\n    backends: []",
            "services[0] \"web\": missing field \"listen\"",
        ),
        (
            "name: web\n    listen: 127.0.0.1:80",
            "services[0] \"web\": missing field \"backends\" (write `backends: []` for none)",
        ),
        (
            "name: web\n    listen: 127.0.0.1:80\n    backends:\n      - weight: 2",
            "services[0] \"web\": backends[0]: missing field \"address\"",
        ),
    ];
    for (body, want) in cases {
        let text = format!(
            "services:\n  - name: other\n    listen: 127.0.0.1:1\n    backends: []\n  - {body}\n"
        );
        let e = parse("t.yaml", &text).unwrap_err();
        let pos = e.position().unwrap();
        let ConfigError::Invalid { message, .. } = e else {
            unreachable!()
        };
        assert_eq!(message, services_1(want));
        let want_line = if want.contains("address") { 8 } else { 5 };
        assert_eq!(pos.line, want_line, "{message}");
    }
    /// The cases above are written for index 0; they run as the second service.
    fn services_1(m: &str) -> String {
        m.replace("services[0]", "services[1]")
    }
}

#[test]
fn missing_services() {
    let (line, col, msg) = err("servics: []");
    assert_eq!((line, col), (1, 1));
    assert_eq!(
        msg,
        "top level: unknown field \"servics\" (valid: services)"
    );
    let (line, _, msg) = err("# nothing but a comment\nother: 1\n");
    assert_eq!(line, 2);
    assert!(msg.contains("unknown field \"other\""), "{msg}");
    let (_, _, msg) = err("{}");
    assert_eq!(
        msg,
        "top level: missing field \"services\" (write `services: []` for none)"
    );
}

#[test]
fn unknown_fields_at_every_level() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            lisen: 127.0.0.1:81
            backends: []
    ");
    assert_eq!((line, col), (4, 5));
    assert_eq!(
        msg,
        "services[0] \"web\": unknown field \"lisen\" (valid: name, listen, protocol, udpTimeoutSeconds, policy, affinity, maxConnections, idleTimeout, proxyProtocol, backends, noEndpoints, sourceRanges, udpResend, keepExternalClientIp)"
    );
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - address: 10.0.0.1:80
                wieght: 2
    ");
    assert_eq!((line, col), (6, 9));
    assert_eq!(
        msg,
        "services[0] \"web\": backend 10.0.0.1:80: unknown field \"wieght\" (valid: address, ready, serving, terminating, weight)"
    );
    let (line, _, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            affinity: { timeout: 5 }
            backends: []
    ");
    assert_eq!(line, 4);
    assert_eq!(
        msg,
        "services[0] \"web\": affinity: unknown field \"timeout\" (valid: timeoutSeconds)"
    );
    let (line, col, msg) = err("services: []\nextra: true\n");
    assert_eq!((line, col), (2, 1));
    assert!(
        msg.starts_with("top level: unknown field \"extra\""),
        "{msg}"
    );
}

#[test]
fn repeated_field_points_at_the_repeat() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends: []
            policy: round-robin
            policy: least-connections
    ");
    assert_eq!((line, col), (6, 5));
    assert_eq!(msg, "services[0] \"web\": field \"policy\" given twice");
}

#[test]
fn wrong_types() {
    let base = |backend: &str| {
        format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:80\n    backends:\n      - {backend}\n"
        )
    };
    let cases = [
        (
            "{ address: 10.0.0.1:80, ready: yes }",
            "services[0] \"web\": backend 10.0.0.1:80: ready: expected true or false, found \"yes\"",
        ),
        (
            "{ address: 10.0.0.1:80, serving: 1 }",
            "services[0] \"web\": backend 10.0.0.1:80: serving: expected true or false, found 1",
        ),
        (
            "{ address: 10.0.0.1:80, terminating: ~ }",
            "services[0] \"web\": backend 10.0.0.1:80: terminating: expected true or false, found nothing (null)",
        ),
        (
            "{ address: 10.0.0.1:80, weight: -1 }",
            "services[0] \"web\": backend 10.0.0.1:80: weight: expected an integer in 0..=4294967295, found -1",
        ),
        (
            "{ address: 10.0.0.1:80, weight: 4294967296 }",
            "services[0] \"web\": backend 10.0.0.1:80: weight: expected an integer in 0..=4294967295, found 4294967296",
        ),
        (
            "{ address: 10.0.0.1:80, weight: 1.5 }",
            "services[0] \"web\": backend 10.0.0.1:80: weight: expected an integer in 0..=4294967295, found 1.5",
        ),
        (
            "{ address: 8080 }",
            "services[0] \"web\": backends[0]: address: expected IP:port (IPv6 quoted: \"[::1]:80\"), found 8080",
        ),
        (
            "10.0.0.1:80",
            "services[0] \"web\": backends[0]: expected a mapping, found \"10.0.0.1:80\"",
        ),
    ];
    for (backend, want) in cases {
        let e = parse("t.yaml", &base(backend)).unwrap_err();
        assert_eq!(e.position().map(|p| p.line), Some(5), "{e}");
        let ConfigError::Invalid { message, .. } = e else {
            unreachable!()
        };
        assert_eq!(message, want);
    }
}

#[test]
fn services_must_be_a_list() {
    let (line, col, msg) = err("services:\n");
    assert_eq!((line, col), (1, 9));
    assert_eq!(
        msg,
        "services: expected a list (write `services: []` for none), found nothing (null)"
    );
    let (_, _, msg) = err("services: { name: web }");
    assert!(msg.ends_with("found a mapping"), "{msg}");
}

#[test]
fn empty_file_is_an_error_not_an_empty_table() {
    for text in ["", "\n", "# all commented out\n"] {
        let e = parse("t.yaml", text).unwrap_err();
        assert!(
            e.to_string()
                .contains("top level: expected a mapping with a `services:` list, found nothing"),
            "{e}"
        );
    }
}

#[test]
fn yaml_syntax_error_has_its_position() {
    let (line, col, msg) = err("
        services:
          - name: web
            listen: \"127.0.0.1:80
            backends: []
    ");
    assert!(msg.starts_with("invalid YAML: "), "{msg}");
    assert!(!msg.contains(&format!("line {line} column {col}")), "{msg}");
    assert!(line >= 3, "{line}:{col}: {msg}");
}

#[test]
fn several_documents_are_rejected() {
    let e = parse("t.yaml", "services: []\n---\nservices: []\n").unwrap_err();
    assert!(e.to_string().starts_with("t.yaml"), "{e}");
    assert!(e.to_string().contains("more than one document"), "{e}");
}

#[test]
fn name_after_the_error_still_names_the_service() {
    let (line, _, msg) = err("
        services:
          - listen: 127.0.0.1:80
            policy: fastest
            name: late
            backends: []
    ");
    assert_eq!(line, 3);
    assert!(msg.starts_with("services[0] \"late\": policy: "), "{msg}");
}

#[test]
fn invalid_utf8_has_a_position() {
    let e = parse_bytes("t.yaml", b"services: []\n# caf\xe9\n").unwrap_err();
    assert_eq!(e.to_string(), "t.yaml:2:6: not valid UTF-8");
}

#[test]
fn no_input_panics() {
    // Every prefix of a full example, and the example with each line
    // removed: errors or tables, never a panic.
    let text = include_str!("../../../../examples/basic.yaml");
    let mut cut = 0;
    for (i, _) in text.char_indices() {
        let _ = parse("t.yaml", &text[..i]);
        cut += 1;
    }
    let lines: Vec<&str> = text.lines().collect();
    for skip in 0..lines.len() {
        let mut without = lines.clone();
        without.remove(skip);
        let _ = parse("t.yaml", &without.join("\n"));
    }
    assert!(cut > 100);
    for odd in [
        "*a",
        "&a [*a, *a]",
        "!!binary aGk=",
        "? [a]\n: b",
        "services: !!set {a}",
        "services: [&x {name: a, listen: 127.0.0.1:1, backends: []}, *x]",
        "services: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "\u{feff}services: []",
        "services: [{<<: {name: a}, listen: 127.0.0.1:1, backends: []}]",
        "services: [{ name: a, listen: 127.0.0.1:1, backends: [], 18446744073709551616000000000000000000000: 1 }]",
    ] {
        let _ = parse("t.yaml", odd);
    }
}

#[test]
fn messages_stay_one_line_and_short() {
    let long = "x".repeat(500);
    let (_, _, msg) = err(&format!(
        "
        services:
          - name: \"two\\nlines\"
            listen: 127.0.0.1:80
            policy: {long}
            backends:
              - address: \"10.0.0.1:80\\n\"
        "
    ));
    assert!(
        msg.starts_with("services[0] \"two\\nlines\": policy: unknown policy \"xxx"),
        "{msg}"
    );
    assert!(msg.len() < 200, "{msg}");
    let (_, _, msg) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            backends:
              - address: \"10.0.0.1:80\\n\"
        ");
    assert_eq!(
        msg,
        "services[0] \"web\": backends[0]: address: invalid socket address \
         \"10.0.0.1:80\\n\" (expected IP:port (IPv6 quoted: \"[::1]:80\"))"
    );
}

#[test]
fn alias_of_a_whole_service_is_a_duplicate_listen() {
    let e = parse(
        "t.yaml",
        "services: [&x {name: a, listen: 127.0.0.1:1, backends: []}, *x]",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("already used by services[0] \"a\""),
        "{e}"
    );
}

// ---- the watch loop's decisions ----

const TWO: &str = "services:
  - { name: a, listen: 127.0.0.1:1, backends: [{ address: 10.0.0.1:80 }] }
  - { name: b, listen: 127.0.0.1:2, backends: [] }
";

fn read_err(kind: io::ErrorKind) -> Result<Vec<u8>, ConfigError> {
    Err(ConfigError::Read {
        path: "t.yaml".into(),
        source: io::Error::from(kind),
    })
}

#[test]
fn tracker_publishes_good_content_once() {
    let p = Publisher::new();
    let mut t = Tracker::new("t.yaml".into());
    assert_eq!(
        t.check(Ok(TWO.into()), Reload::Polled, &p),
        Outcome::Published(1)
    );
    assert_eq!(
        t.check(Ok(TWO.into()), Reload::Polled, &p),
        Outcome::SameContent
    );
    // Same table in different bytes: parsed, nothing published.
    let reordered = format!("# a comment\n{TWO}");
    assert_eq!(
        t.check(Ok(reordered.into()), Reload::Polled, &p),
        Outcome::SameTable
    );
    assert_eq!(p.snapshot().generation, 1);
    assert_eq!(t.error(), None);
}

#[test]
fn tracker_keeps_the_last_good_table_on_bad_content() {
    let p = Publisher::new();
    let mut t = Tracker::new("t.yaml".into());
    t.check(Ok(TWO.into()), Reload::Polled, &p);
    let live = p.load();
    let bad = "services: [{ name: a }]\n";
    assert_eq!(
        t.check(Ok(bad.into()), Reload::Polled, &p),
        Outcome::Failed { logged: true }
    );
    // The same bad bytes again: not parsed, not logged again.
    assert_eq!(
        t.check(Ok(bad.into()), Reload::Polled, &p),
        Outcome::SameContent
    );
    assert_eq!(p.snapshot().generation, 1);
    assert_eq!(*p.load(), *live);
    assert!(t.error().unwrap().contains("missing field \"listen\""));
    // A reload (SIGHUP) reports it again.
    assert_eq!(
        t.check(Ok(bad.into()), Reload::Forced, &p),
        Outcome::Failed { logged: true }
    );
    // Back to the good content: valid again, same table, no new generation.
    assert_eq!(
        t.check(Ok(TWO.into()), Reload::Polled, &p),
        Outcome::SameTable
    );
    assert_eq!(t.error(), None);
}

#[test]
fn tracker_logs_a_read_error_once_per_distinct_error() {
    let p = Publisher::new();
    let mut t = Tracker::new("t.yaml".into());
    t.check(Ok(TWO.into()), Reload::Polled, &p);
    let missing = || read_err(io::ErrorKind::NotFound);
    assert_eq!(
        t.check(missing(), Reload::Polled, &p),
        Outcome::Failed { logged: true }
    );
    assert_eq!(
        t.check(missing(), Reload::Polled, &p),
        Outcome::Failed { logged: false }
    );
    assert_eq!(
        t.check(missing(), Reload::Polled, &p),
        Outcome::Failed { logged: false }
    );
    assert_eq!(
        t.check(
            read_err(io::ErrorKind::PermissionDenied),
            Reload::Polled,
            &p
        ),
        Outcome::Failed { logged: true }
    );
    assert_eq!(p.snapshot().generation, 1);
    assert!(t.error().unwrap().starts_with("t.yaml: cannot read: "));
    // The file is back with the same bytes: parsed again, error cleared.
    assert_eq!(
        t.check(Ok(TWO.into()), Reload::Polled, &p),
        Outcome::SameTable
    );
    assert_eq!(t.error(), None);
}

#[test]
fn tracker_after_read_error_finds_bad_content_still_bad() {
    let p = Publisher::new();
    let mut t = Tracker::new("t.yaml".into());
    let bad = "services: 1\n";
    assert_eq!(
        t.check(Ok(bad.into()), Reload::Polled, &p),
        Outcome::Failed { logged: true }
    );
    t.check(read_err(io::ErrorKind::NotFound), Reload::Polled, &p);
    assert_eq!(
        t.check(Ok(bad.into()), Reload::Polled, &p),
        Outcome::Failed { logged: true }
    );
    assert!(t.error().unwrap().contains("services: expected a list"));
    assert_eq!(p.snapshot().generation, 0);
}

#[test]
fn read_refuses_what_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = read(dir.path()).unwrap_err();
    assert!(
        e.to_string().ends_with("cannot read: not a regular file"),
        "{e}"
    );
    // A FIFO would block the reader forever: refused before opening.
    let fifo = dir.path().join("fifo.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(load(&fifo).map(|_| ())));
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("load() blocked on a FIFO")
        .unwrap_err();
    assert!(
        e.to_string().ends_with("cannot read: not a regular file"),
        "{e}"
    );
    let e = load(dir.path().join("absent.yaml")).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    );
    assert!(e.to_string().contains("absent.yaml: cannot read: "), "{e}");
}

/// Runs `f` with the logs captured, one string per line.
fn logs(f: impl FnOnce()) -> Vec<String> {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    out.lines().map(str::to_owned).collect()
}

#[test]
fn logs_say_what_changed_once() {
    let p = Publisher::new();
    let mut t = Tracker::new("t.yaml".into());
    let bad = "services: [{ name: a }]\n";
    let v2 = "services:
  - { name: a, listen: 127.0.0.1:1, backends: [] }
  - { name: c, listen: 127.0.0.1:3, backends: [] }
";
    let lines = logs(|| {
        t.check(Ok(TWO.into()), Reload::Polled, &p);
        for _ in 0..5 {
            t.check(Ok(TWO.into()), Reload::Polled, &p);
        }
        for _ in 0..5 {
            t.check(Ok(bad.into()), Reload::Polled, &p);
        }
        for _ in 0..5 {
            t.check(read_err(io::ErrorKind::NotFound), Reload::Polled, &p);
        }
        t.check(Ok(v2.into()), Reload::Polled, &p);
    });
    assert_eq!(
        lines,
        [
            " INFO t.yaml: configuration loaded, generation 1 (2 services)",
            "ERROR t.yaml:1:12: services[0] \"a\": missing field \"listen\"; keeping the last good table (generation 1)",
            "ERROR t.yaml: cannot read: entity not found; keeping the last good table (generation 1)",
            " INFO t.yaml: configuration loaded, generation 2 (2 services)",
        ]
    );
}

// ---- the document types ----

#[test]
fn documents_round_trip_through_yaml() {
    let doc = ConfigDoc::new(vec![
        ServiceDoc::new(
            "web",
            addr("127.0.0.1:8080"),
            vec![
                BackendDoc::ready(addr("10.0.0.1:80")),
                BackendDoc::terminating(addr("10.0.0.2:80")).with_weight(3),
                BackendDoc::not_ready(addr("10.0.0.3:80")).with_weight(0),
            ],
        ),
        ServiceDoc::new("api", addr("[::1]:8443"), vec![])
            .with_policy(Policy::LeastConnections)
            .with_affinity(600),
    ]);
    let text = doc.to_yaml().unwrap();
    assert_eq!(serde_saphyr::from_str::<ConfigDoc>(&text).unwrap(), doc);
    let table = parse("t.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let backend = |a: &str, conditions, weight| crate::table::Backend {
        addr: addr(a),
        conditions,
        weight,
    };
    let not_ready = Conditions {
        ready: false,
        serving: false,
        terminating: false,
    };
    let mut want = Table::new();
    want.insert(
        ListenKey::tcp(addr("127.0.0.1:8080")),
        Arc::new(crate::table::Service::new(
            "web",
            Policy::RoundRobin,
            None,
            vec![
                backend("10.0.0.1:80", Conditions::READY, 1),
                backend("10.0.0.2:80", Conditions::TERMINATING, 3),
                backend("10.0.0.3:80", not_ready, 0),
            ],
        )),
    );
    want.insert(
        ListenKey::tcp(addr("[::1]:8443")),
        Arc::new(crate::table::Service::new(
            "api",
            Policy::LeastConnections,
            Some(Affinity {
                timeout: Duration::from_secs(600),
            }),
            vec![],
        )),
    );
    assert_eq!(table, want, "{text}");
}

#[test]
fn no_endpoints_and_source_ranges_for_nftables_mode() {
    let t = ok(r#"
        services:
          - name: lb
            listen: 192.0.2.8:80
            backends: []
            noEndpoints: drop
            sourceRanges: [10.0.0.0/8, " 198.51.100.7/32 "]
        "#);
    let (_, s) = only(&t);
    assert_eq!(s.settings.no_endpoints, crate::table::NoEndpoints::Drop);
    let ranges: Vec<String> = s
        .settings
        .source_ranges
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(ranges, ["10.0.0.0/8", "198.51.100.7/32"]);
    // Defaults: reject, every source.
    let t = ok("
        services:
          - {name: web, listen: 192.0.2.8:80, backends: []}
        ");
    let (_, s) = only(&t);
    assert_eq!(s.settings, crate::table::Settings::default());
    // A range of the other family would never match: rejected.
    let (line, _, message) = err(r#"
        services:
          - name: lb
            listen: 192.0.2.8:80
            backends: []
            sourceRanges: ["fd00::/8"]
        "#);
    assert_eq!(line, 5, "{message}");
    assert!(
        message.contains("fd00::/8 is not of the family of listen 192.0.2.8:80"),
        "{message}"
    );
    let (_, _, message) = err("
        services:
          - {name: lb, listen: 192.0.2.8:80, backends: [], sourceRanges: [10.0.0.0/40]}
        ");
    assert!(
        message.contains("\"10.0.0.0/40\" is not a CIDR"),
        "{message}"
    );
    let (_, _, message) = err("
        services:
          - {name: lb, listen: 192.0.2.8:80, backends: [], noEndpoints: refuse}
        ");
    assert!(message.contains("refuse"), "{message}");
}

#[test]
fn max_connections_and_idle_timeout() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            maxConnections: 250
            idleTimeout: 5m
            backends: []
    ");
    let settings = &only(&t).1.settings;
    assert_eq!(settings.max_connections, Some(250));
    assert_eq!(settings.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(only(&ok(MINIMAL)).1.settings, Default::default());
}

#[test]
fn bad_max_connections_or_idle_timeout_is_rejected_where_it_is() {
    let (line, column, message) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            maxConnections: 0
            backends: []
    ");
    assert_eq!((line, column), (4, 21), "{message}");
    assert!(
        message.contains("maxConnections") && message.contains("at least 1"),
        "{message}"
    );
    let (line, column, message) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            idleTimeout: 5 minutes please
            backends: []
    ");
    assert_eq!((line, column), (4, 18), "{message}");
    assert!(
        message.contains("idleTimeout") && message.contains("not a duration"),
        "{message}"
    );
    let (_, _, message) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            idleTimeout: 100ms
            backends: []
    ");
    assert!(message.contains("shorter than 1s"), "{message}");
}

#[test]
fn keep_external_client_ip_is_read() {
    assert!(!only(&ok(MINIMAL)).1.settings.keep_external_client_ip);
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:8080
            keepExternalClientIp: true
            backends: []
    ");
    assert!(only(&t).1.settings.keep_external_client_ip);
}

#[test]
fn proxy_protocol() {
    let t = ok("
        services:
          - name: web
            listen: 127.0.0.1:80
            proxyProtocol: v2
            backends: []
    ");
    let settings = &only(&t).1.settings;
    assert_eq!(settings.proxy_protocol, Some(ProxyProtocol::V2));
    assert_eq!(only(&ok(MINIMAL)).1.settings.proxy_protocol, None);
    // What tests write reads back the same.
    let doc = ServiceDoc::new("web", "127.0.0.1:80".parse().unwrap(), vec![])
        .with_proxy_protocol(ProxyProtocol::V2);
    let yaml = ConfigDoc::from(doc).to_yaml().unwrap();
    assert!(yaml.contains("proxyProtocol: v2"), "{yaml}");
    let back = ok(&yaml);
    assert_eq!(
        only(&back).1.settings.proxy_protocol,
        Some(ProxyProtocol::V2)
    );
}

#[test]
fn bad_proxy_protocol_is_rejected_where_it_is() {
    let (line, column, message) = err("
        services:
          - name: web
            listen: 127.0.0.1:80
            proxyProtocol: v1
            backends: []
    ");
    assert_eq!((line, column), (4, 20), "{message}");
    assert_eq!(
        message,
        "services[0] \"web\": proxyProtocol: unknown proxyProtocol \"v1\" (valid: v2)"
    );
    let (_, _, message) = err("
        services:
          - name: dns
            listen: 127.0.0.1:53
            protocol: udp
            proxyProtocol: v2
            backends: []
    ");
    assert_eq!(
        message,
        "services[0] \"dns\": proxyProtocol: is only for protocol: tcp"
    );
}
