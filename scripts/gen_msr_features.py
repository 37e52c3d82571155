#!/usr/bin/env python3
"""Maintainer script: regenerate kvmcpuid_virt/cpuid/data/msr_features.json.

The shipped JSON is what the package reads; this script produces it from the
sources of truth installed on a maintainer's host, as scripts/gen_features.py
does for the CPUID bits:

- QEMU: every boolean property of `query-cpu-model-expansion` (full, max)
  that is not a CPUID feature name (cpuid/data/features.json) is tried alone
  on an empty `base` CPU (`-cpu base,NAME=on`, a stopped one-CPU QEMU). An MSR
  feature needs the CPUID bit that enumerates its MSR, which `base` lacks, so
  QEMU drops it and says where it lives, on any host:
      warning: This feature depends on other features that were not
      requested: MSR(10AH).rdctl-no [bit 0]
  QEMU thereby tells us both its names and their MSR and bit (for a VMX
  control MSR the bit is the control's number, the allowed-1 bit 32 above).
- libvirt: the <msr index= edx= eax=> features of
  /usr/share/libvirt/cpu_map/x86_features.xml.
- A few facts neither tool states (the MSRs themselves, which CPUID bit
  enumerates each, the SDM names of IA32_ARCH_CAPABILITIES bits KVM reports
  that QEMU 7.2 and libvirt 9.0 do not name) are listed below, from the Intel
  SDM (Vol. 4 Table 2-2; Vol. 3 Appendix A) and the AMD APM.

Run: .venv/bin/python scripts/gen_msr_features.py [-o PATH]  (~5 s)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lxml import etree

from kvmcpuid_virt.qmp import run_commands

QEMU = "qemu-system-x86_64"
PARALLEL = 16
CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
ROOT = Path(__file__).resolve().parent.parent
CPUID_FEATURES = ROOT / "kvmcpuid_virt/cpuid/data/features.json"
OUT = ROOT / "kvmcpuid_virt/cpuid/data/msr_features.json"

INTEL = "GenuineIntel"
AMD = "AuthenticAMD"

# The MSRs KVM may list in KVM_GET_MSR_FEATURE_INDEX_LIST (arch/x86/kvm/x86.c
# msr_based_features_all, plus the VMX ones on Intel): index -> (SDM name,
# layout, the CPUID registry feature that enumerates the MSR, vendor whose
# CPUs have it natively (None: KVM offers it on both), try each bit alone).
MSRS: dict[int, tuple[str, str, str | None, str | None, bool]] = {
    0x8B: ("IA32_BIOS_SIGN_ID", "value", None, None, False),  # microcode revision, 63:32
    0xCE: ("MSR_PLATFORM_INFO", "value", None, None, False),  # KVM emulates it on both
    0xCF: ("IA32_CORE_CAPABILITIES", "flags", "core-capability", INTEL, True),
    0x10A: ("IA32_ARCH_CAPABILITIES", "flags", "arch-capabilities", None, True),
    0x345: ("IA32_PERF_CAPABILITIES", "flags", "pdcm", INTEL, False),  # has format fields
    0x480: ("IA32_VMX_BASIC", "flags", "vmx", INTEL, False),
    0x481: ("IA32_VMX_PINBASED_CTLS", "controls", "vmx", INTEL, False),
    0x482: ("IA32_VMX_PROCBASED_CTLS", "controls", "vmx", INTEL, False),
    0x483: ("IA32_VMX_EXIT_CTLS", "controls", "vmx", INTEL, False),
    0x484: ("IA32_VMX_ENTRY_CTLS", "controls", "vmx", INTEL, False),
    0x485: ("IA32_VMX_MISC", "flags", "vmx", INTEL, False),
    0x486: ("IA32_VMX_CR0_FIXED0", "value", "vmx", INTEL, False),
    0x487: ("IA32_VMX_CR0_FIXED1", "value", "vmx", INTEL, False),
    0x488: ("IA32_VMX_CR4_FIXED0", "value", "vmx", INTEL, False),
    0x489: ("IA32_VMX_CR4_FIXED1", "value", "vmx", INTEL, False),
    0x48A: ("IA32_VMX_VMCS_ENUM", "value", "vmx", INTEL, False),
    0x48B: ("IA32_VMX_PROCBASED_CTLS2", "controls", "vmx", INTEL, False),
    0x48C: ("IA32_VMX_EPT_VPID_CAP", "flags", "vmx", INTEL, False),
    0x48D: ("IA32_VMX_TRUE_PINBASED_CTLS", "controls", "vmx", INTEL, False),
    0x48E: ("IA32_VMX_TRUE_PROCBASED_CTLS", "controls", "vmx", INTEL, False),
    0x48F: ("IA32_VMX_TRUE_EXIT_CTLS", "controls", "vmx", INTEL, False),
    0x490: ("IA32_VMX_TRUE_ENTRY_CTLS", "controls", "vmx", INTEL, False),
    0x491: ("IA32_VMX_VMFUNC", "flags", "vmx", INTEL, False),
    0x492: ("IA32_VMX_PROCBASED_CTLS3", "flags", "vmx", INTEL, False),  # 64 allowed-1 bits
    0xC0011029: ("MSR_AMD64_DE_CFG", "flags", None, AMD, False),  # bit 1: LFENCE serializing
}

# IA32_ARCH_CAPABILITIES bits KVM can report (KVM_SUPPORTED_ARCH_CAP in
# arch/x86/kvm/x86.c) that QEMU 7.2 and libvirt 9.0 do not name: their SDM
# meaning, spelt as later QEMU and libvirt releases do. Neither tool here
# can set them (kind "unsettable"), so a guest of QEMU 7.2 never sees them.
SDM_NAMES: dict[tuple[int, int], str] = {
    (0x10A, 13): "sbdr-ssdp-no",
    (0x10A, 14): "fbsdp-no",
    (0x10A, 15): "psdp-no",
    (0x10A, 17): "fb-clear",
    (0x10A, 19): "rrsba",
    (0x10A, 20): "bhi-no",
    (0x10A, 24): "pbrsb-no",
    (0x10A, 26): "gds-no",
    (0x10A, 27): "rfds-no",
    (0x10A, 28): "rfds-clear",
    (0x10A, 62): "its-no",
}

# QEMU 7.2 gives bit 41 of IA32_VMX_EPT_VPID_CAP (single-context INVVPID,
# SDM A.10) the name of bit 25 (single-context INVEPT) a second time: the one
# property sets both. The registry keeps the name at bit 25 and bit 41 as the
# name's second bit; any other name with two bits is a surprise to look at.
QEMU_SECONDARY_BITS: dict[str, list[tuple[int, int]]] = {
    "vmx-invept-single-context": [(0x48C, 41)],
}

_WARNING = re.compile(r"MSR\(([0-9A-F]+)H\)\.([a-z0-9_.-]+) \[bit (\d+)\]")


def libvirt_msr_features(path: Path) -> dict[str, tuple[int, int]]:
    """cpu_map features defined by an <msr>: name -> (index, bit of edx:eax)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    root = etree.parse(str(path), parser).getroot()
    out: dict[str, tuple[int, int]] = {}
    for feat in root.iter("feature"):
        for msr in feat.findall("msr"):
            name, index = feat.get("name"), msr.get("index")
            if name is None or index is None:
                raise SystemExit(f"cpu_map: <msr> of {name} lacks a name or index")
            mask = int(msr.get("edx", "0"), 16) << 32 | int(msr.get("eax", "0"), 16)
            if mask == 0 or mask & (mask - 1):
                raise SystemExit(f"cpu_map: {name} does not define exactly one bit")
            out[name] = (int(index, 16), mask.bit_length() - 1)
    return out


def qemu_msr_bits_of(name: str) -> list[tuple[int, int]]:
    """(MSR, QEMU's bit) for every bit QEMU says `name` lives at, from its
    warning when `name` is asked for alone on an empty `base` CPU."""
    proc = subprocess.run(
        [QEMU, "-accel", "kvm", "-machine", "pc", "-m", "16", "-S", "-display", "none",
         "-nodefaults", "-cpu", f"base,{name}=on", "-qmp", "stdio"],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return [
        (int(m.group(1), 16), int(m.group(3)))
        for m in _WARNING.finditer(proc.stderr)
        if m.group(2) == name
    ]


def qemu_candidates() -> list[str]:
    """Boolean properties of `max` that are not CPUID feature names."""
    (exp,) = run_commands(
        QEMU,
        [{"execute": "query-cpu-model-expansion",
          "arguments": {"type": "full", "model": {"name": "max"}}}],
        accel="kvm",
    )  # fmt: skip
    cpuid_names: set[str] = set()
    for f in json.loads(CPUID_FEATURES.read_text())["features"]:
        cpuid_names.update(n for n in (f["qemu"], *f["qemu_aliases"]) if n)
    props = exp["model"]["props"]
    return sorted(k for k, v in props.items() if isinstance(v, bool) and k not in cpuid_names)


def build() -> dict[str, Any]:
    names = qemu_candidates()
    with ThreadPoolExecutor(PARALLEL) as pool:
        found = dict(zip(names, pool.map(qemu_msr_bits_of, names), strict=True))
    libvirt = libvirt_msr_features(CPU_MAP)
    by_pos: dict[tuple[int, int], dict[str, Any]] = {}
    problems = []
    for name, places in sorted(found.items()):
        if not places:
            continue  # not an MSR feature (hv-*, pmu, check, ...)
        bits = []
        for index, qbit in places:
            if index not in MSRS:
                problems.append(f"{name}: MSR {index:#x} is not in MSRS")
                continue
            layout = MSRS[index][1]
            bits.append((index, qbit + 32 if layout == "controls" else qbit))
        primary, *rest = bits
        if rest != QEMU_SECONDARY_BITS.get(name, []):
            problems.append(f"{name} sets {bits}; extend QEMU_SECONDARY_BITS")
            continue
        if primary in by_pos:
            problems.append(f"{name} and {by_pos[primary]['qemu']} share {primary}")
            continue
        by_pos[primary] = {"qemu": name, "extra_bits": [b for _, b in rest]}
    for lname, pos in libvirt.items():
        entry = by_pos.get(pos)
        if entry is None:
            problems.append(f"libvirt's {lname} at {pos} has no QEMU name")
        elif entry["qemu"] != lname:
            problems.append(f"libvirt's {lname} at {pos} is QEMU's {entry['qemu']}")
    for pos, sdm in SDM_NAMES.items():
        if pos in by_pos:
            problems.append(f"{sdm} at {pos} has a QEMU name now; drop it from SDM_NAMES")
    if problems:
        raise SystemExit("\n".join(problems))
    libvirt_at = {pos: name for name, pos in libvirt.items()}
    features = []
    for index, bit in sorted({*by_pos, *SDM_NAMES}):
        entry = by_pos.get((index, bit))
        features.append({
            "msr": f"{index:#x}",
            "bit": bit,
            "extra_bits": entry["extra_bits"] if entry else [],
            "qemu": entry["qemu"] if entry else None,
            "qemu_aliases": [],
            "libvirt": libvirt_at.get((index, bit)),
            "kind": "plain" if entry else "unsettable",
            "sdm": None if entry else SDM_NAMES[(index, bit)],
        })  # fmt: skip
    msrs = [
        {"index": f"{index:#x}", "name": name, "layout": layout, "enumerated_by": enum,
         "vendor": vendor, "per_bit_trial": per_bit}
        for index, (name, layout, enum, vendor, per_bit) in sorted(MSRS.items())
    ]  # fmt: skip
    version = subprocess.run(
        [QEMU, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    return {
        "comment": "Generated by scripts/gen_msr_features.py; reviewed and shipped as data.",
        "sources": {"qemu": version, "libvirt_cpu_map": str(CPU_MAP)},
        "msrs": msrs,
        "features": features,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()
    doc = build()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(doc['features'])} MSR features of {len(doc['msrs'])} MSRs to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
