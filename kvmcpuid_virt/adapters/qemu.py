"""QEMU: render a CpuConfig as `-cpu MODEL,feat=on,...,feat=off,enforce`, and
parse an existing -cpu value back into a policy or a CpuConfig.

Rendering rules: canonical QEMU property names only (from the registry),
always `name=on|off` (QEMU deprecates `+name/-name`, and mixing the two forms
changes precedence), features on first then off, each sorted, and always
`enforce` so that QEMU refuses to start rather than silently drop a feature.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final, Literal

from kvmcpuid_virt.adapters import safe_model, safe_name
from kvmcpuid_virt.cpuid.features import Registry, registry
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.policy.config import CpuConfig

__all__ = ["Format", "cpu_value", "parse", "parse_config", "render", "render_argv"]

Format = Literal["arg", "argv", "json"]
FORMATS: Final[tuple[Format, ...]] = ("arg", "argv", "json")

_ON: Final = frozenset({"on", "true", "yes"})
_OFF: Final = frozenset({"off", "false", "no"})
# -cpu options that are not CPUID features; parse accepts and ignores these
# (enforce/check only change how QEMU reports a mismatch).
_IGNORED_FLAGS: Final = frozenset({"enforce", "check"})


def _qemu_name(reg: Registry, name: str) -> str:
    """The registry's QEMU spelling of a config key, refusing anything else."""
    feature = reg.by_qemu(name)
    if feature is None or feature.qemu != name:
        raise InputError(f"refusing feature {name!r}: not a canonical QEMU name in the registry")
    return safe_name(name)


def cpu_value(config: CpuConfig) -> str:
    """The value of -cpu: MODEL,on...,off...,enforce."""
    reg = registry()
    parts = [safe_model(config.model)]
    parts += [f"{_qemu_name(reg, n)}=on" for n in config.enabled()]
    parts += [f"{_qemu_name(reg, n)}=off" for n in config.disabled()]
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
            "enabled": list(config.enabled()),
            "disabled": list(config.disabled()),
            "dropped": list(config.dropped),
        }
        return json.dumps(doc, indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def parse(text: str | Sequence[str]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(model, enabled names, disabled names) from a -cpu value, `-cpu VALUE`,
    or an argv containing `-cpu VALUE`. Names become registry canonical names;
    any spelling QEMU accepts (`+f`, `-f`, `f`, `f=on|off|true|false|yes|no`,
    aliases such as sse4_1) is understood. A later setting of a feature wins,
    as in QEMU. Unknown features and non-feature properties are InputError."""
    words = text.split() if isinstance(text, str) else list(text)
    if "-cpu" in words:
        i = words.index("-cpu")
        if i + 1 >= len(words):
            raise InputError("-cpu without a value")
        value = words[i + 1]
    elif len(words) == 1:
        value = words[0]
    else:
        raise InputError("expected a -cpu value or an argument list with -cpu")
    model, *opts = value.split(",")
    if not model:
        raise InputError(f"-cpu {value!r}: no model name")
    safe_model(model)
    reg = registry()
    state: dict[str, bool] = {}
    for opt in opts:
        if not opt or opt in _IGNORED_FLAGS:
            continue
        if opt[0] in "+-":
            name, on = opt[1:], opt[0] == "+"
        elif "=" in opt:
            name, _, val = opt.partition("=")
            if val.lower() in _ON:
                on = True
            elif val.lower() in _OFF:
                on = False
            else:
                raise InputError(f"-cpu option {opt!r}: not a CPUID feature switch")
        else:
            name, on = opt, True
        if name in _IGNORED_FLAGS:
            continue
        feature = reg.lookup(name)  # UnknownFeatureError names close matches
        state.pop(feature.name, None)  # the last setting wins
        state[feature.name] = on
    enable = tuple(n for n, on in state.items() if on)
    disable = tuple(n for n, on in state.items() if not on)
    return model, enable, disable


def parse_config(
    text: str | Sequence[str],
    table: CpuidTable,
    *,
    allow_unsupported: bool = False,
    source: str = "",
) -> CpuConfig:
    """A CpuConfig for an existing -cpu value applied to `table` (what this
    host, or a dump, supports): the model as base, then its switches."""
    from kvmcpuid_virt.policy.select import Policy, build

    model, enable, disable = parse(text)
    # What QEMU runs for this string is its own model definition (see
    # Policy.model_source).
    policy = Policy(model=model, enable=enable, disable=disable,
                    allow_unsupported=allow_unsupported, model_source="qemu")  # fmt: skip
    return build(table, policy, source=source)
