#!/usr/bin/env python3
"""Maintainer script: regenerate kvmcpuid_virt/cpuid/data/features.json.

The shipped JSON is what the package reads; this script only helps produce it
from the sources of truth installed on a maintainer's host:

- QEMU: every boolean property of `query-cpu-model-expansion` (full, max) is
  tried alone on an empty `base` CPU (`-cpu base,NAME=on`); the CPUID bits it
  sets are read back from the CPU's QOM `feature-words` plus
  `filtered-features` (a bit the accelerator cannot give is filtered, but it
  was still requested, so the union is exactly what the name means). QEMU
  thereby tells us both its names and their bits, with no hand-copied table.
- libvirt: /usr/share/libvirt/cpu_map/x86_features.xml.
- A few facts neither tool states (which QEMU spelling is canonical, KVM PV
  bits no tool names, which bits follow guest state) are listed below.

Run: .venv/bin/python scripts/gen_features.py [--accel kvm|tcg] [-o PATH]  (~10 s)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lxml import etree

from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.qmp import run_commands

QEMU = "qemu-system-x86_64"
# The CPU object of a `-machine pc` QEMU with one CPU.
CPU_PATH = "/machine/unattached/device[0]"
# QEMUs run at once (each is a process waiting on its own QMP conversation).
PARALLEL = 16
CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
OUT = Path(__file__).resolve().parent.parent / "kvmcpuid_virt/cpuid/data/features.json"

Key = tuple[int, int, str, int]

# QEMU registers these spellings with object_property_add_alias() in
# x86_cpu_initfn (target/i386/cpu.c, QEMU 7.2); the target is the name in
# feature_word_info, i.e. the canonical one. Both set the same bit, so QEMU's
# behaviour cannot tell them apart: this list can.
QEMU_ALIASES: dict[str, str] = {
    "sse3": "pni",
    "pclmuldq": "pclmulqdq",
    "sse4-1": "sse4.1",
    "sse4-2": "sse4.2",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "xd": "nx",
    "ffxsr": "fxsr-opt",
    "i64": "lm",
    "ds_cpl": "ds-cpl",
    "tsc_adjust": "tsc-adjust",
    "fxsr_opt": "fxsr-opt",
    "lahf_lm": "lahf-lm",
    "cmp_legacy": "cmp-legacy",
    "nodeid_msr": "nodeid-msr",
    "perfctr_core": "perfctr-core",
    "perfctr_nb": "perfctr-nb",
    "kvm_nopiodelay": "kvm-nopiodelay",
    "kvm_mmu": "kvm-mmu",
    "kvm_asyncpf": "kvm-asyncpf",
    "kvm_asyncpf_int": "kvm-asyncpf-int",
    "kvm_steal_time": "kvm-steal-time",
    "kvm_pv_eoi": "kvm-pv-eoi",
    "kvm_pv_unhalt": "kvm-pv-unhalt",
    "kvm_poll_control": "kvm-poll-control",
    "svm_lock": "svm-lock",
    "nrip_save": "nrip-save",
    "tsc_scale": "tsc-scale",
    "vmcb_clean": "vmcb-clean",
    "pause_filter": "pause-filter",
}

# QEMU's name "kvmclock" sets KVM_FEATURE_CLOCKSOURCE (bit 0) and
# KVM_FEATURE_CLOCKSOURCE2 (bit 3) of 0x40000001 EAX at once; the registry
# gives the name to bit 0 and keeps bit 3 under its Linux name.
QEMU_SECONDARY_BITS: dict[str, list[Key]] = {"kvmclock": [(0x40000001, 0, "eax", 3)]}

# QEMU derives the XSAVE component words (0xD.0 EAX/EDX: XCR0 bits x87, SSE,
# AVX, ...) from feature flags: `xsave` also sets x87|SSE, `avx` sets YMM.
# Those are consequences, not the meaning of the name.
XSAVE_COMPONENT_WORDS: set[tuple[int, int, str]] = {(0xD, 0, "eax"), (0xD, 0, "edx")}

# Bits that follow guest state rather than configuration: OSXSAVE mirrors
# CR4.OSXSAVE and OSPKE mirrors CR4.PKE (KVM recomputes them on every CR4 write).
DYNAMIC: set[Key] = {(0x1, 0, "ecx", 27), (0x7, 0, "ecx", 4)}

# KVM paravirtual bits (0x40000001) named only by Linux's kvm_para.h, so that
# every bit KVM may report has a name; neither QEMU 7.2 nor libvirt sets them.
LINUX_NAMES: dict[Key, str] = {
    (0x40000001, 0, "eax", 3): "kvmclock2",
    (0x40000001, 0, "eax", 10): "kvm-asyncpf-vmexit",
    (0x40000001, 0, "eax", 16): "kvm-hc-map-gpa-range",
    (0x40000001, 0, "eax", 17): "kvm-migration-control",
    (0x1, 0, "ecx", 27): "osxsave",
    (0x7, 0, "ecx", 4): "ospke",
}

# libvirt 9.0 sets these KVM PV bits through <features><kvm><NAME state='on'/>
# (src/conf/domain_conf.h VIR_DOMAIN_KVM_*): hint-dedicated, poll-control,
# pv-ipi. Other KVM PV bits are libvirt-invisible (kvmclock goes through
# <clock><timer name='kvmclock'/>, not a CPUID feature element).
LIBVIRT_KVM: dict[Key, str] = {
    (0x40000001, 0, "edx", 0): "hint-dedicated",
    (0x40000001, 0, "eax", 12): "poll-control",
    (0x40000001, 0, "eax", 11): "pv-ipi",
}


def _attr(el: etree._Element, name: str) -> str:
    value = el.get(name)
    if value is None:
        raise SystemExit(f"cpu_map: <{el.tag}> lacks {name}")
    return value


def libvirt_features(path: Path) -> dict[Key, str]:
    """cpu_map CPUID features as (leaf, subleaf, reg, bit) -> name; MSR-based
    features (<msr>) are not CPUID bits and are left out."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    root = etree.parse(str(path), parser).getroot()
    out: dict[Key, str] = {}
    for feat in root.iter("feature"):
        for cpuid in feat.findall("cpuid"):
            leaf = int(_attr(cpuid, "eax_in"), 16)
            subleaf = int(cpuid.get("ecx_in", "0"), 16)
            for reg in ("eax", "ebx", "ecx", "edx"):
                value = cpuid.get(reg)
                if value is None:
                    continue
                mask = int(value, 16)
                for bit in range(32):
                    if mask >> bit & 1:
                        out[(leaf, subleaf, reg, bit)] = _attr(feat, "name")
    return out


def _bits(words: list[dict[str, Any]]) -> set[Key]:
    out: set[Key] = set()
    for w in words:
        for bit in range(32):
            if w["features"] >> bit & 1:
                out.add(
                    (
                        w["cpuid-input-eax"],
                        w.get("cpuid-input-ecx", 0),
                        w["cpuid-register"].lower(),
                        bit,
                    )
                )
    return out


def qemu_bits_of(accel: str, name: str) -> set[Key]:
    """The CPUID bits property `name` sets on an empty `base` CPU: QEMU is
    started stopped with one CPU (`-machine pc -S -m 16`), never run."""
    fw, ff = run_commands(
        QEMU,
        [
            {"execute": "qom-get", "arguments": {"path": CPU_PATH, "property": prop}}
            for prop in ("feature-words", "filtered-features")
        ],
        machine="pc",
        cpu=f"base,{name}=on",
        accel=accel,
        extra=("-m", "16"),
    )
    return _bits(fw) | _bits(ff)


def qemu_features(accel: str) -> dict[str, set[Key]]:
    # `-machine none` has no CPU, which is all a model expansion needs (and
    # avoids a nested-KVM host refusing `max`'s MSRs at realize).
    (exp,) = run_commands(
        QEMU,
        [{"execute": "query-cpu-model-expansion",
          "arguments": {"type": "full", "model": {"name": "max"}}}],
        accel=accel,
    )  # fmt: skip
    names = sorted(k for k, v in exp["model"]["props"].items() if isinstance(v, bool))

    def one(name: str) -> tuple[str, set[Key]]:
        try:
            return name, qemu_bits_of(accel, name)
        except ToolError as e:
            print(f"skip {name}: {e}", file=sys.stderr)
            return name, set()

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(one, names))
    return {n: b for n, b in results if b}


def build(accel: str) -> list[dict[str, Any]]:
    qemu = qemu_features(accel)
    libvirt = libvirt_features(CPU_MAP)
    canon: dict[Key, str] = {}
    aliases: dict[Key, list[str]] = {}
    problems = []
    for name, bits in sorted(qemu.items()):
        bits = bits - set(QEMU_SECONDARY_BITS.get(name, []))
        if len(bits) > 1:
            bits = {k for k in bits if (k[0], k[1], k[2]) not in XSAVE_COMPONENT_WORDS}
        if len(bits) != 1:
            problems.append(f"{name} sets {sorted(bits)}; extend QEMU_SECONDARY_BITS")
            continue
        (key,) = bits
        if name in QEMU_ALIASES:
            aliases.setdefault(key, []).append(name)
        elif key in canon:
            raise SystemExit(f"{name} and {canon[key]} share {key}; extend QEMU_ALIASES")
        else:
            canon[key] = name
    if problems:
        raise SystemExit("\n".join(problems))
    for key, names in aliases.items():
        target = canon.get(key)
        bad = [n for n in names if QEMU_ALIASES[n] != target]
        if bad:
            raise SystemExit(f"aliases {bad} at {key} do not point at {target}")
    keys = sorted(set(canon) | set(libvirt) | set(LINUX_NAMES))
    out = []
    for key in keys:
        leaf, subleaf, reg, bit = key
        q = canon.get(key)
        if leaf == 0x40000001:
            kind = "kvm-pv"
        elif key in DYNAMIC:
            kind = "dynamic"
        elif q is None:
            kind = "unsettable"
        else:
            kind = "plain"
        out.append(
            {
                "leaf": f"{leaf:#x}",
                "subleaf": subleaf,
                "reg": reg,
                "bit": bit,
                "qemu": q,
                "qemu_aliases": sorted(aliases.get(key, [])),
                "libvirt": libvirt.get(key),
                "kind": kind,
                "libvirt_kvm": LIBVIRT_KVM.get(key),
                "linux": LINUX_NAMES.get(key) if q is None and key not in libvirt else None,
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--accel",
        default="kvm",
        help="QEMU accelerator; under tcg QEMU drops the KVM PV names silently",
    )
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()
    version = subprocess.run(
        [QEMU, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    doc = {
        "comment": "Generated by scripts/gen_features.py; reviewed and shipped as data.",
        "sources": {"qemu": version, "libvirt_cpu_map": str(CPU_MAP)},
        "features": build(args.accel),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(doc['features'])} features to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
