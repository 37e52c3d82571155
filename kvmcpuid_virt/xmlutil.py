"""The one hardened lxml parser for XML from elsewhere (dumps and domain XML
come from other hosts): no entity expansion (no XXE, no billion laughs), no
network (no DTD or XInclude fetched), no huge trees (libxml2's default depth
and size limits). Use these functions rather than lxml's parsers directly."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from kvmcpuid_virt.errors import DumpFormatError

__all__ = ["parse_file", "parse_xml", "safe_parser"]


def safe_parser() -> etree.XMLParser:
    """A fresh hardened parser (lxml parsers are not shared across threads).

    remove_blank_text stays False: `libvirt-xml --patch` must reproduce a
    domain's whitespace outside <cpu> byte for byte."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_blank_text=False,
    )


def parse_xml(text: str | bytes, source: str) -> etree._Element:
    """Parse a document; malformed input raises DumpFormatError naming the
    source and line. Entity references (left unexpanded by the parser) are
    refused outright, so they can never be copied into our output."""
    data = text.encode() if isinstance(text, str) else text
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else None
        raise DumpFormatError(source, line, f"malformed XML: {exc.msg}") from None
    if root is None:
        raise DumpFormatError(source, None, "empty XML document")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise DumpFormatError(source, node.sourceline, "XML entity references are refused")
    return root


def parse_file(path: str | Path) -> etree._Element:
    """Parse an XML file (see parse_xml)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DumpFormatError(str(p), None, f"cannot read: {exc.strerror}") from None
    return parse_xml(data, str(p))
