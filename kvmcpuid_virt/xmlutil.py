"""The one hardened lxml parser for XML from elsewhere (dumps and domain XML
come from other hosts): no DTD at all (a document with a DOCTYPE is refused,
so no entity is ever declared, expanded or copied: no XXE, no billion
laughs), no network (nothing fetched), no huge trees (libxml2's default depth
and size limits, and its entity amplification limit while the refused
document is parsed). Use these functions rather than lxml's parsers directly."""

from __future__ import annotations

from lxml import etree

from kvmcpuid_virt.errors import DumpFormatError

__all__ = ["parse_xml", "safe_parser"]


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
    source and line. A document with a DOCTYPE (an internal subset, or only a
    name or an external DTD's address) is refused with a DumpFormatError.

    Why all of the DTD, not only entity references: resolve_entities=False
    leaves references in text unexpanded, but libxml2 still expands internal
    entities inside attribute values (`eax_in="&a;"` read as leaf 7, and
    nested entities blew attribute sizes up). None of the formats read here
    (libvirt <cpudata>, domain XML, cpu_map) uses a DTD, and without one any
    entity reference other than the five predefined ones is a syntax error."""
    data = text.encode() if isinstance(text, str) else text
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else None
        raise DumpFormatError(source, line, f"malformed XML: {exc.msg}") from None
    if root is None:
        raise DumpFormatError(source, None, "empty XML document")
    docinfo = root.getroottree().docinfo
    # libxml2 2.14 gives `<!DOCTYPE x>` an (empty) internal subset; test both
    # so the check does not depend on that.
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise DumpFormatError(
            source, None, "XML with a DOCTYPE is refused (no DTDs, entity declarations or "
            "entity references)"
        )  # fmt: skip
    return root
