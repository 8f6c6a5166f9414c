#!/bin/bash
# UDP through nftables `redirect`, measured (docs/architecture.md, "UDP").
# A node namespace with a bridged pod and br_netfilter on
# (bridge-nf-call-iptables=1); a scratch nft table redirects UDP to
# 10.96.0.10:53 and 10.96.0.11:53 to one local port each (a map keyed by
# address . port), and 10.96.0.12:5353 to a shared port. The servers answer
# "<local port>:<what IP_RECVORIGDSTADDR reported>". Run as root:
#   docs/udp-intercept-experiment.sh             # replies with sendto(2)
#   PKTINFO=1 docs/udp-intercept-experiment.sh   # replies from the local
#                                                # address they arrived on
# Needs ip, nft, python3 and the br_netfilter module; removes what it made.
N=c-icpt-node; P=c-icpt-pod
cleanup(){ ip netns del $N 2>/dev/null; ip netns del $P 2>/dev/null; kill $SRV 2>/dev/null; }
trap cleanup EXIT
ip netns add $N; ip netns add $P
ip -n $N link set lo up; ip -n $P link set lo up
ip -n $N link add br0 type bridge; ip -n $N addr add 10.244.0.1/24 dev br0; ip -n $N link set br0 up
ip link add vc0 netns $N type veth peer name eth0 netns $P
ip -n $N link set vc0 master br0 up
ip -n $P addr add 10.244.0.10/24 dev eth0; ip -n $P link set eth0 up
ip -n $P route add default via 10.244.0.1
ip -n $N route add default via 10.244.0.1 dev br0   # a node has a default route; 10.96/12 is on no device
ip netns exec $N sh -c 'echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables' && echo "br_netfilter: $(ip netns exec $N cat /proc/sys/net/bridge/bridge-nf-call-iptables)"
ip netns exec $N nft -f - <<'NFT'
table inet c-exp {
  map udp-ports-v4 { type ipv4_addr . inet_service : inet_service; elements = { 10.96.0.10 . 53 : 20053, 10.96.0.11 . 53 : 20054 } }
  set shared-v4 { type ipv4_addr . inet_service; elements = { 10.96.0.12 . 5353 } }
  chain pre { type nat hook prerouting priority dstnat; policy accept;
    meta l4proto udp redirect to ip daddr . udp dport map @udp-ports-v4
    meta l4proto udp ip daddr . udp dport @shared-v4 redirect to :20099
  }
  chain out { type nat hook output priority -100; policy accept;
    meta l4proto udp redirect to ip daddr . udp dport map @udp-ports-v4
    meta l4proto udp ip daddr . udp dport @shared-v4 redirect to :20099
  }
}
NFT
# One server per local port (what sluice would bind: 0.0.0.0:<local port>), and one shared
# port reading IP_RECVORIGDSTADDR. Each answers "<port>:<origdst or ->" to the sender.
ip netns exec $N python3 -u - <<'PY' &
import socket, select, struct, os
PKTINFO = os.environ.get("PKTINFO") == "1"
IP_PKTINFO = 8
IP_RECVORIGDSTADDR = 20
socks = {}
for port in (20053, 20054, 20099):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", port)); socks[s] = port
while True:
    r, _, _ = select.select(list(socks), [], [])
    for s in r:
        data, anc, _, peer = s.recvmsg(2048, 256)
        orig = "-"; pktinfo = None
        for lvl, typ, d in anc:
            if lvl == socket.SOL_IP and typ == IP_PKTINFO: pktinfo = d
            if lvl == socket.SOL_IP and typ == IP_RECVORIGDSTADDR:
                port, = struct.unpack("!H", d[2:4]); orig = "%s:%d" % (socket.inet_ntoa(d[4:8]), port)
        reply = ("%d:%s" % (socks[s], orig)).encode()
        if PKTINFO and pktinfo is not None:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }: reply from addr (the local dst)
            anc_out = [(socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, pktinfo[8:12], b"\0"*4))]
            s.sendmsg([reply], anc_out, 0, peer)
        else:
            s.sendto(reply, peer)
PY
SRV=$!
sleep 1
ask='import socket,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(b"q",(sys.argv[1],int(sys.argv[2])))
try:
  d,a=s.recvfrom(100); print("  %s:%s -> answer %r from %s:%d" % (sys.argv[1],sys.argv[2],d.decode(),a[0],a[1]))
except Exception as e: print("  %s:%s -> %s" % (sys.argv[1],sys.argv[2],e))'
echo "from the pod (prerouting, bridged, br_netfilter=1):"
for t in "10.96.0.10 53" "10.96.0.11 53" "10.96.0.12 5353"; do ip netns exec $P python3 -c "$ask" $t; done
echo "from the node itself (output hook):"
for t in "10.96.0.10 53" "10.96.0.11 53" "10.96.0.12 5353"; do ip netns exec $N python3 -c "$ask" $t; done
