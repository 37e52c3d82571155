"""QEMU: render a CpuConfig as `-cpu MODEL,feat=on,...,feat=off,enforce`, and
parse an existing -cpu value back into a policy or a CpuConfig.

Rendering rules: canonical QEMU property names only (from the registry),
always `name=on|off` (QEMU deprecates `+name/-name`, and mixing the two forms
changes precedence), features on first then off, each sorted, and always
`enforce` so that QEMU refuses to start rather than silently drop a feature.
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

__all__ = ["Format", "cpu_value", "parse", "render", "render_argv"]

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

    `enforce` and `check` are accepted and ignored; any other non-feature
    property is InputError. Every message names the option."""
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
            if name not in _IGNORED_FLAGS:
                (plus if opt[0] == "+" else minus).append(_qemu_feature(reg, name).name)
            continue
        name, eq, val = opt.partition("=")
        name = _option_name(name, opt).replace("_", "-")  # QEMU's feat2prop()
        if name in _IGNORED_FLAGS:
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
