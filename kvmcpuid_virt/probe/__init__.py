"""Verify from inside a booted guest what CPUID it sees.

`image` builds the tiny firmware that answers CPUID queries on COM1; the
backends (raw KVM here, QEMU and libvirt elsewhere) boot it and return a
`ProbeResult`; `hostcontrol` finds which bits KVM_SET_CPUID2 really controls
on this host.
"""
