"""compare() over the whole table: the FIELD_RULES fields, decoded and named.

The layouts the expectations use come from the manuals, not from the code:
Intel SDM Vol. 2A, CPUID: leaf 0 EBX, EDX, ECX hold the vendor string in that
order; leaf 1 EAX is stepping [3:0], model [7:4], family [11:8], type
[13:12], extended model [19:16], extended family [27:20]; 0x80000002-4 hold
the brand string, 16 bytes a leaf, EAX first, little-endian. AMD APM Vol. 3,
CPUID Fn8000_0008 EAX: physical address bits [7:0], linear [15:8]."""

from __future__ import annotations

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import FIELD_RULES, Layer, Rule, compare
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable


def _vendor(text: str) -> dict[str, int]:
    raw = text.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    return {"ebx": ebx, "edx": edx, "ecx": ecx}


def _brand(text: str) -> list[CpuidEntry]:
    raw = text.encode().ljust(48, b"\0")
    return [
        CpuidEntry(0x8000_0002 + i, **{r: int.from_bytes(raw[16 * i + 4 * j:16 * i + 4 * j + 4],
                                                          "little")
                                       for j, r in enumerate(("eax", "ebx", "ecx", "edx"))})
        for i in range(3)
    ]


def _table(*, vendor: str = "GenuineIntel", max_basic: int = 0xD, signature: int = 0x000A_0F11,
           phys: int = 48, brand: str = "Probe CPU", extra: dict[int, dict[str, int]] | None = None,
           ) -> CpuidTable:  # fmt: skip
    entries = [CpuidEntry(0, eax=max_basic, **_vendor(vendor)),
               CpuidEntry(1, eax=signature)]
    entries += [CpuidEntry(leaf, **(extra or {}).get(leaf, {})) for leaf in range(2, 0xE)
                if leaf != 4]  # fmt: skip
    entries += [CpuidEntry(0x8000_0000, eax=0x8000_0008), *_brand(brand),
                CpuidEntry(0x8000_0008, eax=0x3000 | phys)]
    return CpuidTable(entries)


def _cmp(requested: CpuidTable, guest: CpuidTable, **kw: object):  # type: ignore[no-untyped-def]
    return compare(requested, guest, backend=Backend.KVM, vmm=guest, **kw)  # type: ignore[arg-type]


def test_identical_tables_match_and_every_bit_is_counted() -> None:
    t = _table()
    cmp = _cmp(t, t)
    assert cmp.ok and not cmp.mismatches and not cmp.field_mismatches
    # Leaves 0..0xD without 4, 0x80000000, 0x80000002-4, 0x80000008: 18 leaves
    # of 128 bits, less the masked ones (leaf 1 EBX[31:16], OSXSAVE, HTT,
    # OSPKE, 0xB EAX/EBX/ECX/EDX, 0xD.0 EBX, 0x80000008 ECX[15:0]).
    masked = 16 + 1 + 1 + 1 + 4 * 32 + 32 + 16
    assert cmp.bits_compared == 18 * 128 - masked
    assert cmp.summary().startswith(
        f"kvm: {18 * 128 - masked} bits and {cmp.fields_compared} fields compared")
    assert cmp.fields_compared >= 12


def test_stepping_is_named_and_decoded() -> None:
    cmp = _cmp(_table(signature=0x000A_0F11), _table(signature=0x000A_0F19))
    [m] = cmp.field_mismatches
    assert (m.name, m.requested, m.guest, m.rule) == ("stepping", "1", "9", Rule.IDENTITY)
    assert not cmp.mismatches and not cmp.ok
    assert m.text() == "stepping: configured 1, guest sees 9 (changed in the VMM)"
    assert m.layer is Layer.VMM


def test_each_signature_part_is_its_own_field() -> None:
    # family 6 model 0x55 stepping 4 -> family 0xF + 0xA model 0x1 stepping 4
    cmp = _cmp(_table(signature=0x0005_0654), _table(signature=0x00A0_0F14))
    assert sorted(m.name for m in cmp.field_mismatches) == [
        "extended family", "extended model", "family", "model"]


def test_vendor_string_is_read_ebx_edx_ecx() -> None:
    cmp = _cmp(_table(vendor="GenuineIntel"), _table(vendor="AuthenticAMD"))
    [m] = cmp.field_mismatches
    assert (m.name, m.requested, m.guest) == ("vendor", "'GenuineIntel'", "'AuthenticAMD'")


def test_brand_string() -> None:
    cmp = _cmp(_table(brand="Probe CPU"), _table(brand="Evil"))
    [m] = cmp.field_mismatches
    assert (m.name, m.requested, m.guest) == ("brand string", "'Probe CPU'", "'Evil'")


def test_physical_address_bits() -> None:
    cmp = _cmp(_table(phys=48), _table(phys=36))
    [m] = cmp.field_mismatches
    assert m.text() == "physical address bits: configured 48, guest sees 36 (changed in the VMM)"


def test_a_cut_max_leaf_names_the_leaves_the_guest_no_longer_has() -> None:
    # The guest's leaves 8..0xD answer with other data: not compared, reported absent.
    guest = _table(max_basic=7, extra={8: {"eax": 0xDEAD}})
    cmp = _cmp(_table(max_basic=0xD), guest)
    names = [m.text() for m in cmp.field_mismatches]
    assert names == [
        "max basic leaf: configured 0xd, guest sees 0x7 (changed in the VMM)",
        "basic leaves 0x8..0xd: configured present, guest sees them absent in the guest "
        "(its max basic leaf is 0x7) (changed in the VMM)",
    ]
    assert not cmp.mismatches


def test_unnamed_bits_are_compared_raw_and_masked_ones_not() -> None:
    # CPUID.6:EAX[31] has no name in the registry; OSXSAVE (1:ECX[27]) follows CR4.
    cmp = _cmp(_table(), _table(extra={6: {"eax": 1 << 31}}))
    [m] = cmp.mismatches
    assert (m.leaf, m.reg, m.bit, m.name) == (6, "eax", 31, None)
    req = _table()
    entry = req.lookup(1)
    assert entry is not None
    guest = req.replace_entry(entry.replace(ecx=entry.ecx | 1 << 27, ebx=0x0301_0000))
    assert _cmp(req, guest).ok


def test_a_field_this_host_does_not_control_is_the_hosts() -> None:
    cmp = _cmp(_table(signature=0x000A_0F11), _table(signature=0x000A_0F19),
               uncontrolled={(1, 0, "eax"): 0xF})
    [m] = cmp.field_mismatches
    assert m.layer is Layer.HOST and not m.controlled and cmp.ok
    assert "1 on bits this host does not control" in cmp.summary()


def test_unmodelled_fields_are_reported_not_failing() -> None:
    cmp = _cmp(_table(brand="A"), _table(brand="B"), unmodelled={"brand string": "why"})
    [m] = cmp.field_mismatches
    assert not m.modelled and cmp.ok and "not model" in cmp.summary()
    assert "(not modelled) brand string" in cmp.table(include_host=True)


def test_without_a_vmm_view_the_host_control_probe_decides() -> None:
    # QEMU's view holds only feature words: a field outside them is the VMM's
    # when the host-control probe says KVM_SET_CPUID2 sets it, else unknown.
    req, guest = _table(signature=0x000A_0F11), _table(signature=0x000A_0F19)
    [known] = compare(req, guest, backend=Backend.QEMU, vmm=guest,
                      uncontrolled={}).field_mismatches
    [unknown] = compare(req, guest, backend=Backend.QEMU, vmm=guest).field_mismatches
    assert known.layer is Layer.VMM and unknown.layer is Layer.HOST


def test_every_rule_row_has_parts_and_masked_rows_a_reason() -> None:
    for f in FIELD_RULES:
        assert f.parts and all(mask for _, _, mask in f.parts), f.name
        assert (f.rule is Rule.MASKED) == bool(f.reason), f.name
