#!/usr/bin/env bash
# Boots Debian kernels under QEMU (TCG) and runs socktap's privileged tests
# in each attach mode they should support; checks the refused ones fail
# cleanly. Prints a kernel × mode matrix; exits non-zero if any cell differs
# from tests/vm/kernels.
#
# Usage: tests/vm/matrix.sh              every cell
#        tests/vm/matrix.sh 6.1          one kernel
#        tests/vm/matrix.sh 6.1 fentry   one cell
# Kernels, the initramfs and logs are kept under target/vm/.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
vm=$root/target/vm
mkdir -p "$vm/logs"
only_kernel=${1:-}
only_mode=${2:-}
boot_timeout=${SOCKTAP_VM_TIMEOUT:-900}

scripts/deps.sh qemu-system-x86 busybox-static

# --- the binaries under test ------------------------------------------------
tests=$(cargo test --locked --no-run --message-format=json \
          --test probe --test probe_lifecycle --test daemon_kernel --test cli_kernel 2>/dev/null |
        grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
daemon=$(cargo build --locked --bin socktapd --message-format=json 2>/dev/null |
         sed -n 's/.*"executable":"\([^"]*socktapd\)".*/\1/p')
if [ -z "$tests" ] || [ -z "$daemon" ]; then echo "matrix: building the test binaries failed" >&2; exit 1; fi

# --- the initramfs: busybox, the binaries (stripped) and their libraries ----
initrd=$vm/initramfs.cpio
rm -rf "$vm/rootfs"
mkdir -p "$vm/rootfs"/{bin,proc,sys,dev,tmp,tests}
cp /bin/busybox "$vm/rootfs/bin/busybox"
cp tests/vm/init "$vm/rootfs/init"
chmod +x "$vm/rootfs/init"
for t in $tests; do strip -g -o "$vm/rootfs/tests/$(basename "$t")" "$t"; done
strip -g -o "$vm/rootfs/socktapd" "$daemon"
for bin in $tests $daemon; do
  ldd "$bin" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$vm/rootfs$(dirname "$lib")"
    cp -L "$lib" "$vm/rootfs$lib"
  done
done
(cd "$vm/rootfs" && find . | busybox cpio -o -H newc 2>/dev/null) > "$initrd"

# --- kernels from Debian's archive, through a private apt directory --------
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
# The kernel, and the modules of sock_diag's TCP dumps (inet_diag, tcp_diag),
# which Debian builds as modules and a host loads when a dump asks for them:
# socktapd's kprobe mode dumps TCP sockets to give them their cookies.
# Listed in the order they load in: a module after those it needs.
diag_modules=(inet_diag tcp_diag)
fetch_kernel() { # name suite -> path of vmlinuz
  local name=$1 suite=$2 dir=$vm/kernels/$1 apt=$vm/apt-$2
  if [ ! -f "$dir/vmlinuz" ] || [ ! -d "$dir/modules" ]; then
    mkdir -p "$dir" "$apt"/{lists/partial,cache/archives/partial}
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
                -o "APT::Sandbox::User=$(id -un)" -o Debug::NoLocking=1)
    apt-get "${opts[@]}" -qq update >&2
    local pkg
    pkg=$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$pkg" ] || { echo "matrix: no linux-image-cloud-amd64 in $suite" >&2; return 1; }
    # Since Linux 7.x, Debian's linux-image-VERSION only depends on the
    # package that holds the kernel itself, linux-binary-VERSION, which
    # keeps it as /usr/lib/modules/VERSION/vmlinuz (not /boot/vmlinuz-VERSION).
    # Its modules, likewise, in linux-modules-VERSION.
    local parts
    parts=$(apt-cache "${opts[@]}" depends "$pkg" | awk '/Depends: linux-(binary|modules)-[0-9]/ { print $2 }' | tr '\n' ' ')
    echo "matrix: fetching $pkg $parts($suite)" >&2
    # shellcheck disable=SC2086 # $parts is a list of words, or none
    (cd "$dir" && rm -rf x modules ./*.deb && apt-get "${opts[@]}" -qq download "$pkg" $parts >&2 &&
       for deb in ./*.deb; do dpkg-deb -x "$deb" x; done &&
       cp "$(find x/boot x/usr/lib/modules -name 'vmlinuz*' -type f 2>/dev/null | head -1)" vmlinuz &&
       mkdir -p x/m && for m in "${diag_modules[@]}"; do
         ko=$(find x/lib/modules x/usr/lib/modules -name "$m.ko*" 2>/dev/null | head -1)
         [ -n "$ko" ] || { echo "matrix: no $m module in $pkg" >&2; exit 1; }
         case $ko in
           *.xz) xz -dc "$ko" ;;
           *.zst) zstd -qdc "$ko" ;;
           *) cat "$ko" ;;
         esac > "x/m/$m.ko"
       done && mv x/m modules && rm -rf x ./*.deb)
  fi
  echo "$dir/vmlinuz"
}
# The initramfs with a kernel's modules appended (the kernel unpacks
# concatenated cpio archives in turn): /modules, which /init loads in the
# order /modules/order gives.
kernel_initrd() { # name -> path of its initrd
  local dir=$vm/kernels/$1 m
  rm -rf "$dir/root" && mkdir -p "$dir/root/modules"
  for m in "${diag_modules[@]}"; do
    cp "$dir/modules/$m.ko" "$dir/root/modules/" || { echo "matrix: no $m module for kernel $1" >&2; return 1; }
  done
  # The order /init loads them in.
  printf '%s\n' "${diag_modules[@]}" > "$dir/root/modules/order"
  (cd "$dir/root" && find . | busybox cpio -o -H newc 2>/dev/null) | cat "$initrd" - > "$dir/initrd.cpio"
  rm -rf "$dir/root"
  echo "$dir/initrd.cpio"
}

# --- the cells ----------------------------------------------------------------
modes=(fentry kprobe tracepoint)
declare -a rows
failed=0
while read -r name suite e_fentry e_kprobe e_tracepoint; do
  case $name in ''|'#'*) continue ;; esac
  [ -z "$only_kernel" ] || [ "$only_kernel" = "$name" ] || continue
  kernel=$(fetch_kernel "$name" "$suite")
  kinitrd=$(kernel_initrd "$name") || exit 1
  expects=("$e_fentry" "$e_kprobe" "$e_tracepoint")
  row=$(printf '%-6s' "$name")
  for i in 0 1 2; do
    mode=${modes[$i]} expect=${expects[$i]}
    if [ -n "$only_mode" ] && [ "$only_mode" != "$mode" ]; then row+=$(printf ' %-22s' "-"); continue; fi
    log=$vm/logs/$name-$mode.log
    echo "matrix: booting $name ($suite), mode $mode, expecting $expect; console: $log"
    start=$(date +%s)
    # Single-threaded TCG: two vCPUs, emulated in turn. Multi-threaded TCG
    # let a vCPU run a stale translation of a tracepoint call site that the
    # kernel was text-patching (an "Oops: int3" in call_trace_sock_recv_length
    # on 6.12 while tests attached and detached programs concurrently).
    timeout "$boot_timeout" qemu-system-x86_64 -accel tcg,thread=single -cpu max -smp 2 -m 1536 -nographic -no-reboot \
      -kernel "$kernel" -initrd "$kinitrd" \
      -append "console=ttyS0 panic=-1 rdinit=/init quiet socktap.mode=$mode socktap.expect=$expect" \
      </dev/null >"$log" 2>&1 || true
    secs=$(( $(date +%s) - start ))
    line=$(grep -a '^SOCKTAP-RESULT' "$log" | tail -1 || true)
    got=$(sed -n 's/.* result=\([a-z-]*\).*/\1/p' <<<"$line")
    got=${got:-no-result}
    if [ "$got" = "$expect" ]; then mark=ok; else mark=MISMATCH; failed=1; tail -50 "$log"; fi
    echo "matrix: $name $mode: $got (expected $expect, ${secs}s) ${line#SOCKTAP-RESULT }"
    row+=$(printf ' %-22s' "$got/$mark")
  done
  rows+=("$row")
done < tests/vm/kernels

echo
printf '%-6s %-22s %-22s %-22s\n' kernel fentry kprobe tracepoint
printf '%s\n' "${rows[@]}"
exit $failed
