#!/usr/bin/env bash
# Set up this Debian KVM host for kvmcpuid_virt, idempotently:
#  - the Debian packages (QEMU, the libvirt daemon with its QEMU driver, the
#    libvirt headers and pkg-config that libvirt-python builds against);
#  - the libvirt-qemu user and group, and libvirt's runtime directories;
#  - virtlogd and libvirtd (systemctl where systemd runs, else daemonized);
#  - a venv in .venv with the package and its test tools;
# then waits until qemu:///system answers, and with KVMCPUID_INSTALL_HOOK=
# enforce|warn installs the libvirt hook (kvmcpuid hook install). Run as
# root. Safe to run again.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${KVMCPUID_VENV:-$here/.venv}
packages=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
          libvirt-dev pkg-config python3-venv python3-dev gcc linux-libc-dev tini procps
          cpuid util-linux)

say() { printf 'setup-host: %s\n' "$*" >&2; }
# The PID of a live (not zombie) process named $1: a daemon killed a moment
# ago can linger as a zombie until init reaps it, and is not running.
# Only processes whose root directory is ours count: in a chroot that shares
# the host's PID namespace (a fresh root for testing), the host's daemons are
# visible to ps but are not this root's, and must never be killed.
root_id=$(stat -c %d:%i /)
alive() {
    ps -eo pid=,stat=,comm= | awk -v n="$1" '$3 == n && $2 !~ /^Z/ {print $1}' | while read -r p; do
        if [ "$(stat -L -c %d:%i "/proc/$p/root" 2>/dev/null)" = "$root_id" ]; then
            echo "$p"
            break
        fi
    done
}

if [ "$(id -u)" -ne 0 ]; then
    say "run as root (it installs packages and starts libvirtd)"; exit 1
fi
case "${KVMCPUID_INSTALL_HOOK:-}" in
""|enforce|warn) ;;
*) say "KVMCPUID_INSTALL_HOOK=$KVMCPUID_INSTALL_HOOK: expected enforce or warn"; exit 1 ;;
esac

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd refuses to start QEMU guests without this user and group.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
# QEMU runs as libvirt-qemu under libvirt: give the kvm group /dev/kvm, as
# Debian's udev rule does where udev runs (here it was root:root 0600).
# A /dev/kvm that already has a group (udev's, or a host's seen from a
# container or chroot sharing its /dev) keeps it: libvirt-qemu joins that
# group, named here if this root has no name for its GID. Changing it would
# lock out the host's own QEMU users.
getent group kvm >/dev/null || groupadd --system kvm
kvm_group=kvm
if [ -c /dev/kvm ]; then
    gid=$(stat -c %g /dev/kvm)
    if [ "$gid" = 0 ]; then
        chgrp kvm /dev/kvm
    else
        kvm_group=$(getent group "$gid" | cut -d: -f1 || true)
        if [ -z "$kvm_group" ]; then
            kvm_group=kvm-dev
            groupadd --gid "$gid" "$kvm_group"
        fi
    fi
    chmod g+rw /dev/kvm
fi
id -nG libvirt-qemu | tr ' ' '\n' | grep -qx "$kvm_group" || usermod -aG "$kvm_group" libvirt-qemu
install -d /var/log/libvirt /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu

# libvirt puts each QEMU in a private mount namespace with its own /dev;
# inside a container that cannot be built ("Unable to move ... mount to
# /dev/null"). Guests here need no private /dev, so turn it off.
restart=
conf=/etc/libvirt/qemu.conf
install -d /etc/libvirt
if ! grep -qs '^namespaces *=' "$conf"; then
    say "setting namespaces = [] in $conf"
    printf '\n# kvmcpuid_virt setup-host.sh: no per-domain mount namespace\nnamespaces = []\n' >> "$conf"
    restart=1
fi

# Stop libvirtd and wait until it is gone: a new daemon started while the
# old one still exits loses its socket (the old one unlinks it on the way out).
stop_libvirtd() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 1 300); do [ -n "$(alive libvirtd)" ] || return 0; sleep 0.1; done
    say "libvirtd (pid $1) did not stop within 30 s"; exit 1
}
start_libvirtd() {
    if [ -z "$(alive libvirtd)" ]; then
        setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd.out 2>&1 &
    fi
}

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start virtlogd libvirtd
    [ -z "$restart" ] || systemctl restart libvirtd
else
    [ -n "$(alive virtlogd)" ] || virtlogd -d
    # libvirt double-forks QEMU, so an exited QEMU is reaped by PID 1; where
    # PID 1 is not an init that reaps at once (a container's), libvirt's stop
    # path waits for that zombie (~1.6 s per guest here, see
    # docs/libvirt-teardown.md). Run libvirtd under tini as child subreaper.
    if pid=$(alive libvirtd); [ -n "$pid" ]; then
        parent=$(ps -o comm= -p "$(ps -o ppid= -p "$pid" | tr -d ' ')" 2>/dev/null || true)
        [ "$parent" = tini ] || restart=1
        if [ -n "$restart" ]; then
            say "restarting libvirtd under tini"
            stop_libvirtd "$pid"
        fi
    fi
    start_libvirtd
fi

# Python: the venv with the package (editable) and what the tests use.
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import kvmcpuid_virt, libvirt, lxml, qemu.qmp, pytest, tox' 2>/dev/null \
   || [ "$here/pyproject.toml" -nt "$venv/.kvmcpuid-installed" ]; then
    say "installing the package into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test,lint]" tox
    touch "$venv/.kvmcpuid-installed"
fi
# An editable install leaves no bytecode; compile it so the commands start
# fast even where PYTHONDONTWRITEBYTECODE is set (benchmarks/bench_dump.py).
"$venv/bin/python" -m compileall -q "$here/kvmcpuid_virt" >/dev/null

# Wait (bounded) for the daemon to answer on qemu:///system.
answers() {
    for _ in $(seq 1 100); do
        if "$venv/bin/python" -c 'import libvirt, sys; c = libvirt.open("qemu:///system"); c.getVersion(); c.close()' 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
answered=
if answers; then
    answered=1
elif [ ! -d /run/systemd/system ] && pid=$(alive libvirtd) && [ -n "$pid" ] \
        && [ ! -S /run/libvirt/libvirt-sock ]; then
    # A daemon that lost its socket (an earlier restart raced) never answers
    # again: start it afresh once.
    say "libvirtd (pid $pid) runs without /run/libvirt/libvirt-sock: restarting it"
    stop_libvirtd "$pid"
    start_libvirtd
    answers && answered=1
fi
[ -z "$answered" ] || say "qemu:///system answers"
if [ -z "$answered" ]; then
    say "libvirtd did not answer on qemu:///system within 10 s (see /var/log/libvirt/)"
    exit 1
fi

# Opt-in: the libvirt hook that refuses, at start, restore and incoming
# migration, a domain whose CPU this host cannot give
# (KVMCPUID_INSTALL_HOOK=enforce or warn; KVMCPUID_HOOK_FAIL_CLOSED=1 adds
# --fail-closed). Installing again refreshes the tool facts it reads.
if [ -n "${KVMCPUID_INSTALL_HOOK:-}" ]; then
    hook_args=(hook install --mode "$KVMCPUID_INSTALL_HOOK")
    [ "${KVMCPUID_HOOK_FAIL_CLOSED:-}" != 1 ] || hook_args+=(--fail-closed)
    say "installing the libvirt hook (${hook_args[*]:2})"
    "$venv/bin/kvmcpuid" "${hook_args[@]}" | sed 's/^/setup-host: hook: /' >&2
fi
exit 0
