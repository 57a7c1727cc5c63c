// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * socktap's kernel side: one event per TCP send/recv call, tagged with the
 * socket cookie, written to a ring buffer.
 *
 * Three attach modes share one event builder; userspace loads the programs of
 * exactly one mode (fentry, then kprobe, then tracepoint):
 *   fentry:     fexit on tcp_sendmsg / tcp_recvmsg (BPF trampolines)
 *   kprobe:     kprobe + kretprobe on the same functions, and a sock_ops
 *               program that gives each new connection its cookie
 *   tracepoint: tp_btf sock_send_length / sock_recv_length, TCP only
 */
#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "event.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Makes the event record and its enums part of the object's BTF, so the
 * skeleton's generated `types` module carries them for the Rust decoder. */
struct socktap_event socktap_event_layout = {};
enum socktap_event_kind socktap_kind_layout = SOCKTAP_KIND_SEND;
enum socktap_attach_mode socktap_mode_layout = SOCKTAP_MODE_FENTRY;
enum socktap_want_dim socktap_want_dim_layout = SOCKTAP_WANT_COOKIE;
struct socktap_want_key socktap_want_key_layout = {};
enum socktap_drops_layout socktap_drops_stride_layout = SOCKTAP_DROPS_STRIDE;
struct socktap_cgroup_tree socktap_cgroup_tree_layout = {};
enum socktap_cgroup_levels socktap_cgroup_levels_layout = SOCKTAP_CGROUP_LEVELS;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024); /* resized by userspace before load */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct socktap_control);
} control SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct socktap_counters);
} counters SEC(".maps");

/* Ring buffer reservations that failed (ring full), a cache line per CPU
 * (see SOCKTAP_DROPS_STRIDE). Userspace sizes it to the possible CPUs
 * before load and maps it, so the reader sums it from memory after every
 * pass instead of making a bpf() call on the way to every subscriber. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, SOCKTAP_DROPS_STRIDE); /* resized by userspace */
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* The kernel prefilter's keys (see socktap_control.prefilter), written by
 * userspace: the union of what the subscribers' filters can match. The
 * value is unused. Preallocated, so lookups never allocate. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct socktap_want_key);
	__type(value, __u8);
} wanted SEC(".maps");

/* No program uses these two. Updating an element of a map of maps returns
 * only once every program that was running has returned (the kernel waits
 * for an RCU grace period, so that userspace knows no program still uses
 * the old value). socktapd updates `program_barrier` with the inner map to
 * wait so before it removes prefilter keys that programs which read an
 * older control word may still look up. */
struct program_barrier_inner_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} program_barrier_inner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct program_barrier_inner_map);
} program_barrier SEC(".maps");

/* The cgroups that subscribers' filters name by path (the cgroup itself, not
 * those below it), written by userspace; see socktap_event.cgroup_tree. A
 * call made in a cgroup below one of them is matched from its first call,
 * before socktapd has seen that cgroup. The value is unused. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_roots SEC(".maps");

/* Each calling cgroup's nearest cgroup in `cgroup_roots`, so that a call
 * looks up one entry instead of every level above its cgroup. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct socktap_cgroup_tree);
} cgroup_tree_cache SEC(".maps");

/* kprobe mode only: the socket and flags of a call in flight, by thread.
 * An LRU map: a call whose return probe missed its return (more calls in
 * flight than it tracks) leaves its entry behind, and a thread that then
 * exits would keep it for good; the oldest go first when the map is full. */
struct call_args {
	struct sock *sk;
	int flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct call_args);
} inflight SEC(".maps");

/* Set by userspace before load (kprobe mode): index of tcp_recvmsg's `flags`
 * argument; 3 since Linux 5.19, 4 before (a `nonblock` argument preceded it). */
const volatile int recvmsg_flags_arg = 3;

/* Half the ring's size in bytes, set by the loader with the ring's size:
 * more unconsumed data than this forces a wakeup. */
const volatile __u64 ring_half_bytes = 1;

/* The least time between two wakeups forced by a half-full ring. */
#define BACKSTOP_GAP_NS 100000

/* The control entry when events are wanted from `tgid`, else NULL. Every
 * program checks it first, so a closed gate costs one array lookup. */
static __always_inline struct socktap_control *gate(__u32 tgid)
{
	__u32 zero = 0;
	struct socktap_control *cfg = bpf_map_lookup_elem(&control, &zero);

	if (!cfg || !cfg->enabled || (cfg->ignore_tgid && tgid == cfg->ignore_tgid))
		return NULL;
	return cfg;
}

/* TCP over IPv4/IPv6; `sk` is a BTF-typed pointer (direct loads). */
static __always_inline bool is_tcp(struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;

	if (family != AF_INET && family != AF_INET6)
		return false;
	return sk->sk_protocol == IPPROTO_TCP && sk->sk_type == SOCK_STREAM;
}

/* The local port in host byte order. `direct`: `sk` is BTF-typed. */
static __always_inline __u16 local_port(struct sock *sk, bool direct)
{
	__u16 port = direct ? sk->__sk_common.skc_num : BPF_CORE_READ(sk, __sk_common.skc_num);

	if (!port) /* unbound after a reset: see struct inet_sock */
		port = __builtin_bswap16(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	return port;
}

static __always_inline bool want_key(__u32 dim, __u64 value)
{
	struct socktap_want_key key = { .dim = dim, .value = value };

	return bpf_map_lookup_elem(&wanted, &key) != NULL;
}

/* The nearest cgroup at or above the caller's (`cgroup`) that is in
 * `cgroup_roots`; 0 when none, or when the map is not in use. */
static __always_inline __u64 cgroup_tree(struct socktap_control *cfg, __u64 cgroup)
{
	struct socktap_cgroup_tree *cached, found = { .trees = cfg->cgroup_trees };
	__u32 level;

	if (!found.trees)
		return 0;
	cached = bpf_map_lookup_elem(&cgroup_tree_cache, &cgroup);
	if (cached && cached->trees == found.trees)
		return cached->tree;
	/* Level 0 is the root cgroup; past the caller's own level the helper
	 * returns 0. The deepest match is the nearest. */
	for (level = 0; level < SOCKTAP_CGROUP_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id)
			break;
		if (bpf_map_lookup_elem(&cgroup_roots, &id))
			found.tree = id;
	}
	bpf_map_update_elem(&cgroup_tree_cache, &cgroup, &found, BPF_ANY);
	return found.tree;
}

/* The kernel prefilter: whether some subscriber may want this call. Only the
 * dimensions that have keys are looked up, cheapest first. A comm key is a
 * hash, so other comms may pass too: the prefilter only has to let through
 * every call some subscriber wants; the daemon filters exactly. */
static __always_inline bool wanted_call(struct socktap_control *cfg, __u64 pid_tgid, struct sock *sk, bool direct,
					__u64 cookie, __u64 cgroup, __u64 tree)
{
	__u32 dims = cfg->prefilter;
	__u16 port;

	if (!dims)
		return true;
	if ((dims & (1 << SOCKTAP_WANT_COOKIE)) && want_key(SOCKTAP_WANT_COOKIE, cookie))
		return true;
	if ((dims & (1 << SOCKTAP_WANT_PID)) && want_key(SOCKTAP_WANT_PID, pid_tgid >> 32))
		return true;
	if ((dims & (1 << SOCKTAP_WANT_LOCAL_PORT)) && want_key(SOCKTAP_WANT_LOCAL_PORT, local_port(sk, direct)))
		return true;
	if (dims & (1 << SOCKTAP_WANT_REMOTE_PORT)) {
		port = direct ? sk->__sk_common.skc_dport : BPF_CORE_READ(sk, __sk_common.skc_dport);
		if (want_key(SOCKTAP_WANT_REMOTE_PORT, __builtin_bswap16(port)))
			return true;
	}
	if ((dims & (1 << SOCKTAP_WANT_UID)) && want_key(SOCKTAP_WANT_UID, (__u32)bpf_get_current_uid_gid()))
		return true;
	/* A cgroup named by path has its tree's cgroups as keys, as socktapd
	 * last saw them: one created below it since is matched through `tree`. */
	if ((dims & (1 << SOCKTAP_WANT_CGROUP)) &&
	    (want_key(SOCKTAP_WANT_CGROUP, cgroup) || (tree && want_key(SOCKTAP_WANT_CGROUP, tree))))
		return true;
	if (dims & (1 << SOCKTAP_WANT_COMM)) {
		/* Two words, so the halves load aligned; the helper pads with NULs. */
		__u64 comm[2] = {};

		bpf_get_current_comm(comm, sizeof(comm));
		if (want_key(SOCKTAP_WANT_COMM, comm[0] ^ comm[1]))
			return true;
	}
	return false;
}

/* Socket fields, for a BTF-typed `sk` (fentry, tp_btf): direct loads, which
 * the verifier turns into fault-safe loads without a helper call. */
static __always_inline void fill_sock_direct(struct socktap_event *e, struct sock *sk)
{
	e->netns = sk->__sk_common.skc_net.net->ns.inum;
	e->sport = local_port(sk, true);
	e->dport = __builtin_bswap16(sk->__sk_common.skc_dport);
	e->family = sk->__sk_common.skc_family;
	if (e->family == AF_INET6 && bpf_core_field_exists(sk->__sk_common.skc_v6_daddr)) {
		__builtin_memcpy(e->saddr, sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(e->daddr, sk->__sk_common.skc_v6_daddr.in6_u.u6_addr8, 16);
	} else {
		__builtin_memset(e->saddr, 0, sizeof(e->saddr));
		__builtin_memset(e->daddr, 0, sizeof(e->daddr));
		*(__u32 *)e->saddr = sk->__sk_common.skc_rcv_saddr;
		*(__u32 *)e->daddr = sk->__sk_common.skc_daddr;
	}
}

/* Socket fields, for an untyped `sk` (kprobe): bpf_probe_read_kernel. */
static __always_inline void fill_sock_probe_read(struct socktap_event *e, struct sock *sk)
{
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->sport = local_port(sk, false);
	e->dport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (e->family == AF_INET6 && bpf_core_field_exists(sk->__sk_common.skc_v6_daddr)) {
		bpf_core_read(e->saddr, sizeof(e->saddr), &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(e->daddr, sizeof(e->daddr), &sk->__sk_common.skc_v6_daddr);
	} else {
		__builtin_memset(e->saddr, 0, sizeof(e->saddr));
		__builtin_memset(e->daddr, 0, sizeof(e->daddr));
		BPF_CORE_READ_INTO((__u32 *)e->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)e->daddr, sk, __sk_common.skc_daddr);
	}
}

/* Writes one event. `direct` is a compile-time constant per call site. */
static __always_inline void emit(struct socktap_control *cfg, __u64 pid_tgid, struct sock *sk, bool direct,
				 int ret, __u8 kind, __u8 mode, __u64 cookie)
{
	__u32 zero = 0;
	struct socktap_counters *st = bpf_map_lookup_elem(&counters, &zero);
	struct socktap_event *e;
	__u64 seq, now, flags = BPF_RB_NO_WAKEUP;
	__u64 cgroup = 0, tree = 0;

	/* Before the prefilter only when it needs them; a cgroup id is never 0. */
	if (cfg->cgroup_trees || (cfg->prefilter & (1 << SOCKTAP_WANT_CGROUP))) {
		cgroup = bpf_get_current_cgroup_id();
		tree = cgroup_tree(cfg, cgroup);
	}
	if (!st || !wanted_call(cfg, pid_tgid, sk, direct, cookie, cgroup, tree))
		return; /* unwanted calls take no sequence number */

	/*
	 * The sequence number is taken after the reservation, so a record
	 * follows in the ring every record numbered before it by more than a
	 * few instructions: the reader stops at a record still being written,
	 * so a program preempted here (or a vCPU descheduled under emulation)
	 * holds back the records after it instead of being overtaken by them.
	 * Taken before, such a record arrived after later ones.
	 */
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	seq = __sync_fetch_and_add(&st->next_seq, 1);
	if (!e) {
		__u32 slot = bpf_get_smp_processor_id() * SOCKTAP_DROPS_STRIDE;
		__u64 *d = bpf_map_lookup_elem(&drops, &slot);

		/* Atomic: a task that preempts this one on the same CPU may
		 * count in the same slot. The number taken is the gap. */
		if (d)
			__sync_fetch_and_add(d, 1);
		return;
	}

	now = bpf_ktime_get_ns();
	e->seq = seq;
	e->ts_ns = now;
	e->cookie = cookie;
	e->cgroup_id = cgroup ? cgroup : bpf_get_current_cgroup_id();
	e->cgroup_tree = tree;
	e->ret = ret;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cpu = bpf_get_smp_processor_id();
	e->kind = kind;
	e->mode = mode;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (direct)
		fill_sock_direct(e, sk);
	else
		fill_sock_probe_read(e, sk);

	/*
	 * Wakeups. Interval 0 (low rates): the ring buffer's own rule, which
	 * wakes the reader exactly when it has caught up (it has consumed
	 * everything before this record), so no event waits in the ring for
	 * a later one. Otherwise (a nonzero --wakeup-interval-us): wake the
	 * reader at most once per interval; its timed poll picks up the
	 * tail. At high rates userspace sets the interval to the most a u32
	 * holds (4.29 s): the reader drains on its own timer, and the traced
	 * call takes no interrupt for a wakeup. Whatever the interval, a ring
	 * more than half full wakes the reader (at most once per
	 * BACKSTOP_GAP_NS): a reader whose timer runs late (a descheduled
	 * vCPU) is called before the ring overflows.
	 */
	if (!cfg->wakeup_interval_ns) {
		flags = 0;
	} else if (now - st->last_wakeup_ns >= cfg->wakeup_interval_ns ||
		   (now - st->last_wakeup_ns >= BACKSTOP_GAP_NS &&
		    bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > ring_half_bytes)) {
		st->last_wakeup_ns = now;
		flags = BPF_RB_FORCE_WAKEUP;
	}
	bpf_ringbuf_submit(e, flags);
}

/* ---- fentry mode ---- */

SEC("fexit/tcp_sendmsg")
int BPF_PROG(st_fexit_send, struct sock *sk)
{
	__u64 id = bpf_get_current_pid_tgid(), ret = 0;
	struct socktap_control *cfg = gate(id >> 32);

	if (!cfg)
		return 0;
	bpf_get_func_ret(ctx, &ret);
	emit(cfg, id, sk, true, (int)ret, SOCKTAP_KIND_SEND, SOCKTAP_MODE_FENTRY, bpf_get_socket_cookie(sk));
	return 0;
}

SEC("fexit/tcp_recvmsg")
int BPF_PROG(st_fexit_recv, struct sock *sk)
{
	__u64 id = bpf_get_current_pid_tgid(), ret = 0, flags = 0;
	struct socktap_control *cfg = gate(id >> 32);

	if (!cfg)
		return 0;
	/* tcp_recvmsg(sk, msg, len, [nonblock,] flags, addr_len) */
	bpf_get_func_arg(ctx, bpf_get_func_arg_cnt(ctx) == 6 ? 4 : 3, &flags);
	if (flags & MSG_PEEK)
		return 0;
	bpf_get_func_ret(ctx, &ret);
	emit(cfg, id, sk, true, (int)ret, SOCKTAP_KIND_RECV, SOCKTAP_MODE_FENTRY, bpf_get_socket_cookie(sk));
	return 0;
}

/*
 * splice() from a TCP socket (tcp_splice_read) reads without tcp_recvmsg():
 * a receive too, of the bytes it moved into the pipe.
 */
SEC("fexit/tcp_splice_read")
int BPF_PROG(st_fexit_splice, struct socket *sock)
{
	__u64 id = bpf_get_current_pid_tgid(), ret = 0;
	struct socktap_control *cfg = gate(id >> 32);
	struct sock *sk;

	if (!cfg)
		return 0;
	sk = sock->sk;
	if (!sk)
		return 0;
	bpf_get_func_ret(ctx, &ret);
	emit(cfg, id, sk, true, (int)ret, SOCKTAP_KIND_RECV, SOCKTAP_MODE_FENTRY, bpf_get_socket_cookie(sk));
	return 0;
}

/* ---- kprobe mode ---- */

static __always_inline int remember(struct sock *sk, int flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call_args args = { .sk = sk, .flags = flags };

	if (!gate(id >> 32)) {
		/* An entry left by an earlier call of this thread whose return
		 * was missed must not be taken for this call's at its return
		 * (the gate may open meanwhile). */
		bpf_map_delete_elem(&inflight, &id);
		return 0;
	}
	bpf_map_update_elem(&inflight, &id, &args, BPF_ANY);
	return 0;
}

static __always_inline int finish(int ret, __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call_args *args = bpf_map_lookup_elem(&inflight, &id);
	struct socktap_control *cfg;
	struct sock *sk;

	if (!args)
		return 0;
	sk = args->sk;
	cfg = gate(id >> 32);
	if (cfg && !(args->flags & MSG_PEEK)) {
		/* kprobe programs may not call bpf_get_socket_cookie(): read the
		 * cookie the socket holds. It is 0 until something (SO_COOKIE,
		 * sock_diag, a BPF program such as st_sockops_cookie below) has
		 * asked for it. */
		__u64 cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);

		emit(cfg, id, sk, false, ret, kind, SOCKTAP_MODE_KPROBE, cookie);
	}
	bpf_map_delete_elem(&inflight, &id);
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(st_kp_send, struct sock *sk)
{
	return remember(sk, 0);
}

SEC("kretprobe/tcp_sendmsg")
int BPF_KRETPROBE(st_kret_send, int ret)
{
	return finish(ret, SOCKTAP_KIND_SEND);
}

SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(st_kp_recv, struct sock *sk)
{
	/* Load both candidate registers as fixed ctx offsets: the verifier
	 * refuses a ctx access through a computed offset. */
	long parm4 = PT_REGS_PARM4(ctx), parm5 = PT_REGS_PARM5(ctx);

	barrier_var(parm4);
	barrier_var(parm5);
	return remember(sk, (int)(recvmsg_flags_arg == 4 ? parm5 : parm4));
}

SEC("kretprobe/tcp_recvmsg")
int BPF_KRETPROBE(st_kret_recv, int ret)
{
	return finish(ret, SOCKTAP_KIND_RECV);
}

SEC("kprobe/tcp_splice_read")
int BPF_KPROBE(st_kp_splice, struct socket *sock)
{
	return remember(BPF_CORE_READ(sock, sk), 0);
}

SEC("kretprobe/tcp_splice_read")
int BPF_KRETPROBE(st_kret_splice, long ret)
{
	return finish((int)ret, SOCKTAP_KIND_RECV);
}

/*
 * kprobe mode: a socket's cookie is assigned the first time something asks
 * for it, and kprobe programs may not ask. This sock_ops program, attached
 * to the root cgroup, asks for every TCP socket as it connects or is
 * accepted, so that the kprobe programs find the same cookie SO_COOKIE
 * would return. The kernel runs it a few times per connection, at its
 * setup (connect, established, and its queries for a connection's initial
 * timeout, window and ECN), never per call; it leaves the kernel's
 * defaults alone (its reply stays 0).
 */
SEC("sockops")
int st_sockops_cookie(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_get_socket_cookie(skops);
	}
	return 1;
}

/* ---- tracepoint mode ---- */

SEC("tp_btf/sock_send_length")
int BPF_PROG(st_tp_send, struct sock *sk, int ret, int flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct socktap_control *cfg = gate(id >> 32);

	if (cfg && is_tcp(sk))
		emit(cfg, id, sk, true, ret, SOCKTAP_KIND_SEND, SOCKTAP_MODE_TRACEPOINT, bpf_get_socket_cookie(sk));
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(st_tp_recv, struct sock *sk, int ret, int flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct socktap_control *cfg = gate(id >> 32);

	if (cfg && !(flags & MSG_PEEK) && is_tcp(sk))
		emit(cfg, id, sk, true, ret, SOCKTAP_KIND_RECV, SOCKTAP_MODE_TRACEPOINT, bpf_get_socket_cookie(sk));
	return 0;
}
