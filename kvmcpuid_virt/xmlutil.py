"""The one hardened lxml parser for XML from elsewhere (dumps and domain XML
come from other hosts): no entity expansion, no network, no huge trees."""

from __future__ import annotations

from lxml import etree

from kvmcpuid_virt.errors import DumpFormatError

__all__ = ["parse_xml", "safe_parser"]


def safe_parser() -> etree.XMLParser:
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
    source and line."""
    data = text.encode() if isinstance(text, str) else text
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else None
        raise DumpFormatError(source, line, f"malformed XML: {exc.msg}") from None
    if root is None:
        raise DumpFormatError(source, None, "empty XML document")
    return root
