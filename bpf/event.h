/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of the record socktap's BPF program writes to its ring
 * buffer. Rust reads it through the skeleton's generated `types` module; it is
 * never mirrored by hand.
 */
#ifndef SOCKTAP_EVENT_H
#define SOCKTAP_EVENT_H

#define SOCKTAP_COMM_LEN 16

/* socktap_event.kind */
enum socktap_event_kind {
	SOCKTAP_KIND_SEND = 1,
	SOCKTAP_KIND_RECV = 2,
};

/* socktap_event.mode: which programs produced the event. */
enum socktap_attach_mode {
	SOCKTAP_MODE_FENTRY = 1,
	SOCKTAP_MODE_KPROBE = 2,
	SOCKTAP_MODE_TRACEPOINT = 3,
};

/*
 * One send or receive call on a TCP socket. Fields are ordered largest first
 * so the record has no padding holes; 112 bytes.
 */
struct socktap_event {
	__u64 seq;          /* kernel sequence number, one per attempted event */
	__u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;       /* bpf_get_socket_cookie(sk), == SO_COOKIE */
	__u64 cgroup_id;    /* cgroup v2 id of the calling task */
	__u64 cgroup_tree;  /* the nearest cgroup at or above it that is in the
			     * `cgroup_roots` map (a filter names it by path);
			     * 0 when none, or while the map is not in use */
	__u8 saddr[16];     /* local address: IPv4 in the first 4 bytes, or IPv6 */
	__u8 daddr[16];     /* remote address, same layout */
	__s32 ret;          /* the call's return value: bytes (>= 0) or -errno */
	__u32 pid;          /* tgid */
	__u32 tid;          /* kernel pid of the thread */
	__u32 uid;
	__u32 netns;        /* network namespace inode number */
	__u32 cpu;
	__u16 sport;        /* local port, host byte order */
	__u16 dport;        /* remote port, host byte order */
	__u16 family;       /* AF_INET or AF_INET6 */
	__u8 kind;          /* enum socktap_event_kind */
	__u8 mode;          /* enum socktap_attach_mode */
	char comm[SOCKTAP_COMM_LEN];
};

/* The single entry of the `control` array map, written by userspace. */
struct socktap_control {
	/* 0: nobody wants events, write nothing; 1: emit events */
	__u32 enabled;
	/* 0: wake the reader when it has caught up (the ring buffer's rule);
	 * else wake it when this many ns have passed since the last wakeup */
	__u32 wakeup_interval_ns;
	/* a process whose calls are not reported (socktapd itself), 0: none */
	__u32 ignore_tgid;
	/* The kernel prefilter: 0, every call is an event; else a bit
	 * (1 << dim) per enum socktap_want_dim that has keys in the `wanted`
	 * map, and a call is an event only if one of its values for those
	 * dimensions is a key there. */
	__u32 prefilter;
	/* 0: `cgroup_roots` is not in use, cgroup_tree is 0. Else it changes
	 * whenever userspace changes that map, so that the programs look up
	 * again the cgroup trees they remembered (`cgroup_tree_cache`). */
	__u32 cgroup_trees;
};

/* A value of the `cgroup_tree_cache` map: a cgroup's nearest cgroup in
 * `cgroup_roots`, as it was when socktap_control.cgroup_trees was `trees`. */
struct socktap_cgroup_tree {
	__u64 trees;
	__u64 tree;
};

/* How far the programs look up from a cgroup for one in `cgroup_roots`: the
 * levels below the root cgroup (the kernel allows more; a cgroup deeper than
 * this is matched through the ancestors at the first levels). An enum, so the
 * skeleton's types carry it. */
enum socktap_cgroup_levels {
	SOCKTAP_CGROUP_LEVELS = 32,
};

/* A dimension of the kernel prefilter. */
enum socktap_want_dim {
	SOCKTAP_WANT_COOKIE = 1,
	SOCKTAP_WANT_PID = 2,         /* tgid */
	SOCKTAP_WANT_CGROUP = 3,      /* cgroup v2 id */
	SOCKTAP_WANT_LOCAL_PORT = 4,  /* host byte order */
	SOCKTAP_WANT_REMOTE_PORT = 5, /* host byte order */
	SOCKTAP_WANT_UID = 6,
	SOCKTAP_WANT_COMM = 7,        /* the comm's two NUL-padded 8-byte halves, XORed */
};

/* A key of the `wanted` map: one value of one dimension. */
struct socktap_want_key {
	__u32 dim;   /* enum socktap_want_dim */
	__u32 pad;   /* 0 */
	__u64 value;
};

/* The `drops` map: CPU n counts in slot n * SOCKTAP_DROPS_STRIDE (8 u64s,
 * a cache line per CPU). An enum, so the skeleton's types carry it. */
enum socktap_drops_layout {
	SOCKTAP_DROPS_STRIDE = 8,
};

/* The single entry of the `counters` array map. */
struct socktap_counters {
	__u64 next_seq;        /* events attempted so far (== next sequence number) */
	__u64 last_wakeup_ns;  /* ts of the last forced ring-buffer wakeup */
};

#endif /* SOCKTAP_EVENT_H */
