"""QEMU: render a CpuConfig as `-cpu MODEL,feat=on,...,feat=off,enforce`, and
parse an existing -cpu value back into a policy or a CpuConfig.

Rendering rules: canonical QEMU property names only (from the registry),
always `name=on|off` (QEMU deprecates `+name/-name`, and mixing the two forms
changes precedence), features on first then off, each sorted, and always
`enforce` so that QEMU refuses to start rather than silently drop a feature.
`-cpu host` also gets `host-cache-info=on` (libvirt's `<cache
mode='passthrough'/>` for host-passthrough): the cache leaves (2, 4,
0x80000005/6, 0x8000001D) are then the host's, as KVM reports them and the
configuration has them, rather than QEMU's made-up ones.
Feature-MSR bits (rdctl-no, mds-no, vmx-*: cpuid/msr_features) are QEMU
properties in the same namespace: they follow the CPUID features, on then
off, spelled as QEMU spells them (the feature-MSR registry's QEMU names).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Final, Literal

from kvmcpuid_virt.adapters import safe_model, safe_name
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.features import Feature, Registry, registry
from kvmcpuid_virt.cpuid.msr_features import MsrFeature, MsrRegistry, msr_registry
from kvmcpuid_virt.errors import InputError, UnknownFeatureError

__all__ = ["HOST_ONLY_PROPS", "Format", "cpu_value", "parse", "render", "render_argv"]

Format = Literal["arg", "argv", "json"]
FORMATS: Final[tuple[Format, ...]] = ("arg", "argv", "json")

# What QEMU 7.2 takes for a bool property (qapi_bool_parse): exactly these,
# case included (`avx=OFF` makes QEMU exit).
_ON: Final = frozenset({"on", "yes", "true", "y"})
_OFF: Final = frozenset({"off", "no", "false", "n"})
_ASCII_BLANKS: Final = re.compile(r"[ \t\n\r\f\v]+")
# -cpu options that are not CPUID features; parse accepts and ignores these
# (enforce/check only change how QEMU reports a mismatch).
_IGNORED_FLAGS: Final = frozenset({"enforce", "check"})
# QEMU's non-feature CPU properties (target/i386/cpu.c x86_cpu_properties,
# QEMU 7.2) that a configuration can stand beside, with the values it can:
# host-cache-info and l3-cache decide only the cache leaves, which verify
# reads from the -cpu value itself (host-cache-info=on: the host's; else
# QEMU's own, not modelled); migratable=on is `-cpu host`'s default, while
# off adds KVM bits QEMU has no name for, which no configuration carries.
_ACCEPTED_PROPS: Final[dict[str, frozenset[bool]]] = {
    "host-cache-info": frozenset({True, False}),
    "l3-cache": frozenset({True, False}),
    "migratable": frozenset({True}),
}
# Of those, the ones only QEMU's host and max CPU types have (QEMU exits
# with "Property 'EPYC-x86_64-cpu.host-cache-info' not found" otherwise).
HOST_ONLY_PROPS: Final = frozenset({"host-cache-info", "migratable"})
_HOST_TYPES: Final = frozenset({"host", "max"})
# The others: each changes a field the configuration decides from the host's
# table (identity, max leaves, address sizes, brand, topology IDs, Hyper-V
# leaves...), so a -cpu value with one is refused rather than read as
# something else. Any name QEMU has that the registries do not is refused
# the same way; this list only makes the common ones say what they change.
_REFUSED_PROPS: Final[dict[str, str]] = {
    **{n: "the CPU's identity" for n in ("family", "model", "stepping", "vendor", "model-id",
                                         "ucode-rev")},
    **{n: "the max leaves" for n in ("level", "xlevel", "xlevel2", "min-level", "min-xlevel",
                                     "min-xlevel2", "level-func7", "full-cpuid-auto-level",
                                     "x-intel-pt-auto-level", "cpuid-0xb")},
    **{n: "the address sizes" for n in ("phys-bits", "host-phys-bits", "host-phys-bits-limit",
                                        "fill-mtrr-mask")},
    **{n: "the vCPU's topology IDs" for n in ("apic-id", "socket-id", "die-id", "core-id",
                                              "thread-id", "node-id")},
    **{n: "the hypervisor leaves" for n in ("kvm", "tsc-frequency", "vmware-cpuid-freq",
                                            "x-vendor-cpuid-only")},
    **{n: "the PMU and LBR leaves" for n in ("pmu", "lbr-fmt", "lbr_fmt", "lmce")},
}  # fmt: skip
# QEMU's CPU properties that are no CPUID state at all (QOM links, state
# read back, migration and enforcement knobs).
_NOT_CPUID: Final = frozenset({
    "memory", "start-powered-off", "crash-information", "unavailable-features",
    "feature-words", "filtered-features", "x-force-features", "x-migrate-smi-count",
    "kvm-no-smi-migration", "tcg-cpuid", "kvm-pv-enforce-cpuid", "x-hv-max-vps",
    "x-hv-synic-kvm-only",
})  # fmt: skip


def _qemu_name(reg: Registry, name: str) -> str:
    """The registry's QEMU spelling of a config key, refusing anything else."""
    feature = reg.by_qemu(name)
    if feature is None or feature.qemu != name:
        raise InputError(f"refusing feature {name!r}: not a canonical QEMU name in the registry")
    return safe_name(name)


def _qemu_msr_name(reg: MsrRegistry, name: str) -> str:
    """The feature-MSR registry's QEMU spelling of a config key, refusing
    anything else."""
    feature = reg.by_qemu(name)
    if feature is None or feature.qemu != name:
        raise InputError(f"refusing MSR feature {name!r}: not a canonical QEMU name in the "
                         "registry")  # fmt: skip
    return safe_name(name)


def cpu_value(config: CpuConfig) -> str:
    """The value of -cpu: MODEL,on...,off...,msr on...,msr off...,enforce."""
    reg = registry()
    mreg = msr_registry()
    parts = [safe_model(config.model)]
    if config.model == "host":
        parts.append("host-cache-info=on")  # see the module's docstring
    parts += [f"{_qemu_name(reg, n)}=on" for n in config.enabled()]
    parts += [f"{_qemu_name(reg, n)}=off" for n in config.disabled()]
    parts += [f"{_qemu_msr_name(mreg, n)}=on" for n in config.msr_enabled()]
    parts += [f"{_qemu_msr_name(mreg, n)}=off" for n in config.msr_disabled()]
    parts.append("enforce")
    return ",".join(parts)


def render_argv(config: CpuConfig) -> list[str]:
    return ["-cpu", cpu_value(config)]


def render(config: CpuConfig, fmt: Format = "arg") -> str:
    """arg: `-cpu VALUE` on one line (safe to word-split: no shell
    metacharacters can appear); argv: one argument per line; json: the argv
    and the decisions behind it."""
    argv = render_argv(config)
    if fmt == "arg":
        return " ".join(argv) + "\n"
    if fmt == "argv":
        return "\n".join(argv) + "\n"
    if fmt == "json":
        doc = {
            "argv": argv,
            "model": config.model,
            "vendor": config.vendor,
            "enabled": sorted([*config.enabled(), *config.msr_enabled()]),
            "disabled": sorted([*config.disabled(), *config.msr_disabled()]),
            "dropped": list(config.dropped),
            "expected_msrs": {f"{i:#x}": f"{v:#x}" for i, v in config.expected_msrs.items()},
            "notes": list(config.notes),
        }
        return json.dumps(doc, indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def _unknown_to_qemu(reg: Registry, name: str) -> UnknownFeatureError:
    """The error for a -cpu feature QEMU has no property for, hinting at the
    QEMU spelling when the name is the bit's in another spelling (libvirt's,
    Linux's, another case) and at close QEMU names otherwise."""
    err = UnknownFeatureError(name, reg.hint(name, lambda f: f.qemu))
    # Same error and hint, said as what it is: a name other tools may know.
    err.args = (str(err).replace("unknown feature", "QEMU does not know the -cpu feature", 1),)
    return err


def _not_a_feature(name: str, opt: str) -> InputError | None:
    """The error for a QEMU CPU property that is not a CPUID feature switch
    (None for a feature, or a name QEMU does not have)."""
    what = _REFUSED_PROPS.get(name) or ("the Hyper-V leaves" if name.startswith("hv-") else None)
    if what is not None:
        why = f"it sets {what}, which a configuration takes from the host's table"
    elif name in _NOT_CPUID:
        why = "it is no CPUID state a configuration can say"
    else:
        return None
    return InputError(f"-cpu option {_show(opt)}: QEMU's {name} is not a feature; not "
                      f"supported here ({why})")  # fmt: skip


def _qemu_feature(reg: Registry, name: str) -> Feature | MsrFeature:
    """The feature (a CPUID bit, else a feature-MSR bit) whose QOM property
    (canonical or alias) is exactly `name`: QEMU looks property names up as
    given, so `LAHF-LM` or libvirt's `cvt16` make it exit."""
    feature = reg.by_qemu(name)
    if feature is None:
        msr_feature = msr_registry().by_qemu(name)
        if msr_feature is not None:
            return msr_feature
        raise _unknown_to_qemu(reg, name)
    return feature


# Longer than any QEMU property or model name (the longest are ~30): a name
# past this is refused before any lookup, and shown cut in the message.
_MAX_NAME: Final = 64


def _show(text: str) -> str:
    """repr() of user text for a one-line message, cut to ~40 characters."""
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _option_name(name: str, opt: str) -> str:
    """The property name of a -cpu option, refused when empty or too long."""
    if not name:
        raise InputError(f"-cpu option {_show(opt)}: no feature name")
    if len(name) > _MAX_NAME:
        raise InputError(f"-cpu option {_show(opt)}: longer than {_MAX_NAME} characters")
    return name


def _cpu_value(words: list[str]) -> str:
    """The -cpu value of an argv, or the value itself."""
    # QEMU takes `--cpu` as `-cpu`, and the last -cpu of a command line wins.
    at = [i for i, w in enumerate(words) if w in ("-cpu", "--cpu")]
    if at:
        if at[-1] + 1 >= len(words):
            raise InputError("-cpu without a value")
        return words[at[-1] + 1]
    if len(words) == 1:
        return words[0]
    raise InputError("expected a -cpu value or an argument list with -cpu")


def _accepted_prop(name: str, val: str, opt: str) -> None:
    """Check the value of an accepted non-feature property (_ACCEPTED_PROPS)."""
    on = True if val in _ON else False if val in _OFF else None
    if on is None:
        raise InputError(f"-cpu option {_show(opt)}: {name} takes on or off")
    if on not in _ACCEPTED_PROPS[name]:
        raise InputError(f"-cpu option {_show(opt)}: {name}={val} is not supported (it adds "
                         "KVM bits QEMU has no name for, which no configuration carries)")


def parse(text: str | Sequence[str]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(model, enabled names, disabled names) from a -cpu value, `-cpu VALUE`,
    or an argv containing `-cpu VALUE` (the last one, as QEMU does). Names
    become registry canonical names. The result is what QEMU 7.2 makes of
    the string (x86_cpu_parse_featurestr, x86_cpu_expand_features):

    - `f=VALUE` and bare `f` (=on) are QOM properties, applied in order (the
      last wins); QEMU turns `_` into `-` in their names first;
    - `+f` and `-f` are collected and applied after all of them, every `+f`
      then every `-f`: `-f` beats `+f` and `f=on` whatever the order; their
      names are taken as written;
    - names must be QEMU's property names exactly (canonical or QEMU alias,
      exact case): anything else is UnknownFeatureError, as QEMU refuses it;
    - VALUE is on/yes/true/y or off/no/false/n, exactly (`f=` is refused,
      as QEMU refuses it);
    - an empty name (`,=on`, `,+`) or one longer than any QEMU name is
      InputError; empty options (`,,`) are skipped, as QEMU's strtok() does.

    `enforce` and `check` are accepted and ignored, and so are the
    non-feature properties in _ACCEPTED_PROPS (host-cache-info, l3-cache,
    migratable=on: they decide no feature bit); any other non-feature
    property (level, phys-bits, model-id, ...) is InputError saying it is not
    a feature. Every message names the option."""
    # Split as a shell does, at ASCII blanks only: str.split() would also cut
    # at U+00A0 or U+2028, which QEMU would get inside a word.
    words = [w for w in _ASCII_BLANKS.split(text) if w] if isinstance(text, str) else list(text)
    value = _cpu_value(words)
    model, *opts = value.split(",")
    if not model:
        raise InputError(f"-cpu {_show(value)}: no model name")
    if len(model) > _MAX_NAME:
        raise InputError(f"-cpu model {_show(model)}: longer than {_MAX_NAME} characters")
    safe_model(model)
    reg = registry()
    props: dict[str, bool] = {}
    plus: list[str] = []
    minus: list[str] = []
    for opt in opts:
        if not opt:
            continue  # QEMU's strtok() skips empty options
        if opt[0] in "+-":
            name = _option_name(opt[1:], opt)
            if name in _ACCEPTED_PROPS or _not_a_feature(name, opt) is not None:
                # QEMU's +f/-f take feature names only ("not a feature bit").
                raise InputError(f"-cpu option {_show(opt)}: {name} is not a feature; "
                                 f"write {name}=on or {name}=off")  # fmt: skip
            if name not in _IGNORED_FLAGS:
                (plus if opt[0] == "+" else minus).append(_qemu_feature(reg, name).name)
            continue
        name, eq, val = opt.partition("=")
        name = _option_name(name, opt).replace("_", "-")  # QEMU's feat2prop()
        if name in _IGNORED_FLAGS:
            continue
        refused = _not_a_feature(name, opt)
        if refused is not None:
            raise refused
        if name in _ACCEPTED_PROPS:
            if name in HOST_ONLY_PROPS and model not in _HOST_TYPES:
                raise InputError(f"-cpu option {_show(opt)}: {name} is only for -cpu host or "
                                 f"max, not {_show(model)} (QEMU has no such property there)")
            _accepted_prop(name, val if eq else "on", opt)
            continue
        if not eq or val in _ON:  # a bare name is name=on
            on = True
        elif val in _OFF:
            on = False
        elif reg.by_qemu(name) is not None or msr_registry().by_qemu(name) is not None:
            # What QEMU says: "Parameter 'NAME' expects 'on' or 'off'".
            raise InputError(f"-cpu option {_show(opt)}: {name} takes on or off "
                             "(or yes/no, true/false, y/n)")  # fmt: skip
        else:
            raise InputError(f"-cpu option {_show(opt)}: not a CPUID feature switch")
        canonical = _qemu_feature(reg, name).name
        props.pop(canonical, None)  # the last setting wins; keep it in its place
        props[canonical] = on
    state = dict(props)
    for names, on in ((plus, True), (minus, False)):
        for canonical in names:
            state.pop(canonical, None)
            state[canonical] = on
    enable = tuple(n for n, on in state.items() if on)
    disable = tuple(n for n, on in state.items() if not on)
    return model, enable, disable
