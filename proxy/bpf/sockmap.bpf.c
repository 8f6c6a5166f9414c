// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// sluice's kernel-side forwarding (issue 18): an sk_skb stream-verdict
// program that sends every byte a socket receives out of its peer.
//
// Userspace (proxy/src/sockmap.rs) fills three maps per connection, each
// keyed by a socket's cookie C:
// - TARGETS[C] is the *other* socket of the connection: where C's bytes
//   go. No program is attached to TARGETS, so a socket that is only there
//   is a redirect target and its own input is left alone.
// - MOVED[C] counts the bytes taken from socket C and handed to its peer:
//   userspace compares it with what the peer has written before it sends
//   a FIN (the redirect is asynchronous) and reports it as bytes moved.
// - PEERS[C] is socket C itself. This program is attached to PEERS, so
//   entering PEERS is what makes the kernel hand C's input to it. Both
//   TARGETS entries exist before either socket enters PEERS: there is no
//   moment at which a socket's bytes reach this program without a target.
//
// Built by proxy/build.rs with `clang -O2 -g -target bpf`; loaded by the
// `aya` crate.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} PEERS SEC(".maps");

// As many entries as PEERS: a connection enters TARGETS first and leaves
// it last, so when its TARGETS entries fit, its PEERS entries fit too.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} TARGETS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} MOVED SEC(".maps");

SEC("sk_skb/stream_verdict")
int sluice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 *moved;

	// A FIN comes as an empty skb. Redirected, the peer's backlog would
	// "send" 0 bytes, which it takes for a broken pipe (EPIPE on the
	// peer). The FIN is userspace's to pass on (after the data): drop it.
	if (skb->len == 0)
		return SK_DROP;
	moved = bpf_map_lookup_elem(&MOVED, &cookie);

	if (moved)
		__sync_fetch_and_add(moved, skb->len);
	// No peer (the connection is being taken apart): SK_DROP, never a
	// byte delivered to the wrong socket.
	return bpf_sk_redirect_hash(skb, &TARGETS, &cookie, 0);
}

char LICENSE[] SEC("license") = "GPL";
