#!/bin/bash
# Backends see the client's own IP (issue 13), measured: a transparent dial
# (IP_TRANSPARENT, bound to the client's address) from a proxy in a "node"
# namespace, per path, with the reply-steering rules of docs/source-ip.md.
#
# (IPv6 for paths 1 and 4: fd00:244::/64 on br0, fd00:50::/64 outside,
# Service fd00:96::1.)
#   ext k-sip-ext 192.168.50.1 --veth-- node k-sip-node: eth0 192.168.50.10
#                                        br0 10.244.0.1/24 (br_netfilter)
#                                          |-- client pod  k-sip-c  10.244.0.10
#                                          '-- backend pod k-sip-b  10.244.0.20:8080
#                                        vr  10.244.1.1/24 -- routed pod k-sip-r 10.244.1.10
#                                        vn2 192.168.60.10 -- node2 k-sip-n2 192.168.60.20
#                                                              '-- pod k-sip-b2 10.244.2.20:8080
# The proxy (python, in the node) listens on 0.0.0.0:15001/15002; nft `redirect`
# sends it Service 10.96.0.x:80 (transparent dial from the client's IP) and
# 10.96.0.x:81 (dial from the node's address), and NodePorts 30080-30082.
# Backends answer with the peer address they see.
# Run as root:
#   docs/source-ip-experiment.sh                      # BRIDGE=after BRNF=1
#   BRIDGE=none   docs/source-ip-experiment.sh        # only mark + ip rule
#   BRIDGE=before docs/source-ip-experiment.sh        # bridge rule before br_netfilter
#   BRNF=0        docs/source-ip-experiment.sh        # bridge-nf-call-iptables=0
#   BRNF=0 BRIDGE=before docs/source-ip-experiment.sh
#   DETECT=iface  docs/source-ip-experiment.sh        # local pod = came in on br0/vr
#   RPF=1         docs/source-ip-experiment.sh        # strict rp_filter on the node
#   BENCH=2000    docs/source-ip-experiment.sh        # + a rough dials/s figure
#   NETPOL=1      docs/source-ip-experiment.sh        # backend pod admits only 10.244.0.10
# Needs ip, nft, python3, br_netfilter; uses conntrack if installed.
# Removes what it made.
BRIDGE=${BRIDGE:-after}; BRNF=${BRNF:-1}; DETECT=${DETECT:-cidr}
case $DETECT in cidr) LOCAL='ip saddr 10.244.0.0/23'; LOCAL6='ip6 saddr fd00:244::/64';;
  *) LOCAL='iifname { "br0", "vr" }'; LOCAL6=$LOCAL;; esac
N=k-sip-node; N2=k-sip-n2; C=k-sip-c; B=k-sip-b; R=k-sip-r; B2=k-sip-b2; E=k-sip-ext
ALL="$N $N2 $C $B $R $B2 $E"
PIDS=""
cleanup(){ for p in $PIDS; do kill $p 2>/dev/null; done; for n in $ALL; do ip netns del $n 2>/dev/null; done; }
trap cleanup EXIT
set -e
for n in $ALL; do ip netns add $n; ip -n $n link set lo up; done
# node: bridge with two pods
ip -n $N link add br0 type bridge; ip -n $N addr add 10.244.0.1/24 dev br0; ip -n $N link set br0 up
pod_on_bridge(){ # ns host-side-dev addr
  ip link add $2 netns $N type veth peer name eth0 netns $1
  ip -n $N link set $2 master br0 up
  ip -n $1 addr add $3/24 dev eth0; ip -n $1 link set eth0 up
  ip -n $1 route add default via 10.244.0.1
}
pod_on_bridge $C vc 10.244.0.10
pod_on_bridge $B vb 10.244.0.20
# routed pod on its own veth
ip link add vr netns $N type veth peer name eth0 netns $R
ip -n $N addr add 10.244.1.1/24 dev vr; ip -n $N link set vr up
ip -n $R addr add 10.244.1.10/24 dev eth0; ip -n $R link set eth0 up; ip -n $R route add default via 10.244.1.1
# outside client
ip link add eth0 netns $N type veth peer name eth0 netns $E
ip -n $N addr add 192.168.50.10/24 dev eth0; ip -n $N link set eth0 up
ip -n $E addr add 192.168.50.1/24 dev eth0; ip -n $E link set eth0 up
# node2 with its pod; pod CIDRs routed between the nodes. node2 has NO route to
# 192.168.50.0/24 through this node (its default route would be its own uplink).
ip link add vn2 netns $N type veth peer name eth0 netns $N2
ip -n $N addr add 192.168.60.10/24 dev vn2; ip -n $N link set vn2 up
ip -n $N2 addr add 192.168.60.20/24 dev eth0; ip -n $N2 link set eth0 up
ip link add vb2 netns $N2 type veth peer name eth0 netns $B2
ip -n $N2 addr add 10.244.2.1/24 dev vb2; ip -n $N2 link set vb2 up
ip -n $B2 addr add 10.244.2.20/24 dev eth0; ip -n $B2 link set eth0 up; ip -n $B2 route add default via 10.244.2.1
ip -n $N route add 10.244.2.0/24 via 192.168.60.20
ip -n $N2 route add 10.244.0.0/16 via 192.168.60.10
# IPv6 on the bridge and the outside link (paths 1 and 4 only)
ip -n $N addr add fd00:244::1/64 dev br0 nodad; ip -n $N addr add fd00:50::10/64 dev eth0 nodad
for p in "$C fd00:244::10" "$B fd00:244::20"; do set -- $p; ip -n $1 addr add $2/64 dev eth0 nodad; ip -n $1 -6 route add default via fd00:244::1; done
ip -n $E addr add fd00:50::1/64 dev eth0 nodad
ip netns exec $N sysctl -qw net.ipv6.conf.all.forwarding=1
ip -n $N route add 10.96.0.0/16 dev br0   # a route for the Service range, so the node itself can connect (output nat redirects)
for n in $N $N2; do ip netns exec $n sysctl -qw net.ipv4.ip_forward=1; done
if [ "${RPF:-0}" = 1 ]; then  # strict reverse-path filter on every node interface
  for d in all default br0 eth0 vr vn2; do ip netns exec $N sysctl -qw net.ipv4.conf.$d.rp_filter=1; done
fi
ip netns exec $N sh -c "echo $BRNF > /proc/sys/net/bridge/bridge-nf-call-iptables; echo $BRNF > /proc/sys/net/bridge/bridge-nf-call-ip6tables"
echo "bridge-nf-call-iptables=$(ip netns exec $N cat /proc/sys/net/bridge/bridge-nf-call-iptables) BRIDGE=$BRIDGE"
BRMAC=$(ip -n $N -br link show br0 | awk '{print $3}')

# The rules sluice would own (docs/source-ip.md): intercept (as today) + reply steering.
ip netns exec $N nft -f - <<NFT
table inet k-sip {
  # "local pod" decided in nftables as kube-proxy's --detect-local-mode does
  # (DETECT=cidr: NodeCIDR-like source match; DETECT=iface: bridge/interface
  # names); local-pod connections go to :15001, the rest to :15002, so the
  # proxy knows per connection without a per-connection lookup.
  chain pre-nat { type nat hook prerouting priority dstnat; policy accept;
    $LOCAL ip daddr 10.96.0.0/16 tcp dport { 80, 81 } redirect to :15001
    $LOCAL ip daddr 192.168.50.10 tcp dport 30080-30082 redirect to :15001
    ip daddr 10.96.0.0/16 tcp dport { 80, 81 } redirect to :15002
    ip daddr 192.168.50.10 tcp dport 30080-30082 redirect to :15002
    $LOCAL6 ip6 daddr fd00:96::/64 tcp dport 80 redirect to :15001
    ip6 daddr fd00:50::10 tcp dport 30080 redirect to :15002
  }
  chain out-nat { type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.0/16 tcp dport { 80, 81 } redirect to :15002
  }
  chain steer { type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 counter meta mark set meta mark | 0x1000
  }
}
NFT
ip -n $N rule add fwmark 0x1000/0x1000 lookup 2626 pref 2626
ip -n $N route add local 0.0.0.0/0 dev lo table 2626
ip -n $N -6 rule add fwmark 0x1000/0x1000 lookup 2626 pref 2626
ip -n $N -6 route add local ::/0 dev lo table 2626
case $BRIDGE in
after)  # after br_netfilter (priority 0) has run the ip prerouting hooks: the mark is set
ip netns exec $N nft -f - <<NFT
table bridge k-sip {
  chain pre { type filter hook prerouting priority 10; policy accept;
    # which bridge: by the reply's destination, the client pod on this bridge's subnet
    # (meta ibrname needs CONFIG_NFT_BRIDGE_META, which this kernel lacks)
    ip daddr 10.244.0.0/24 meta mark & 0x1000 == 0x1000 counter ether daddr set $BRMAC meta pkttype set host
    ip6 daddr fd00:244::/64 meta mark & 0x1000 == 0x1000 counter ether daddr set $BRMAC meta pkttype set host
  }
}
NFT
;;
before) # before br_netfilter: no socket lookup, no conntrack yet; only header matches
ip netns exec $N nft -f - <<NFT
table bridge k-sip {
  chain pre { type filter hook prerouting priority -300; policy accept;
    ether type ip ip saddr 10.244.0.0/24 ip daddr 10.244.0.0/24 tcp sport 8080 counter ether daddr set $BRMAC meta pkttype set host
  }
}
NFT
;;
esac
# Evidence in the client pod: SYN-ACKs from :8080 it receives and RSTs it sends;
# SYNs from its own address (hairpin) before routing (pre) and after (in).
ip netns exec $C nft -f - <<'NFT'
table inet k-ev {
  chain in  { type filter hook input priority 0; policy accept;
    tcp sport 8080 tcp flags & (syn|ack) == (syn|ack) counter
    ip saddr 10.244.0.10 tcp dport 8080 tcp flags syn / syn,ack counter
  }
  chain pre { type filter hook prerouting priority -150; policy accept;
    ip saddr 10.244.0.10 tcp dport 8080 tcp flags syn / syn,ack counter
  }
  chain out { type filter hook output priority 0; policy accept;
    tcp dport 8080 tcp flags & rst == rst counter
  }
}
NFT

if [ "${NETPOL:-0}" = 1 ]; then  # a NetworkPolicy-like filter in the backend pod: only the client pod may connect
ip netns exec $B nft -f - <<'NFT'
table inet k-netpol {
  chain in { type filter hook input priority 0; policy accept;
    tcp dport 8080 ip saddr != 10.244.0.10 counter drop
  }
}
NFT
fi

backend='import socket,threading
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(("0.0.0.0",8080)); s.listen(64)
while True:
  c,a=s.accept(); c.sendall(("%s\n"%a[0]).encode()); c.close()'
backend6='import socket
s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1); s.bind(("::",8080)); s.listen(64)
while True:
  c,a=s.accept(); c.sendall(("%s\n"%a[0]).encode()); c.close()'
for n in $B $B2 $C; do ip netns exec $n python3 -c "$backend" & PIDS="$PIDS $!"; done
ip netns exec $B python3 -c "$backend6" & PIDS="$PIDS $!"

# Original destination -> (backend, source, externalTrafficPolicy). "client" =
# transparent dial from the client's address; "node" = an ordinary dial from
# the node. Each line also prints the source sluice's policy would choose
# (docs/source-ip.md): hairpin -> node; local pod (port 15001) -> client;
# NodePort eTP=Local -> client; anything else -> node.
ip netns exec $N python3 -u - <<'PY' &
import socket, struct, threading
ROUTES = {
  ("10.96.0.1", 80): ("10.244.0.20", "client", None),  # same node, bridged backend
  ("10.96.0.1", 81): ("10.244.0.20", "node", None),
  ("10.96.0.2", 80): ("10.244.2.20", "client", None),  # backend on node2
  ("10.96.0.2", 81): ("10.244.2.20", "node", None),
  ("10.96.0.4", 80): ("10.244.0.10", "client", None),  # hairpin: the client pod's own Service
  ("10.96.0.4", 81): ("10.244.0.10", "node", None),
  ("192.168.50.10", 30080): ("10.244.0.20", "client", "Local"),    # local backend
  ("192.168.50.10", 30081): ("10.244.2.20", "client", "Cluster"),  # remote, client IP
  ("192.168.50.10", 30082): ("10.244.2.20", "node", "Cluster"),    # remote, node IP
  ("fd00:96::1", 80): ("fd00:244::20", "client", None),
  ("fd00:50::10", 30080): ("fd00:244::20", "client", "Local"),
}
def policy(local_pod, client, backend, etp):
    if client == backend: return "node"       # hairpin
    if local_pod: return "client"
    if etp == "Local": return "client"
    return "node"
def handle(c, peer, local_pod):
    try:
        if c.family == socket.AF_INET6:
            d = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)  # IP6T_SO_ORIGINAL_DST
            port, = struct.unpack("!H", d[2:4]); dst = (socket.inet_ntop(socket.AF_INET6, d[8:24]), port)
        else:
            d = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, = struct.unpack("!H", d[2:4]); dst = (socket.inet_ntoa(d[4:8]), port)
        ip, mode, etp = ROUTES[dst]
        why = "client=%s local-pod=%s policy=%s" % (peer[0], "yes" if local_pod else "no", policy(local_pod, peer[0], ip, etp))
        b = socket.socket(c.family)
        if mode == "client" and c.family == socket.AF_INET6:
            b.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
        elif mode == "client":
            b.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        if mode == "client":
            b.bind((peer[0], 0))
        b.settimeout(2)
        try:
            b.connect((ip, 8080)); seen = b.makefile().readline().strip()
            c.sendall(("ok backend-saw=%s (dial %s:%d; %s)\n" % (seen, *b.getsockname()[:2], why)).encode())
        except OSError as e:
            c.sendall(("FAIL dial from %s:%d: %s (%s)\n" % (*b.getsockname()[:2], e, why)).encode())
    except Exception as e:
        c.sendall(("FAIL proxy: %r\n" % e).encode())
    c.close()
def serve(port, local_pod, family=socket.AF_INET):
    l = socket.socket(family); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); l.bind(("::", port))
    else:
        l.bind(("0.0.0.0", port))
    l.listen(64)
    while True:
        c, peer = l.accept(); threading.Thread(target=handle, args=(c, peer, local_pod), daemon=True).start()
threading.Thread(target=serve, args=(15001, True), daemon=True).start()
threading.Thread(target=serve, args=(15001, True, socket.AF_INET6), daemon=True).start()
threading.Thread(target=serve, args=(15002, False, socket.AF_INET6), daemon=True).start()
serve(15002, False)
PY
PIDS="$PIDS $!"
sleep 1
ask='import socket,sys
try:
  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5); print("   ", s.makefile().readline().strip())
except Exception as e: print("    client error:", e)'
run(){ # label ns addr port
  echo "$1: $2 -> $3:$4"; ip netns exec $2 python3 -c "$ask" $3 $4
}
set +e
run "1 pod -> same-node bridged backend, transparent" $C 10.96.0.1 80
run "1 pod -> same-node bridged backend, node source" $C 10.96.0.1 81
run "2 pod -> backend on node2, transparent" $C 10.96.0.2 80
run "3 routed pod -> same-node bridged backend, transparent" $R 10.96.0.1 80
run "3 routed pod -> backend on node2, transparent" $R 10.96.0.2 80
run "4 outside -> NodePort eTP=Local (local backend), transparent" $E 192.168.50.10 30080
run "4 outside -> NodePort eTP=Cluster (node2 backend), transparent" $E 192.168.50.10 30081
run "4 outside -> NodePort eTP=Cluster (node2 backend), node source" $E 192.168.50.10 30082
run "5 hairpin pod -> own Service, transparent" $C 10.96.0.4 80
run "5 hairpin pod -> own Service, node source" $C 10.96.0.4 81
run "6 node itself -> Service, transparent (source is the node's own address)" $N 10.96.0.1 80
echo "7 pod -> backend pod directly (no Service): what the bridge rule does to plain pod-to-pod"
ip netns exec $C python3 -c "$ask" 10.244.0.20 8080
run "1 IPv6 pod -> same-node bridged backend, transparent" $C fd00:96::1 80
run "4 IPv6 outside -> NodePort eTP=Local (local backend), transparent" $E fd00:50::10 30080
echo "--- node: nft counters"; ip netns exec $N nft list ruleset | grep counter
[ "${NETPOL:-0}" = 1 ] && { echo "--- backend pod: dropped by its filter"; ip netns exec $B nft list table inet k-netpol | grep counter; }
echo "--- client pod: SYNs from itself before routing / SYN-ACKs in from :8080, SYNs from itself in input / RSTs out to :8080"; ip netns exec $C nft list table inet k-ev | grep counter
if [ -n "$BENCH" ]; then  # BENCH=N: N sequential dials+reads to the bridged backend, from the node and transparent
  echo "--- $BENCH dials to 10.244.0.20:8080 from the node, one at a time (python; rough)"
  ip netns exec $N python3 - "$BENCH" <<'PY'
import socket, sys, time
n = int(sys.argv[1])
def run(transparent):
    t = time.perf_counter()
    for _ in range(n):
        b = socket.socket()
        if transparent:
            b.setsockopt(socket.SOL_IP, 19, 1); b.bind(("10.244.0.10", 0))
        b.settimeout(2); b.connect(("10.244.0.20", 8080)); b.recv(64); b.close()
    return n / (time.perf_counter() - t)
for label, tr in (("node", False), ("transparent", True), ("node", False), ("transparent", True)):
    print("    %-12s %6.0f dials/s" % (label, run(tr)))
PY
fi
if command -v conntrack >/dev/null; then
  echo "--- node: conntrack, connections to :8080"; ip netns exec $N conntrack -L -p tcp --dport 8080 2>/dev/null
fi
