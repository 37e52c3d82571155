"""The ioctl numbers and struct layouts of kvm/abi.py and kvm/structs.py
against an independent source: the kernel headers installed on this machine
(linux-libc-dev), compiled with the system C compiler."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmcpuid_virt.kvm import structs
from kvmcpuid_virt.kvm.abi import (
    KVM_API_VERSION,
    KVM_MAX_CPUID_ENTRIES,
    Cap,
    Ioctl,
    kvm_cpuid2,
    kvm_msr_list,
    kvm_msrs,
)

HEADER = Path("/usr/include/linux/kvm.h")

# name in abi.Ioctl -> the macro in <linux/kvm.h>
IOCTLS = {key: "KVM_" + key for key in vars(Ioctl) if key.isupper()}
CAPS = {key: "KVM_CAP_" + key for key in vars(Cap) if key.isupper()}
# ctypes layout -> C struct; plus the CPUID structs that abi.py packs by hand
STRUCTS = {
    name: f"struct {name}"
    for name in structs.__all__
    if name not in ("kvm_run_io",)  # an anonymous member of kvm_run's union
}
# The MSR structs abi.py packs by hand: (struct, member) offsets.
MSR_OFFSETS = [
    ("kvm_msrs", "nmsrs"),
    ("kvm_msrs", "entries"),
    ("kvm_msr_entry", "index"),
    ("kvm_msr_entry", "data"),
    ("kvm_msr_list", "nmsrs"),
    ("kvm_msr_list", "indices"),
]
# (struct, ctypes field, C member): kvm_run's exit union is anonymous in C,
# so its io member stands for the union's offset.
OFFSETS = [
    ("kvm_run", "exit_reason", "exit_reason"),
    ("kvm_run", "immediate_exit", "immediate_exit"),
    ("kvm_run", "exit", "io"),
    ("kvm_sregs", "cr0", "cr0"),
    ("kvm_sregs", "efer", "efer"),
    ("kvm_sregs", "interrupt_bitmap", "interrupt_bitmap"),
    ("kvm_segment", "unusable", "unusable"),
    ("kvm_coalesced_mmio", "data", "data"),
    ("kvm_userspace_memory_region", "userspace_addr", "userspace_addr"),
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every value the tests compare, as the C compiler computes it from the
    installed headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux-libc-dev (/usr/include/linux/kvm.h)")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "#define P(name, value) printf(\"%s %llu\\n\", name, (unsigned long long)(value))",
        "int main(void) {",
    ]
    for macro in [*IOCTLS.values(), *CAPS.values()]:
        lines.append(f'P("{macro}", {macro});')
    for name, c_name in STRUCTS.items():
        lines.append(f'P("sizeof {name}", sizeof({c_name}));')
    for c_name in ("struct kvm_cpuid2", "struct kvm_cpuid_entry2", "struct kvm_msrs",
                   "struct kvm_msr_entry", "struct kvm_msr_list"):
        lines.append(f'P("sizeof {c_name}", sizeof({c_name}));')
    for name, member in MSR_OFFSETS:
        lines.append(f'P("offsetof {name}.{member}", offsetof(struct {name}, {member}));')
    for name, field, member in OFFSETS:
        lines.append(f'P("offsetof {name}.{field}", offsetof(struct {name}, {member}));')
    lines += [
        'P("KVM_API_VERSION", KVM_API_VERSION);',
        'P("KVM_MEM_READONLY", KVM_MEM_READONLY);',
        'P("KVM_EXIT_IO_OUT", KVM_EXIT_IO_OUT);',
        'P("KVM_EXIT_IO_IN", KVM_EXIT_IO_IN);',
        "return 0; }",
    ]
    tmp = tmp_path_factory.mktemp("abi")
    (tmp / "abi.c").write_text("\n".join(lines) + "\n")
    subprocess.run([cc, "-o", str(tmp / "abi"), str(tmp / "abi.c")], check=True,
                   capture_output=True)
    out = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    return values


@pytest.mark.parametrize("key", sorted(IOCTLS))
def test_ioctl_number_matches_the_kernel_header(kernel: dict[str, int], key: str) -> None:
    assert getattr(Ioctl, key) == kernel[IOCTLS[key]], Ioctl.name(getattr(Ioctl, key))


@pytest.mark.parametrize("key", sorted(CAPS))
def test_capability_number_matches_the_kernel_header(kernel: dict[str, int], key: str) -> None:
    assert getattr(Cap, key) == kernel[CAPS[key]]


@pytest.mark.parametrize("name", sorted(set(STRUCTS) - {"kvm_run"}))
def test_ctypes_layout_size_matches_the_kernel_header(kernel: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(getattr(structs, name)) == kernel[f"sizeof {name}"]


def test_kvm_run_head_lies_within_the_kernel_struct(kernel: dict[str, int]) -> None:
    # structs.kvm_run declares only the head this package reads (through the
    # exit union); the kernel's struct goes on with the sync regs.
    assert ctypes.sizeof(structs.kvm_run) <= kernel["sizeof kvm_run"]


@pytest.mark.parametrize(("name", "field", "member"), OFFSETS)
def test_ctypes_field_offset_matches_the_kernel_header(
    kernel: dict[str, int], name: str, field: str, member: str
) -> None:
    assert getattr(getattr(structs, name), field).offset == kernel[f"offsetof {name}.{field}"]


def test_cpuid_buffer_layout_matches_the_kernel_header(kernel: dict[str, int]) -> None:
    assert kvm_cpuid2.HEADER.size == kernel["sizeof struct kvm_cpuid2"]
    assert kvm_cpuid2.ENTRY.size == kernel["sizeof struct kvm_cpuid_entry2"]


def test_msr_buffer_layouts_match_the_kernel_header(kernel: dict[str, int]) -> None:
    assert kvm_msrs.HEADER.size == kernel["sizeof struct kvm_msrs"]
    assert kvm_msrs.HEADER.size == kernel["offsetof kvm_msrs.entries"]
    assert kvm_msrs.ENTRY.size == kernel["sizeof struct kvm_msr_entry"]
    assert kvm_msr_list.HEADER.size == kernel["sizeof struct kvm_msr_list"]
    assert kvm_msr_list.HEADER.size == kernel["offsetof kvm_msr_list.indices"]
    assert kernel["offsetof kvm_msrs.nmsrs"] == kernel["offsetof kvm_msr_list.nmsrs"] == 0


def test_msr_buffers_put_fields_at_the_kernel_offsets(kernel: dict[str, int]) -> None:
    buf = kvm_msrs([(0x8B, 1), (0x10A, 0x1122_3344_5566_7788)])
    assert buf.nmsrs == 2 and buf.capacity == 2
    second = kernel["offsetof kvm_msrs.entries"] + kernel["sizeof struct kvm_msr_entry"]
    index_at = second + kernel["offsetof kvm_msr_entry.index"]
    data_at = second + kernel["offsetof kvm_msr_entry.data"]
    assert bytes(buf[index_at : index_at + 4]) == (0x10A).to_bytes(4, "little")
    assert bytes(buf[data_at : data_at + 8]) == (0x1122_3344_5566_7788).to_bytes(8, "little")
    # the reserved word and the header padding stay zero
    assert bytes(buf[4:8]) == bytes(4)
    assert bytes(buf[index_at + 4 : data_at]) == bytes(data_at - index_at - 4)
    assert buf.entries() == [(0x8B, 1), (0x10A, 0x1122_3344_5566_7788)]
    lst = kvm_msr_list(3)
    assert lst.nmsrs == 3 and len(lst) == kernel["sizeof struct kvm_msr_list"] + 3 * 4
    lst.set_index(2, 0x345)
    at = kernel["offsetof kvm_msr_list.indices"] + 2 * 4
    assert bytes(lst[at : at + 4]) == (0x345).to_bytes(4, "little")
    assert lst.indices(3) == [0, 0, 0x345]


def test_msr_buffers_reject_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="64-bit"):
        kvm_msrs([(0x10A, 1 << 64)])
    with pytest.raises(ValueError, match="64-bit"):
        kvm_msrs([(0x10A, -1)])
    with pytest.raises(ValueError, match="32-bit"):
        kvm_msrs([(1 << 32, 0)])
    with pytest.raises(ValueError):
        kvm_msr_list(-1)
    with pytest.raises(IndexError):
        kvm_msr_list(1).set_index(1, 0)
    with pytest.raises(ValueError):
        kvm_msr_list(1).indices(2)


def test_constants_match_the_kernel_header(kernel: dict[str, int]) -> None:
    from kvmcpuid_virt.kvm import abi

    assert kernel["KVM_API_VERSION"] == KVM_API_VERSION
    assert kernel["KVM_MEM_READONLY"] == abi.KVM_MEM_READONLY
    assert kernel["KVM_EXIT_IO_OUT"] == abi.KVM_EXIT_IO_OUT
    assert kernel["KVM_EXIT_IO_IN"] == abi.KVM_EXIT_IO_IN


def test_cpuid_buffer_entries_round_trip_at_the_kernel_offsets() -> None:
    buf = kvm_cpuid2(3)
    assert buf.nent == 3 and buf.capacity == 3
    assert len(buf) == 8 + 3 * 40
    buf.set_entry(2, 0x80000001, 0, 0, 1, 2, 3, 0xFFFFFFFF)
    assert buf.entry(2) == (0x80000001, 0, 0, 1, 2, 3, 0xFFFFFFFF)
    # entries[2].edx sits at 8 + 2*40 + 6*4, little-endian as on x86
    assert bytes(buf[8 + 80 + 24 : 8 + 80 + 28]) == b"\xff\xff\xff\xff"
    assert bytes(buf[8 + 80 + 28 : 8 + 120]) == bytes(12)  # padding[3] untouched
    with pytest.raises(IndexError):
        buf.entry(3)
    with pytest.raises(IndexError):
        buf.set_entry(-1, 0, 0, 0, 0, 0, 0, 0)


def test_cpuid_buffer_capacity_is_bounded_by_the_kernel_limit() -> None:
    # What Kvm negotiates with: 256 entries fit in one buffer of 10 KiB.
    assert len(kvm_cpuid2(KVM_MAX_CPUID_ENTRIES)) == 8 + 256 * 40
    with pytest.raises(ValueError):
        kvm_cpuid2(-1)
