//! Choosing a backend for one new connection.
//!
//! [`pick`] is a pure function of the service (from the live table), the
//! per-listener [`ServiceRuntime`] (round-robin cursor, affinity entries) and
//! what the [`Health`] view says of each backend (active connections,
//! ejection). It only ever returns an *eligible* backend: ready ones, or,
//! when none is ready, serving-and-terminating ones (the table computed that
//! set when it was built).
//!
//! Order of preference:
//! 1. the client's affinity backend, while it stays eligible, unexcluded and
//!    not ejected, and the entry has not timed out;
//! 2. the service policy (smooth weighted round robin; power of two
//!    weighted choices over active connections per unit of weight; Maglev
//!    or plain hashing of the client IP, then the deterministic fallback
//!    order of [`Service::hash_order`]) among eligible backends that are
//!    neither excluded (already tried for this connection) nor ejected
//!    (failed a recent dial);
//! 3. when every remaining backend is ejected, the policy among those that
//!    were not tried yet: trying a backend in cooldown beats refusing the
//!    client.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sluice_control::table::client_hash;
use sluice_control::{Backend, Policy, Service};

use crate::tracker::Tracker;

/// What the balancer needs to know about backends at pick time.
pub trait Health {
    fn active(&self, addr: SocketAddr) -> usize;
    fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool;
}

impl Health for Tracker {
    fn active(&self, addr: SocketAddr) -> usize {
        Tracker::active(self, addr)
    }
    fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        Tracker::is_ejected(self, addr, now)
    }
}

/// Balancing state of one listen address; lives as long as its listener,
/// across table swaps.
#[derive(Debug, Default)]
pub struct ServiceRuntime {
    cursor: AtomicUsize,
    affinity: DashMap<IpAddr, AffinityEntry>,
}

#[derive(Debug, Clone, Copy)]
struct AffinityEntry {
    backend: SocketAddr,
    last_used: Instant,
}

impl ServiceRuntime {
    /// Forgets affinity entries idle for longer than `timeout`.
    pub fn expire_affinity(&self, timeout: Duration, now: Instant) {
        self.affinity
            .retain(|_, e| now.saturating_duration_since(e.last_used) < timeout);
    }

    pub fn affinity_entries(&self) -> usize {
        self.affinity.len()
    }
}

/// Inputs of one pick besides the service itself.
pub struct PickContext<'a, H: Health> {
    pub health: &'a H,
    pub client_ip: IpAddr,
    /// Backends already tried for this connection.
    pub exclude: &'a [SocketAddr],
    pub now: Instant,
}

/// Picks a backend for a new connection, or `None` when no eligible backend
/// is left to try.
pub fn pick<H: Health>(
    service: &Service,
    rt: &ServiceRuntime,
    ctx: &PickContext<'_, H>,
) -> Option<SocketAddr> {
    let n = service.eligible_len();
    if n == 0 {
        return None;
    }
    let untried = |a: SocketAddr| !ctx.exclude.contains(&a);
    let healthy = |a: SocketAddr| untried(a) && !ctx.health.is_ejected(a, ctx.now);

    if let Some(aff) = service.affinity
        && let Some(e) = rt.affinity.get(&ctx.client_ip).map(|e| *e)
    {
        let fresh = ctx.now.saturating_duration_since(e.last_used) < aff.timeout;
        if fresh && service.is_eligible(e.backend) && healthy(e.backend) {
            rt.affinity.insert(
                ctx.client_ip,
                AffinityEntry {
                    backend: e.backend,
                    last_used: ctx.now,
                },
            );
            return Some(e.backend);
        }
    }

    let chosen =
        choose(service, rt, ctx, &healthy).or_else(|| choose(service, rt, ctx, &untried))?;
    if service.affinity.is_some() {
        rt.affinity.insert(
            ctx.client_ip,
            AffinityEntry {
                backend: chosen,
                last_used: ctx.now,
            },
        );
    }
    Some(chosen)
}

/// Applies the policy among eligible backends accepted by `ok`.
fn choose<H: Health>(
    service: &Service,
    rt: &ServiceRuntime,
    ctx: &PickContext<'_, H>,
    ok: &dyn Fn(SocketAddr) -> bool,
) -> Option<SocketAddr> {
    let n = service.eligible_len();
    // The first acceptable backend at or after position `start`.
    let walk = |start: usize| {
        (0..n)
            .filter_map(|k| service.eligible((start + k) % n))
            .find(|b| ok(b.addr))
    };
    match service.policy {
        // Smooth weighted round robin (plain rotation for equal weights).
        Policy::RoundRobin => {
            let turn = rt.cursor.fetch_add(1, Ordering::Relaxed);
            walk(service.weighted_turn(turn)).map(|b| b.addr)
        }
        // Two draws in proportion to weight; the one with fewer active
        // connections per unit of weight wins (ties: the first).
        Policy::LeastConnections => {
            let a = walk(service.weighted_turn(fastrand::usize(..)))?;
            let b = walk(service.weighted_turn(fastrand::usize(..)))?;
            let load = |x: &Backend, by: &Backend| {
                ctx.health.active(x.addr) as u128 * u128::from(by.weight)
            };
            Some(if load(b, a) < load(a, b) {
                b.addr
            } else {
                a.addr
            })
        }
        // One hash of the client IP and one lookup; a tried or ejected
        // backend falls back along an order every node shares.
        Policy::Maglev | Policy::SourceHash => (service.hash_order(client_hash(ctx.client_ip)))
            .filter_map(|i| service.eligible(i))
            .find(|b| ok(b.addr))
            .map(|b| b.addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{Affinity, Conditions};
    use std::collections::{HashMap, HashSet};

    #[derive(Default)]
    struct FakeHealth {
        active: HashMap<SocketAddr, usize>,
        ejected: HashSet<SocketAddr>,
    }

    impl Health for FakeHealth {
        fn active(&self, addr: SocketAddr) -> usize {
            self.active.get(&addr).copied().unwrap_or(0)
        }
        fn is_ejected(&self, addr: SocketAddr, _now: Instant) -> bool {
            self.ejected.contains(&addr)
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn mk_service(policy: Policy, affinity: Option<Affinity>, states: &[Conditions]) -> Service {
        let backends = states
            .iter()
            .enumerate()
            .map(|(i, c)| Backend::new(addr(i as u8 + 1), *c))
            .collect();
        Service::new("test", policy, affinity, backends)
    }

    fn ctx<'a>(h: &'a FakeHealth, exclude: &'a [SocketAddr]) -> PickContext<'a, FakeHealth> {
        PickContext {
            health: h,
            client_ip: IpAddr::from([192, 0, 2, 1]),
            exclude,
            now: Instant::now(),
        }
    }

    #[test]
    fn round_robin_cycles_over_ready_backends_only() {
        let s = mk_service(
            Policy::RoundRobin,
            None,
            &[
                Conditions::READY,
                Conditions::TERMINATING,
                Conditions::READY,
            ],
        );
        let rt = ServiceRuntime::default();
        let h = FakeHealth::default();
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&s, &rt, &ctx(&h, &[])).unwrap())
            .collect();
        assert_eq!(picks, vec![addr(1), addr(3), addr(1), addr(3)]);
    }

    #[test]
    fn terminating_fallback_when_none_ready() {
        let s = mk_service(
            Policy::RoundRobin,
            None,
            &[Conditions::TERMINATING, Conditions::TERMINATING],
        );
        let rt = ServiceRuntime::default();
        let h = FakeHealth::default();
        let got: HashSet<_> = (0..4)
            .map(|_| pick(&s, &rt, &ctx(&h, &[])).unwrap())
            .collect();
        assert_eq!(got, HashSet::from([addr(1), addr(2)]));
    }

    #[test]
    fn excluded_and_ejected_are_skipped_until_nothing_else_is_left() {
        let s = mk_service(Policy::RoundRobin, None, &[Conditions::READY; 3]);
        let rt = ServiceRuntime::default();
        let h = FakeHealth {
            ejected: HashSet::from([addr(2)]),
            ..Default::default()
        };
        for _ in 0..6 {
            assert_eq!(pick(&s, &rt, &ctx(&h, &[addr(1)])), Some(addr(3)));
        }
        // Only the ejected one is untried: try it rather than fail.
        assert_eq!(pick(&s, &rt, &ctx(&h, &[addr(1), addr(3)])), Some(addr(2)));
        assert_eq!(pick(&s, &rt, &ctx(&h, &[addr(1), addr(2), addr(3)])), None);
    }

    #[test]
    fn no_eligible_backend_is_none() {
        let s = mk_service(Policy::RoundRobin, None, &[]);
        let h = FakeHealth::default();
        assert_eq!(pick(&s, &ServiceRuntime::default(), &ctx(&h, &[])), None);
    }

    #[test]
    fn least_connections_prefers_the_idle_backend() {
        let s = mk_service(Policy::LeastConnections, None, &[Conditions::READY; 2]);
        let rt = ServiceRuntime::default();
        let h = FakeHealth {
            active: HashMap::from([(addr(1), 50)]),
            ..Default::default()
        };
        let to_busy = (0..200)
            .filter(|_| pick(&s, &rt, &ctx(&h, &[])) == Some(addr(1)))
            .count();
        // Two random choices: the busy one wins only when both draws hit it
        // (about a quarter of the time).
        assert!(to_busy < 100, "busy backend picked {to_busy}/200 times");
    }

    #[test]
    fn affinity_sticks_while_eligible_and_moves_when_not() {
        let aff = Some(Affinity {
            timeout: Duration::from_secs(60),
        });
        let s = mk_service(Policy::RoundRobin, aff, &[Conditions::READY; 3]);
        let rt = ServiceRuntime::default();
        let h = FakeHealth::default();
        let first = pick(&s, &rt, &ctx(&h, &[])).unwrap();
        for _ in 0..5 {
            assert_eq!(pick(&s, &rt, &ctx(&h, &[])), Some(first));
        }
        // The affinity backend turns terminating: the client moves, then sticks.
        let mut states = [Conditions::READY; 3];
        let idx = s.backends().iter().position(|b| b.addr == first).unwrap();
        states[idx] = Conditions::TERMINATING;
        let s2 = mk_service(Policy::RoundRobin, aff, &states);
        let moved = pick(&s2, &rt, &ctx(&h, &[])).unwrap();
        assert_ne!(moved, first);
        assert_eq!(pick(&s2, &rt, &ctx(&h, &[])), Some(moved));
    }

    #[test]
    fn affinity_expires_after_timeout() {
        let aff = Some(Affinity {
            timeout: Duration::from_secs(10),
        });
        let s = mk_service(Policy::RoundRobin, aff, &[Conditions::READY; 2]);
        let rt = ServiceRuntime::default();
        let h = FakeHealth::default();
        let c = ctx(&h, &[]);
        let first = pick(&s, &rt, &c).unwrap();
        let later = PickContext {
            now: c.now + Duration::from_secs(11),
            ..c
        };
        // Round robin moves on once the entry is stale.
        assert_ne!(pick(&s, &rt, &later), Some(first));
        rt.expire_affinity(Duration::from_secs(10), later.now + Duration::from_secs(11));
        assert_eq!(rt.affinity_entries(), 0);
    }

    fn mk_weighted(policy: Policy, weights: &[u32]) -> Service {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                weight: *w,
                ..Backend::new(addr(i as u8 + 1), Conditions::READY)
            })
            .collect();
        Service::new("test", policy, None, backends)
    }

    fn counts(picks: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
        let mut c = HashMap::new();
        for p in picks {
            *c.entry(*p).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let s = mk_weighted(Policy::RoundRobin, &[5, 1, 1]);
        let rt = ServiceRuntime::default();
        let h = FakeHealth::default();
        let picks: Vec<_> = (0..700)
            .map(|_| pick(&s, &rt, &ctx(&h, &[])).unwrap())
            .collect();
        let c = counts(&picks);
        assert_eq!((c[&addr(1)], c[&addr(2)], c[&addr(3)]), (500, 100, 100));
        // Smooth: the heavy backend's turns are spread, not in one run.
        let longest = picks
            .chunk_by(|a, b| a == b)
            .map(<[SocketAddr]>::len)
            .max()
            .unwrap();
        assert!(longest <= 3, "{:?}", &picks[..14]);
        // Equal weights: plain rotation.
        let s = mk_weighted(Policy::RoundRobin, &[3, 3]);
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&s, &rt, &ctx(&h, &[])).unwrap())
            .collect();
        assert_eq!(counts(&picks)[&addr(1)], 2);
        assert_ne!(picks[0], picks[1]);
    }

    /// `n` ready backends, listed in the given order of their numbers.
    fn mk_hashed(policy: Policy, numbers: impl IntoIterator<Item = u8>) -> Service {
        let backends = (numbers.into_iter())
            .map(|i| Backend::new(addr(i), Conditions::READY))
            .collect();
        Service::new("test", policy, None, backends)
    }

    /// Client `i` of a pool of distinct addresses.
    fn client(i: u32) -> IpAddr {
        IpAddr::from((0xc000_0000u32 + i).to_be_bytes())
    }

    fn pick_for(s: &Service, ip: IpAddr, h: &FakeHealth, exclude: &[SocketAddr]) -> SocketAddr {
        let c = PickContext {
            client_ip: ip,
            ..ctx(h, exclude)
        };
        pick(s, &ServiceRuntime::default(), &c).unwrap()
    }

    #[test]
    fn maglev_picks_alike_on_independently_built_tables() {
        // Two nodes: the same backends, listed in another order, fresh state.
        let a = mk_hashed(Policy::Maglev, 1..=10);
        let b = mk_hashed(Policy::Maglev, (1..=10).rev());
        let h = FakeHealth::default();
        let mut seen = HashSet::new();
        for i in 0..2000 {
            let got = pick_for(&a, client(i), &h, &[]);
            assert_eq!(got, pick_for(&b, client(i), &h, &[]), "client {i}");
            assert_eq!(got, pick_for(&a, client(i), &h, &[]), "client {i} again");
            seen.insert(got);
        }
        assert_eq!(seen.len(), 10, "clients spread over every backend");
    }

    /// The fraction of `clients` whose pick differs between `a` and `b`.
    fn remapped(a: &Service, b: &Service, clients: u32) -> f64 {
        let h = FakeHealth::default();
        let moved = (0..clients)
            .filter(|&i| pick_for(a, client(i), &h, &[]) != pick_for(b, client(i), &h, &[]))
            .count();
        moved as f64 / f64::from(clients)
    }

    #[test]
    fn maglev_moves_few_clients_when_a_backend_leaves() {
        let n = 10;
        let all = mk_hashed(Policy::Maglev, 1..=n);
        let less = mk_hashed(Policy::Maglev, (1..=n).filter(|&i| i != 4));
        let moved = remapped(&all, &less, 10_000);
        // Ideal: the leaving backend's 1/N. Maglev adds a little churn.
        assert!(moved <= 1.2 / f64::from(n), "{moved}");
        assert!(moved >= 0.8 / f64::from(n), "{moved}");
        // Plain source hashing moves most clients: what Maglev is for.
        let all = mk_hashed(Policy::SourceHash, 1..=n);
        let less = mk_hashed(Policy::SourceHash, (1..=n).filter(|&i| i != 4));
        assert!(remapped(&all, &less, 10_000) > 0.5);
    }

    #[test]
    fn source_hash_is_deterministic_and_follows_weights() {
        let a = mk_hashed(Policy::SourceHash, 1..=5);
        let b = mk_hashed(Policy::SourceHash, 1..=5);
        let h = FakeHealth::default();
        let mut seen = HashSet::new();
        for i in 0..500 {
            let got = pick_for(&a, client(i), &h, &[]);
            assert_eq!(got, pick_for(&b, client(i), &h, &[]), "client {i}");
            seen.insert(got);
        }
        assert_eq!(seen.len(), 5);
        // Pinned across builds and versions of sluice: the hash of
        // 192.0.2.1 is 4 mod 5, and the backends are taken in address order.
        let ip = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(client_hash(ip) % 5, 4);
        assert_eq!(pick_for(&a, ip, &h, &[]), addr(5));
        let reversed = mk_hashed(Policy::SourceHash, (1..=5).rev());
        assert_eq!(pick_for(&reversed, ip, &h, &[]), addr(5));
        let s = mk_weighted(Policy::SourceHash, &[3, 1]);
        let heavy = (0..4000)
            .filter(|&i| pick_for(&s, client(i), &h, &[]) == addr(1))
            .count();
        assert!((2800..=3200).contains(&heavy), "{heavy}/4000");
    }

    #[test]
    fn hashed_picks_fall_back_deterministically_past_tried_and_ejected() {
        for policy in [Policy::Maglev, Policy::SourceHash] {
            let a = mk_hashed(policy, 1..=10);
            let b = mk_hashed(policy, (1..=10).rev());
            let none = FakeHealth::default();
            let mut fallbacks = HashSet::new();
            for i in 0..300 {
                let first = pick_for(&a, client(i), &none, &[]);
                let next = pick_for(&a, client(i), &none, &[first]);
                assert_ne!(next, first, "{policy} client {i}");
                assert_eq!(next, pick_for(&b, client(i), &none, &[first]));
                // An ejected first choice falls back the same way.
                let ejected = FakeHealth {
                    ejected: HashSet::from([first]),
                    ..Default::default()
                };
                assert_eq!(pick_for(&a, client(i), &ejected, &[]), next);
                if first == addr(3) {
                    fallbacks.insert(next);
                }
            }
            if policy == Policy::Maglev {
                // A backend's clients spread over the others when it is down.
                assert!(fallbacks.len() >= 3, "{fallbacks:?}");
            }
            // Every backend is tried before giving up.
            let mut tried = Vec::new();
            while let Some(next) = pick(&a, &ServiceRuntime::default(), &ctx(&none, &tried)) {
                tried.push(next);
            }
            assert_eq!(tried.len(), 10, "{policy}");
        }
    }

    #[test]
    fn affinity_holds_on_top_of_maglev() {
        let aff = Some(Affinity {
            timeout: Duration::from_secs(60),
        });
        let h = FakeHealth::default();
        let rt = ServiceRuntime::default();
        let mk = |n: u8| {
            let backends = (1..=n)
                .map(|i| Backend::new(addr(i), Conditions::READY))
                .collect();
            Service::new("test", Policy::Maglev, aff, backends)
        };
        // A client whose Maglev pick changes when a fourth backend comes.
        let (three, four) = (mk(3), mk(4));
        let ip = (0..1000)
            .map(client)
            .find(|&ip| pick_for(&three, ip, &h, &[]) != pick_for(&four, ip, &h, &[]))
            .unwrap();
        let c = PickContext {
            client_ip: ip,
            ..ctx(&h, &[])
        };
        let first = pick(&three, &rt, &c).unwrap();
        assert_eq!(pick(&four, &rt, &c), Some(first), "the affinity entry wins");
    }

    #[test]
    fn least_connections_weighs_active_connections_by_weight() {
        let s = mk_weighted(Policy::LeastConnections, &[4, 1]);
        let rt = ServiceRuntime::default();
        // 10 connections on weight 4 (2.5 each) is less loaded than 5 on
        // weight 1.
        let h = FakeHealth {
            active: HashMap::from([(addr(1), 10), (addr(2), 5)]),
            ..Default::default()
        };
        let to_heavy = (0..400)
            .filter(|_| pick(&s, &rt, &ctx(&h, &[])) == Some(addr(1)))
            .count();
        assert!(to_heavy > 360, "heavy backend picked {to_heavy}/400 times");
        // Idle: new connections follow the weights (draws are weighted).
        let idle = FakeHealth::default();
        let to_heavy = (0..1000)
            .filter(|_| pick(&s, &rt, &ctx(&idle, &[])) == Some(addr(1)))
            .count();
        assert!((700..=900).contains(&to_heavy), "{to_heavy}/1000");
    }
}
