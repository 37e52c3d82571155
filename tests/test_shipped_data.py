"""cpuid.shipped_text reads the registries' JSON through the package loader:
the same text importlib.resources gives, for both shipped files, and through
importlib.resources where the loader has no get_data."""

from __future__ import annotations

from importlib import resources

import pytest

import kvmcpuid_virt.cpuid as pkg
from kvmcpuid_virt.cpuid import shipped_text

NAMES = ("features.json", "msr_features.json")


@pytest.mark.parametrize("name", NAMES)
def test_the_same_text_as_importlib_resources(name: str) -> None:
    expected = resources.files("kvmcpuid_virt.cpuid").joinpath(f"data/{name}").read_text("utf-8")
    assert shipped_text(name) == expected and expected


@pytest.mark.parametrize("name", NAMES)
def test_a_loader_without_get_data(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pkg.__spec__.loader

    class Bare:  # a loader that offers its resources but no get_data
        def get_resource_reader(self, fullname: str) -> object:
            return real.get_resource_reader(fullname)  # type: ignore[union-attr]

    expected = shipped_text(name)
    monkeypatch.setattr(pkg.__spec__, "loader", Bare())
    assert shipped_text(name) == expected
