/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The few kernel types and constants socktap reads, instead of a generated
 * vmlinux.h. Struct layouts are CO-RE relocated against the running kernel's
 * BTF (preserve_access_index), so only the fields named here matter, not
 * their order or offsets. Anonymous unions of the real kernel structs are
 * flattened: libbpf matches fields by name through anonymous members.
 */
#ifndef SOCKTAP_KERNEL_H
#define SOCKTAP_KERNEL_H

/* This header stands in for vmlinux.h: tells bpf_tracing.h to use the
 * kernel's pt_regs field names (di, si, ax...) rather than userspace's. */
#define __VMLINUX_H__

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

/* uapi/linux/bpf.h: stable ABI values */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_ARRAY_OF_MAPS = 12,
	BPF_MAP_TYPE_RINGBUF = 27,
};
enum {
	BPF_ANY = 0,
};
enum {
	BPF_F_MMAPABLE = 1U << 10,
};
enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};
enum {
	BPF_RB_AVAIL_DATA = 0,
};
/* The sock_ops callbacks at which a TCP socket gets its cookie (kprobe
 * mode). */
enum {
	BPF_SOCK_OPS_TCP_CONNECT_CB = 3,
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4,
	BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB = 5,
};
/* A sock_ops program's context: the verifier rewrites its loads by the
 * UAPI offsets, so it is not CO-RE relocated; `op` is its first field. */
struct bpf_sock_ops {
	__u32 op;
};

/* uapi socket constants */
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOCK_STREAM 1
#define MSG_PEEK 2

/* arch/x86/include/asm/ptrace.h, used by BPF_KPROBE's PT_REGS_* accessors */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
} __attribute__((preserve_access_index));

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} __attribute__((preserve_access_index)) possible_net_t;

typedef struct {
	__s64 counter;
} atomic64_t;

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	atomic64_t skc_cookie;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_type;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

/* A TCP socket's struct sock is the start of its inet_sock. inet_sport
 * keeps the local port after the kernel unbinds it (skc_num becomes 0 when
 * a reset closes the socket while data is still there to read). */
struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
} __attribute__((preserve_access_index));

/* The socket file's side of a socket: splice() reaches TCP through it. */
struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

#endif /* SOCKTAP_KERNEL_H */
