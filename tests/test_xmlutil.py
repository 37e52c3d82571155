"""xmlutil.parse_xml: the one hardened parser refuses every DOCTYPE, so no
entity, internal or external, is expanded anywhere (attribute values
included), and accepts the DTD-free XML real sources produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmcpuid_virt.cpuid.formats import loads
from kvmcpuid_virt.errors import DumpFormatError
from kvmcpuid_virt.fsutil import parse_xml_file as parse_file
from kvmcpuid_virt.xmlutil import parse_xml

REFUSED = "XML with a DOCTYPE is refused"

DOCTYPES = {
    # The review's case: libxml2 expands internal entities in attributes
    # even with resolve_entities=False; this loaded as leaf 7.
    "internal-entity-in-attribute":
        '<!DOCTYPE x [<!ENTITY a "0x7">]><cpudata><cpuid eax_in="&a;"/></cpudata>',
    # Nested entities: each level multiplies the attribute's size.
    "nested-entities-in-attribute":
        '<!DOCTYPE x [<!ENTITY a "0x7"><!ENTITY b "&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;">]>'
        '<cpudata><cpuid eax_in="0x1" eax="&c;"/></cpudata>',
    "external-entity-in-text":
        '<!DOCTYPE cpu [<!ENTITY x SYSTEM "file:///etc/passwd">]><cpu><model>&x;</model></cpu>',
    "name-only": "<!DOCTYPE cpu><cpu/>",
    "external-dtd": '<!DOCTYPE cpu SYSTEM "http://example.invalid/cpu.dtd"><cpu/>',
    "after-xml-declaration-and-comment":
        '<?xml version="1.0"?>\n<!-- c -->\n<!DOCTYPE cpu [\n]>\n<cpu/>',
}  # fmt: skip


@pytest.mark.parametrize("text", DOCTYPES.values(), ids=DOCTYPES.keys())
def test_any_doctype_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(DumpFormatError) as info:
        parse_xml(text, "in.xml")
    assert str(info.value).startswith(f"in.xml: {REFUSED}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", DOCTYPES.values(), ids=DOCTYPES.keys())
def test_any_doctype_is_refused_as_bytes(text: str) -> None:
    with pytest.raises(DumpFormatError, match=REFUSED):
        parse_xml(text.encode(), "in.xml")


def test_cpudata_dump_with_an_entity_is_not_loaded() -> None:
    with pytest.raises(DumpFormatError, match=REFUSED):
        loads(DOCTYPES["internal-entity-in-attribute"], "evil.xml")


def test_billion_laughs_fails_fast_and_cleanly() -> None:
    # Ten levels of ten: 10**10 'lol's if expanded. libxml2's amplification
    # limit stops the parse (malformed) or our DOCTYPE check does (refused).
    levels = ['<!ENTITY l0 "lol">'] + [
        f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)
    ]
    text = f'<!DOCTYPE x [{"".join(levels)}]><x a="&l9;">&l9;</x>'
    with pytest.raises(DumpFormatError) as info:
        parse_xml(text, "lol.xml")
    assert len(str(info.value)) < 300


def test_plain_xml_is_accepted() -> None:
    root = parse_xml(
        "<?xml version='1.0' encoding='UTF-8'?>\n<!-- from virsh -->\n"
        "<cpudata arch='x86'><cpuid eax_in='0x7' eax='&#x31;&amp;'/></cpudata>",
        "ok.xml",
    )
    # Character and predefined references are not entities from a DTD.
    assert root.find("cpuid").get("eax") == "1&"  # type: ignore[union-attr]


def test_domain_whitespace_is_kept() -> None:
    root = parse_xml("<domain>\n  <name>x</name>\n</domain>", "d.xml")
    assert root.text == "\n  "


def test_malformed_names_source_and_line() -> None:
    with pytest.raises(DumpFormatError, match=r"^m\.xml:2: malformed XML"):
        parse_xml("<a>\n<b></a>", "m.xml")


def test_parse_file_refuses_doctype_and_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "x86_evil.xml"
    f.write_text(DOCTYPES["name-only"])
    with pytest.raises(DumpFormatError, match=f"^{f}: {REFUSED}"):
        parse_file(f)
    with pytest.raises(DumpFormatError, match="cannot read"):
        parse_file(tmp_path / "missing.xml")
