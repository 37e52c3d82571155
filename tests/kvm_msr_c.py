"""An independent reading of the feature MSRs: a C program, compiled against
the installed <linux/kvm.h>, does the ioctls itself (KVM_CHECK_EXTENSION,
KVM_GET_MSR_FEATURE_INDEX_LIST, KVM_GET_MSRS on /dev/kvm, then a VM and vCPU
with KVM's supported CPUID and KVM_SET_MSRS of each value, and of each set
bit alone for the two flag MSRs IA32_ARCH_CAPABILITIES (0x10a) and
IA32_CORE_CAPABILITIES (0xcf)). Nothing of kvmcpuid_virt is involved.

Used by tests/test_kvm_msrs.py and tests/test_features.py."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HEADER = Path("/usr/include/linux/kvm.h")

SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static int set1(int vcpu, unsigned index, unsigned long long data) {
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = {0};
    m.h.nmsrs = 1; m.e.index = index; m.e.data = data;
    return ioctl(vcpu, KVM_SET_MSRS, &m);
}

static int get1(int fd, unsigned index, unsigned long long *data) {
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = {0};
    m.h.nmsrs = 1; m.e.index = index;
    int r = ioctl(fd, KVM_GET_MSRS, &m);
    *data = m.e.data;
    return r;
}

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 2; }
    int cap = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GET_MSR_FEATURES);
    printf("cap %d\n", cap);
    if (cap <= 0) return 0;
    struct kvm_msr_list probe = { .nmsrs = 0 };
    int r = ioctl(kvm, KVM_GET_MSR_FEATURE_INDEX_LIST, &probe);
    printf("probe %d %d %u\n", r, r < 0 ? errno : 0, probe.nmsrs);
    unsigned n = probe.nmsrs;
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + n * sizeof(list->indices[0]));
    list->nmsrs = n;
    if (ioctl(kvm, KVM_GET_MSR_FEATURE_INDEX_LIST, list) < 0) { perror("list"); return 2; }
    unsigned long long *value = calloc(n, sizeof(*value));
    for (unsigned i = 0; i < list->nmsrs; i++) {
        if (get1(kvm, list->indices[i], &value[i]) != 1) { perror("get"); return 2; }
        printf("value %#x %#llx\n", list->indices[i], value[i]);
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vm < 0 || vcpu < 0) { perror("vm"); return 2; }
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(cpuid->entries[0]));
    cpuid->nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) { perror("cpuid"); return 2; }
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) { perror("set cpuid"); return 2; }
    for (unsigned i = 0; i < list->nmsrs; i++) {
        unsigned index = list->indices[i];
        unsigned long long back = 0;
        r = set1(vcpu, index, value[i]);
        printf("set %#x %d\n", index, r);
        if (r == 1 && get1(vcpu, index, &back) == 1)
            printf("back %#x %#llx\n", index, back);
        if (r != 1 && (index == 0x10a || index == 0xcf))
            for (int b = 0; b < 64; b++)
                if (value[i] >> b & 1)
                    printf("bit %#x %d %d\n", index, b, set1(vcpu, index, 1ULL << b));
    }
    return 0;
}
"""


@dataclass
class CReading:
    cap: int
    # KVM_GET_MSR_FEATURE_INDEX_LIST with nmsrs = 0: (return, errno, nmsrs after)
    probe: tuple[int, int, int] | None = None
    values: dict[int, int] = field(default_factory=dict)  # in the kernel's order
    set_result: dict[int, int] = field(default_factory=dict)
    read_back: dict[int, int] = field(default_factory=dict)
    bit_result: dict[tuple[int, int], int] = field(default_factory=dict)


@functools.cache
def c_msr_reading() -> CReading:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux-libc-dev (/usr/include/linux/kvm.h)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "msrs.c", Path(tmp) / "msrs"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    reading = CReading(cap=0)
    for line in out.splitlines():
        kind, *fields = line.split()
        nums = [int(f, 0) for f in fields]
        if kind == "cap":
            reading.cap = nums[0]
        elif kind == "probe":
            reading.probe = (nums[0], nums[1], nums[2])
        elif kind == "value":
            reading.values[nums[0]] = nums[1]
        elif kind == "set":
            reading.set_result[nums[0]] = nums[1]
        elif kind == "back":
            reading.read_back[nums[0]] = nums[1]
        elif kind == "bit":
            reading.bit_result[(nums[0], nums[1])] = nums[2]
    return reading
