"""Property tests (hypothesis) of every reader of untrusted input: the three
dump formats (cpuid.formats.loads), QEMU's -cpu (adapters.qemu.parse) and
libvirt's <cpu> (adapters.libvirt.parse).

(a) Whatever the input, a reader returns or raises InputError with one line
    naming the source: never KeyError, ValueError, IndexError,
    RecursionError... (a traceback at the command line). What a dump reader
    accepts is one table by the documented rules (table.first_problem).
(b) Round trips where the input is valid: any table by those rules dumps and
    loads back equal in every format (what each format carries: see
    test_valid_tables_round_trip); a CpuConfig rendered for QEMU or libvirt
    parses back to its (model, enabled, disabled).

Deterministic and fast: derandomize=True, no example database, example
counts sized so this file runs in well under 20 s. Needs no /dev/kvm, QEMU
or libvirtd: configs are built with the recorded tool facts (FACTS)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.adapters import qemu
from kvmcpuid_virt.analysis.given import qemu_cpu_value
from kvmcpuid_virt.config.build import Policy, build
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import FORMATS, JSON_FORMAT_NAME, Dump, Format, dumps, loads
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES, CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import InputError, PolicyError
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import FACTS, cpu_dump_paths


def _settings(examples: int) -> Callable[[Any], Any]:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


SOURCE = "fuzz.in"
REG = registry()
U32 = st.integers(0, 0xFFFF_FFFF)


def _refused_well(exc: InputError, source: str = SOURCE) -> None:
    """The error the CLI prints: one line that names the source first."""
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(source), message
    assert len(message) < 400, message


# --- valid tables -------------------------------------------------------------


@st.composite
def valid_tables(draw: st.DrawFn, stateful: bool = True) -> CpuidTable:
    """Tables by table.first_problem's rules: leaf 0 with a vendor, each
    (leaf, subleaf) once (a STATEFUL_FUNC leaf 2 run aside), one flag shape
    per leaf, no entry beyond its range's max leaf; 32-bit everything."""
    vendor = draw(st.tuples(U32, U32, U32).filter(any))
    max_basic = draw(st.integers(0, 0x24))
    entries = [CpuidEntry(0, 0, EntryFlag.NONE, max_basic, *vendor)]
    leaves = draw(st.sets(st.integers(1, max(max_basic, 1)), max_size=12))
    if draw(st.booleans()):
        max_ext = draw(st.integers(0x8000_0000, 0x8000_0028))
        entries.append(CpuidEntry(0x8000_0000, 0, EntryFlag.NONE, max_ext, *draw(st.tuples(
            U32, U32, U32))))  # fmt: skip
        if max_ext > 0x8000_0000:
            leaves |= draw(st.sets(st.integers(0x8000_0001, max_ext), max_size=8))
    # Ranges no max leaf bounds here (hypervisor, Xeon Phi, Centaur).
    leaves |= draw(st.sets(st.sampled_from([0x2000_0000, 0x4000_0000, 0x4000_0001,
                                            0x4000_0100, 0xC000_0000]), max_size=3))  # fmt: skip
    for leaf in sorted(leaves):
        if leaf > max_basic and leaf < 0x1000_0000:
            continue
        if stateful and leaf == 2 and draw(st.booleans()):
            # Old leaf 2: a run of reads, STATE_READ_NEXT on the first.
            for k in range(draw(st.integers(1, 3))):
                flags = EntryFlag.STATEFUL_FUNC | (EntryFlag.STATE_READ_NEXT if k == 0 else 0)
                entries.append(CpuidEntry(2, 0, flags, *draw(st.tuples(U32, U32, U32, U32))))
            continue
        subleaves = draw(st.sets(st.integers(0, 0x40), min_size=1, max_size=4))
        indexed = subleaves != {0} or draw(st.booleans())
        flags = EntryFlag.SIGNIFICANT_INDEX if indexed else EntryFlag.NONE
        for sub in sorted(subleaves):
            entries.append(CpuidEntry(leaf, sub, flags, *draw(st.tuples(U32, U32, U32, U32))))
    rest = draw(st.permutations(entries[1:]))
    return CpuidTable([entries[0], *rest])


KINDS = ("supported", "emulated", "cpu", "guest", "config")
# What str.isprintable() takes: letters, marks, numbers, punctuation, symbols,
# and of the separators only ' ' (the reader refuses the rest).
_PRINTABLE = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"],
                           include_characters=" ")  # fmt: skip
HOSTS = st.dictionaries(st.text(_PRINTABLE, max_size=8), st.text(_PRINTABLE, max_size=20),
                        max_size=4)  # fmt: skip


def _carried(table: CpuidTable) -> list[tuple[tuple[int, int], int, tuple[int, int, int, int]]]:
    """What a flag-less format carries of a table: the order, (leaf, subleaf)
    and registers, and SIGNIFICANT_INDEX as the readers restore it (the
    leaves INDEXED_LEAVES names, and every leaf listed at a subleaf > 0)."""
    multi = {e.function for e in table if e.index}
    return [(e.key, int(EntryFlag.SIGNIFICANT_INDEX if e.function in INDEXED_LEAVES | multi
                        else EntryFlag.NONE), e.regs()) for e in table]  # fmt: skip


@_settings(150)
@given(valid_tables(), st.sampled_from(KINDS), HOSTS)
def test_valid_tables_round_trip_in_json(table: CpuidTable, kind: str, host: dict[str, str]
                                         ) -> None:  # fmt: skip
    """JSON carries everything: entries (flags, order, stateful runs), kind, host."""
    dump = Dump(table, kind, host)  # type: ignore[arg-type]
    assert _one_table(dump)  # the strategy makes what the rules call valid
    back = loads(dumps(dump, "json"), SOURCE)
    assert back.table == table
    assert (back.kind, back.host) == (kind, host)


@_settings(150)
@given(valid_tables(stateful=False), st.sampled_from(["cpudata", "cpuid"]))
def test_valid_tables_round_trip_flag_less(table: CpuidTable, fmt: Format) -> None:
    """<cpudata> and `cpuid -1r` text carry no flags, kind or host (kind reads
    as "cpu"), and cannot repeat a (leaf, subleaf), so no STATEFUL_FUNC run:
    compare what they carry, and that a second round trip changes nothing."""
    back = loads(dumps(Dump(table), fmt), SOURCE)
    assert _carried(back.table) == _carried(table)
    assert back.kind == "cpu" and back.host == {}
    assert loads(dumps(back, fmt), SOURCE).table == back.table


# --- (a) arbitrary and mutated dumps ------------------------------------------------


def _one_table(dump: Dump) -> bool:
    """The rules of table.first_problem, restated plainly here (not by
    calling it: an accepted table must pass a check the reader did not run)."""
    t = dump.table
    leaf0 = [e for e in t if e.key == (0, 0)]
    if len(leaf0) != 1 or (dump.kind != "emulated" and not any(leaf0[0].regs()[1:])):
        return False
    for e in t:
        same_leaf = [o for o in t if o.function == e.function]
        if len({int(o.flags) & 3 for o in same_leaf}) != 1:
            return False  # indexed and not, in one leaf
        if sum(o.key == e.key for o in t) > 1 and EntryFlag.STATEFUL_FUNC not in e.flags:
            return False
        if e.index and EntryFlag.SIGNIFICANT_INDEX not in e.flags:
            return False
        if EntryFlag.STATE_READ_NEXT in e.flags and EntryFlag.STATEFUL_FUNC not in e.flags:
            return False
        if leaf0[0].eax < e.function < 0x1000_0000:
            return False
        if 0x8000_0000 < e.function < 0x8001_0000:
            ext = t.lookup(0x8000_0000)
            if ext is None or ext.eax >> 16 != 0x8000 or e.function > ext.eax:
                return False
    return True


def _accepted_is_valid(dump: Dump) -> None:
    """What a reader accepts is one table by the rules, and round-trips."""
    assert _one_table(dump), dump.table.entries
    for fmt in FORMATS:
        if fmt == "json" or not any(EntryFlag.STATEFUL_FUNC in e.flags for e in dump.table):
            loads(dumps(dump, fmt), "again")


def _read(text: str) -> None:
    try:
        dump = loads(text, SOURCE)
    except InputError as exc:
        _refused_well(exc)
    else:
        _accepted_is_valid(dump)


@_settings(300)
@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=300))
def test_any_text_is_a_dump_or_an_input_error(text: str) -> None:
    # Every code point, lone surrogates included (a str need not come from a
    # file); each format's first character too.
    for head in ("", "{", "<", "CPU:\n"):
        _read(head + text)


@st.composite
def mutated_dumps(draw: st.DrawFn) -> str:
    """A valid dump in one format with lines dropped, repeated, swapped,
    replaced or cut: near-valid input that reaches the semantic checks."""
    fmt = draw(st.sampled_from(FORMATS))
    text = dumps(Dump(draw(valid_tables(stateful=fmt == "json"))), fmt)
    lines = text.split("\n")
    junk = st.one_of(
        st.sampled_from(lines),
        st.text(max_size=40),
        st.sampled_from(['"eax": 1,', "<cpuid eax_in='0x0'/>", "CPU 1:", "CPU:", "<cpudata>",
                         '{"function": "0x0", "index": "0x0"},', "0x1 0x0: eax=0x1",
                         "   0x80000001 0x00: eax=0x0 ebx=0x0 ecx=0x0 edx=0x0",
                         '"entries": [],', '"host": {"a": "\\u0000"},', '"version": 1.0,']),
    )  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "repeat", "replace", "insert", "cut", "swap"]))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "replace":
            lines[i] = draw(junk)
        elif op == "insert":
            lines.insert(i, draw(junk))
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


@_settings(400)
@given(mutated_dumps())
def test_mutated_dumps_are_refused_or_valid(text: str) -> None:
    _read(text)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats() | st.text(max_size=8))  # fmt: skip
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)  # fmt: skip
HEXISH = st.one_of(U32.map(hex), U32.map(hex), st.integers(0, 0x24).map(hex),
                   st.integers(-(2**40), 2**40).map(hex), U32,
                   st.sampled_from(["", "0x", "0x_1", "+1", "1 ", "0x\u0661", "0X1F", "zz",
                                    "0x1ffffffff", "0x" + "0" * 16 + "1"]),
                   JSON_VALUES)  # fmt: skip
ENTRY_KEYS = st.sampled_from(["function", "index", "flags", "eax", "ebx", "ecx", "edx", "Eax"])


def _object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, JSON text) pairs, repeats allowed (json.dumps
    cannot write a key twice)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


@st.composite
def json_dumps(draw: st.DrawFn) -> str:
    """Dump-shaped JSON with wrong types, repeated and unknown keys."""
    entry = st.lists(st.tuples(ENTRY_KEYS, HEXISH.map(json.dumps)), max_size=8).map(_object)
    def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        # Hypothesis leans to small draws: make 0 the good case.
        return st.integers(0, 5).flatmap(lambda n: JSON_VALUES if n == 5 else good)

    fields = [
        ("format", mostly(st.just(JSON_FORMAT_NAME))),
        ("version", mostly(st.just(1))),
        ("kind", mostly(st.sampled_from(KINDS))),
        ("host", mostly(HOSTS)),
    ]
    pairs = [(k, json.dumps(draw(v))) for k, v in fields if draw(st.integers(0, 9)) != 9]
    pairs.append(("entries", "[" + ", ".join(draw(st.lists(entry, max_size=6))) + "]"))
    if draw(st.integers(0, 3)) == 3:  # a key twice, or one the format does not have
        pairs.append((draw(st.sampled_from(["entries", "version", "zz"])),
                      json.dumps(draw(JSON_VALUES))))  # fmt: skip
    return _object(draw(st.permutations(pairs)))


@_settings(300)
@given(json_dumps())
def test_json_dumps_are_refused_or_valid(text: str) -> None:
    _read(text)


@st.composite
def cpudata_docs(draw: st.DrawFn) -> str:
    """<cpudata> with unknown or namespaced elements and attributes, text,
    out-of-range and malformed values, entities and nesting."""
    attrs = st.dictionaries(st.sampled_from(["eax_in", "ecx_in", "eax", "ebx", "ecx", "edx",
                                             "EAX", "arch", "index"]),
                            HEXISH.map(str), max_size=6)  # fmt: skip
    tag = st.sampled_from(["cpuid"] * 12 + ["msr", "cpudata", "x:cpuid", "cpu"])
    parts = []
    for name, a in draw(st.lists(st.tuples(tag, attrs), max_size=8)):
        el = "".join(f" {k}={json.dumps(v)}" for k, v in a.items())
        body = draw(st.sampled_from(["/>"] * 8 + ["></" + name + ">", ">text</" + name + ">",
                                     "><cpuid/></" + name + ">", "/>&amp;", "/>&e;"]))  # fmt: skip
        parts.append(f"<{name}{el}{body}")
    root = draw(st.sampled_from(["<cpudata arch='x86'>", "<cpudata>", "<cpudata arch='arm'>",
                                 "<cpudata arch='x86' xmlns:x='urn:x'>", "<cpudata a='b'>"]))
    return root + "\n".join(parts) + draw(st.sampled_from(["</cpudata>", "", "</cpudata><x/>"]))


@_settings(300)
@given(cpudata_docs())
def test_cpudata_docs_are_refused_or_valid(text: str) -> None:
    _read(text)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@_settings(150)
@given(st.binary(max_size=200) | st.sampled_from([b"\xef\xbb\xbf{", b"<\xff>", b"CPU:\n\x80"]))
def test_any_bytes_in_a_file_are_a_dump_or_an_input_error(scratch: Path, data: bytes) -> None:
    # Through the file reader, as `--from FILE` reads: bad UTF-8 included.
    path = scratch / "dump.bin"
    path.write_bytes(data)
    try:
        dump = load_dump(str(path))
    except InputError as exc:
        _refused_well(exc, str(path))
    else:
        _accepted_is_valid(dump)


# --- (a) QEMU -cpu -------------------------------------------------------------------

QEMU_NAMES = sorted({n for f in REG.features for n in (f.qemu, *f.qemu_aliases, f.libvirt)
                     if n is not None})  # fmt: skip
JUNK = st.sampled_from([",", "=", "+", "-", "_", " ", "\t", "\u00a0", ",,", "=on", "=OFF", "",
                        "-cpu ", "\u2028", "é"]) | st.text(max_size=4)  # fmt: skip
OPTIONS = st.tuples(
    st.sampled_from(["", "", "+", "-"]),
    st.sampled_from(QEMU_NAMES) | st.sampled_from(["enforce", "check", "level", ""]) | JUNK,
    st.sampled_from(["", "", "=on", "=off", "=yes", "=n", "=OFF", "=", "=maybe"]),
).map("".join)


@st.composite
def cpu_options(draw: st.DrawFn) -> str | list[str]:
    """-cpu values (and argvs) near what QEMU takes: a model, then options
    with +/- prefixes, =values, QEMU, libvirt and made-up names, junk."""
    models = st.sampled_from(["host", "qemu64", "Skylake-Server", "EPYC-v2"])
    model = draw(st.integers(0, 4).flatmap(lambda n: models if n else JUNK))
    seps = st.integers(0, 4).flatmap(lambda n: st.just(",") if n else JUNK)
    value = model + "".join(draw(st.lists(seps.flatmap(lambda sep: OPTIONS.map(lambda o: sep + o)),
                                          max_size=10)))  # fmt: skip
    form = draw(st.sampled_from(["value", "value", "-cpu", "argv", "words"]))
    if form == "-cpu":
        return "-cpu " + value
    if form == "argv":
        return ["-m", "64", "-cpu", value, *draw(st.lists(st.sampled_from(["-cpu", "x"]),
                                                          max_size=2))]  # fmt: skip
    if form == "words":
        return [*draw(st.lists(JUNK, max_size=4)), value]
    return value


@_settings(400)
@given(cpu_options() | st.text(max_size=60))
def test_any_cpu_option_is_parsed_or_an_input_error(text: str | list[str]) -> None:
    try:
        model, on, off = qemu.parse(text)
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 400, message
        return
    assert model and not set(on) & set(off)
    for name in (*on, *off):
        assert REG.lookup(name).name == name  # canonical registry names only


# --- (a) libvirt <cpu> ----------------------------------------------------------------

LIBVIRT_NAMES = sorted({f.libvirt for f in REG.features if f.libvirt is not None})
# What lxml lets an attribute or text hold (no control characters).
XML_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=8)
# Each element's attributes as libvirt's schema has them, and some it has not.
ATTRS = {
    "cpu": {"mode": ["custom"] * 4 + ["host-model", "host-passthrough", "maximum", "bogus"],
            "match": ["exact"] * 4 + ["strict", "minimum", ""],
            "check": ["none", "partial", "full", "full", "all"]},
    "model": {"fallback": ["allow", "forbid", "never"], "vendor_id": ["AuthenticAMD"]},
    "feature": {"policy": ["require", "disable", "optional", "force", "forbid", "bogus"],
                "name": [*LIBVIRT_NAMES, "pclmulqdq", "LAHF_LM", "", "kvmclock"]},
}  # fmt: skip
ODD_ATTRS = st.sampled_from(["foo", "{urn:x}mode", "name", "policy", "migratable"])
CHILD_TAGS = st.sampled_from(["feature"] * 6 + ["model", "vendor", "topology", "numa", "cache",
                                                "maxphysaddr", "features", "{urn:x}feature",
                                                "cpu"])  # fmt: skip


def _attributes(draw: st.DrawFn, el: Any) -> None:
    for key, values in ATTRS.get(str(el.tag), {}).items():
        if draw(st.integers(0, 3)):
            el.set(key, draw(st.sampled_from(values)))
    if not draw(st.integers(0, 7)):
        el.set(draw(ODD_ATTRS), draw(XML_TEXT))


@st.composite
def cpu_docs(draw: st.DrawFn) -> str:
    """<cpu> (alone or in a domain) with known and unknown attributes,
    values, children, namespaces, repeats and text."""
    cpu = etree.Element("cpu")
    _attributes(draw, cpu)
    if draw(st.integers(0, 4)):
        model = etree.SubElement(cpu, "model")
        model.text = draw(st.sampled_from(["qemu64", "EPYC", "Skylake-Server", "Nehalem"])
                          | st.sampled_from(["", "a b", "x" * 70]) | XML_TEXT)  # fmt: skip
        _attributes(draw, model)
    for tag in draw(st.lists(CHILD_TAGS, max_size=8)):
        child = etree.SubElement(cpu, tag)
        _attributes(draw, child)
        if not draw(st.integers(0, 9)):
            child.text = draw(XML_TEXT)
    if not draw(st.integers(0, 7)):
        cpu.text = draw(st.sampled_from(["\n  ", "text"]))
    text: str = etree.tostring(cpu, encoding="unicode")
    wrap = draw(st.sampled_from(["{}"] * 3 + ["<domain>{}</domain>", "<domain>{0}{0}</domain>",
                                 "<domain><features/>{}</domain>", "<x>{}</x>"]))  # fmt: skip
    return wrap.format(text)


@_settings(400)
@given(cpu_docs() | st.text(max_size=80).map(lambda t: "<cpu>" + t))
def test_any_cpu_element_is_parsed_or_an_input_error(text: str) -> None:
    try:
        model, on, off = lv.parse(text, SOURCE)
    except InputError as exc:
        _refused_well(exc)
        return
    assert model and not set(on) & set(off)
    for name in (*on, *off):
        assert REG.lookup(name).libvirt is not None


# --- (b) render, then parse ------------------------------------------------------------

TABLES = [load_dump(str(p)).table for p in cpu_dump_paths()]
SETTABLE = sorted(f.name for f in REG.features if f.qemu is not None and f.kind.value == "plain")
MODELS = ["host", "auto", "qemu64", "kvm64", "Nehalem", "Skylake-Server", "EPYC",
          "Cascadelake-Server"]


@st.composite
def configs(draw: st.DrawFn) -> Any:
    if not TABLES:
        pytest.skip("no real CPU dumps (set KVMCPUID_DATA)")
    table = draw(st.sampled_from(TABLES))
    on = draw(st.sets(st.sampled_from(SETTABLE), max_size=6))
    off = draw(st.sets(st.sampled_from(SETTABLE), max_size=6)) - on
    policy = Policy(model=draw(st.sampled_from(MODELS)), enable=tuple(sorted(on)),
                    disable=tuple(sorted(off)), allow_unsupported=True)  # fmt: skip
    try:
        return build(table, policy, facts=FACTS)
    except PolicyError:
        assume(False)  # a policy this CPU's table cannot meet


@_settings(100)
@given(configs())
def test_qemu_render_parses_back(config: Any) -> None:
    # Feature-MSR switches (mds-no, ...) follow the CPUID ones.
    expected = (config.model, config.enabled() + config.msr_enabled(),
                config.disabled() + config.msr_disabled())  # fmt: skip
    assert qemu.parse(qemu.render(config, "arg")) == expected
    assert qemu.parse(qemu.render(config, "argv")) == expected
    assert qemu.parse(qemu_cpu_value(qemu.render(config, "json"), "flags.json")) == expected


@_settings(100)
@given(configs())
def test_libvirt_render_parses_back(config: Any) -> None:
    """A <cpu> names base_model's cpu_map model (for `host` too), and carries
    the features that have a cpu_map name; the rest is unexpressible()'s."""
    try:
        model = lv.base_model(config, FACTS)
    except PolicyError:
        assume(False)
    named = {n for n in config.features if REG.lookup(n).libvirt is not None}
    msr = {n for n in config.msr_features if msr_registry().lookup(n).libvirt is not None}
    expected = (model,
                tuple(n for n in config.enabled() if n in named)
                + tuple(n for n in config.msr_enabled() if n in msr),
                tuple(n for n in config.disabled() if n in named)
                + tuple(n for n in config.msr_disabled() if n in msr))  # fmt: skip
    assert lv.parse(lv.render(config, model), SOURCE) == expected
    assert {u.name for u in lv.unexpressible(config) if u.on} <= set(config.enabled()) - named
