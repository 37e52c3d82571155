#!/bin/sh
# Run a command on this machine as if it had no /dev/kvm, no QEMU and no
# libvirt (no daemon sockets, no cpu_map): a private mount namespace where
# /dev is a fresh tmpfs with only the basic nodes, the QEMU binaries are
# empty non-executable files, and /run/libvirt and /usr/share/libvirt are
# empty. Nothing outside the namespace changes. Needs root (unshare -m).
#
#     scripts/without-machine.sh .venv/bin/pytest -m "not kvm and not qemu and not libvirt"
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "without-machine.sh: needs root (a private mount namespace)" >&2
    exit 2
fi
if [ "${KVMCPUID_INSIDE_NS:-}" != 1 ]; then
    if ! unshare --mount --propagation private true 2>/dev/null; then
        # In a chroot / is not a mount point and cannot be made private, and
        # mounts made without that would reach the host: run unhidden, say so.
        echo "without-machine.sh: no private mount namespace here (a chroot?):" \
             "running with /dev/kvm, QEMU and libvirt visible" >&2
        exec "$@"
    fi
    KVMCPUID_INSIDE_NS=1 exec unshare --mount --propagation private "$0" "$@"
fi
for d in /run/libvirt /var/run/libvirt /usr/share/libvirt; do
    if [ -d "$d" ]; then mount -t tmpfs none "$d"; fi
done
mount -t tmpfs -o mode=0755 none /dev
# An empty, non-executable file over each QEMU binary (it lives in the new
# /dev, which only this namespace sees).
: > /dev/.no-qemu
chmod 0644 /dev/.no-qemu
for q in /usr/bin/qemu-system-x86_64 /usr/bin/qemu-system-i386 /usr/bin/kvm; do
    if [ -e "$q" ]; then mount --bind /dev/.no-qemu "$q"; fi
done
mknod -m 0666 /dev/null c 1 3
mknod -m 0666 /dev/zero c 1 5
mknod -m 0666 /dev/full c 1 7
mknod -m 0666 /dev/random c 1 8
mknod -m 0666 /dev/urandom c 1 9
mknod -m 0666 /dev/tty c 5 0
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mkdir /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 none /dev/shm
unset KVMCPUID_INSIDE_NS
exec "$@"
