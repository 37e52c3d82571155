"""CPUID data: tables of entries, the named-feature registry, field decoders and
file formats. Pure data, no device I/O."""

from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidEntry, CpuidTable, EntryFlag

__all__ = ["REGISTERS", "CpuidEntry", "CpuidTable", "EntryFlag", "shipped_text"]


def shipped_text(name: str) -> str:
    """The text of data/NAME shipped in this package (the registries' JSON),
    read through the package's own loader (PEP 302 get_data), which is what
    importlib.resources ends up calling for installed files, without its
    imports (zipfile, tempfile, ...: ~6 ms of every command's start-up)."""
    get_data = getattr(__spec__.loader, "get_data", None)
    if get_data is None:  # a loader without it: the general way
        from importlib import resources

        return resources.files(__name__).joinpath(f"data/{name}").read_text(encoding="utf-8")
    data: bytes = get_data(f"{__path__[0]}/data/{name}")
    return data.decode("utf-8")
