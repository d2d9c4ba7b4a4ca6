#!/bin/busybox sh
# /init of the nested host of the hardware-KVM test lane (tests/hwkvm/run.sh).
#
# Stage 1 (PID 1 in the initramfs): loads kvm_amd (SVM emulated by QEMU's TCG) and the
# 9p modules, mounts the host's root filesystem over virtio-9p on /mnt with fresh proc,
# sys, dev, tmp and run on it, and switches root into it (a switch_root, not a chroot:
# a chrooted process may not create user namespaces, which the sandboxes need).
# Stage 2 (PID 1 in the host's tree): runs the test executables that /hwkvm.conf
# (written by lane.py) lists in hwkvm_tests. lane.py reads the HWKVM- console lines.

fail() {
  echo "HWKVM-FAIL $*"
  poweroff -f
  sleep 60
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# The kernel's console is ttyS1 (a file on the host); ours is ttyS0 (streamed).
exec < /dev/null > /dev/ttyS0 2>&1

if [ "$1" != stage2 ]; then
  /bin/busybox --install -s /bin
  export PATH=/bin
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t devtmpfs devtmpfs /dev 2>/dev/null

  . /hwkvm.conf
  for mod in $HWKVM_MODULES; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
  done
  [ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (is SVM emulated? -cpu ...,+svm)"
  ip link set lo up

  m=/mnt
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,access=any \
    hostroot "$m" || fail "mounting the host's root over virtio-9p"
  mount -t proc proc "$m/proc" || fail "mount proc"
  mount -t sysfs sysfs "$m/sys" || fail "mount sysfs"
  mount -t cgroup2 cgroup2 "$m/sys/fs/cgroup" 2>/dev/null
  mount -t devtmpfs devtmpfs "$m/dev" || fail "mount devtmpfs"
  mkdir -p "$m/dev/pts" "$m/dev/shm"
  mount -t devpts devpts "$m/dev/pts"
  mount -t tmpfs -o mode=1777 shm "$m/dev/shm"
  ln -sf /proc/self/fd "$m/dev/fd"
  ln -sf /proc/self/fd/0 "$m/dev/stdin"
  ln -sf /proc/self/fd/1 "$m/dev/stdout"
  ln -sf /proc/self/fd/2 "$m/dev/stderr"
  # Unix sockets and the VMM's runtime directories cannot live on 9p; nothing the
  # tests leave in /tmp or /run reaches the host. What the tests need from under /tmp or
  # /run (a checkout there, say) is held aside first and put back on top.
  held=0
  for p in $HWKVM_REPO $HWKVM_KEEP; do
    case "$p" in /tmp/*|/run/*) ;; *) continue ;; esac
    held=$((held + 1))
    mkdir -p "/hold/$held"
    mount -o bind "$m$p" "/hold/$held" || fail "holding $p aside"
    echo "$p" > "/hold/$held.path"
  done
  mount -t tmpfs -o mode=1777 tmp "$m/tmp" || fail "mount /tmp"
  mount -t tmpfs -o mode=755 run "$m/run" || fail "mount /run"
  i=0
  while [ "$i" -lt "$held" ]; do
    i=$((i + 1))
    p="$(cat "/hold/$i.path")"
    mkdir -p "$m$p"
    mount -o move "/hold/$i" "$m$p" || fail "putting $p back"
  done
  mkdir -p "$m/run/hwkvm/bin"
  cp /bin/busybox /init /hwkvm.conf "$m/run/hwkvm/" || fail "copying stage 2 to /run/hwkvm"
  exec switch_root "$m" /run/hwkvm/busybox sh /run/hwkvm/init stage2
  fail "switch_root"
fi

# Stage 2: / is the host's root over 9p; our busybox is in /run/hwkvm (tmpfs).
/run/hwkvm/busybox --install -s /run/hwkvm/bin
export PATH=/run/hwkvm/bin
. /run/hwkvm/hwkvm.conf
# A kernel-started init gets RLIMIT_NOFILE 1024/4096; give the tests what systemd gives
# a Debian host's services and logins (soft 1024, hard 524288): the VMM raises its soft
# limit to the hard one and divides it among its virtio-fs shares.
ulimit -Hn 524288 && ulimit -Sn 1024 || echo "hwkvm: could not raise RLIMIT_NOFILE"
echo "HWKVM-BOOTED uptime=$(uptime_s)s cpus=$(grep -c ^processor /proc/cpuinfo) kvm=$(ls -l /dev/kvm)"

# hwkvm_run NAME COMMAND...: runs one test executable from the repository directory.
# Past HWKVM_BINARY_LIMIT seconds it is stopped: the processes and the kernel's stacks
# (sysrq l, w: into kernel.log) are shown, then every process but init is killed.
hwkvm_run() {
  name=$1
  shift
  echo "HWKVM-START $name uptime=$(uptime_s)s"
  echo "hwkvm: ---- $name ----" > /dev/kmsg
  (cd "$HWKVM_REPO" && exec "$@") < /dev/null &
  pid=$!
  waited=0
  # (A finished child stays a zombie until waited for: check its state, not kill -0.)
  while [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2> /dev/null)" != Z ] && [ -e "/proc/$pid" ]; do
    sleep 1
    waited=$((waited + 1))
    if [ "$waited" -ge "$HWKVM_BINARY_LIMIT" ]; then
      echo
      echo "HWKVM-TIMEOUT $name still running after ${HWKVM_BINARY_LIMIT}s: killing it"
      ps | grep -v ' \[.*\]$'
      echo "hwkvm: ---- $name timed out: sysrq l, w ----" > /dev/kmsg
      echo l > /proc/sysrq-trigger
      echo w > /proc/sysrq-trigger
      kill -KILL -1
      break
    fi
  done
  wait "$pid"
  rc=$?
  echo "HWKVM-RESULT $name rc=$rc uptime=$(uptime_s)s"
}

hwkvm_tests
sync
echo "HWKVM-DONE uptime=$(uptime_s)s"
poweroff -f
sleep 60
