"""The caches (output memo, QEMU/cpu_map models, host control) are best
effort: a cache directory that cannot be written, or a cache entry that is
garbage, costs speed and never fails a command. And the output memo is keyed
on every file of the package, so no code change can serve a stale answer.

Root ignores chmod, so unwritable caches are made in ways that fail for
everyone: $XDG_CACHE_HOME below a regular file (mkdir fails), and a cache
entry that is a directory (the write itself fails)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcpuid_virt.cli import memo
from kvmcpuid_virt.probe import hostcontrol
from kvmcpuid_virt.toolfacts import learn as models
from kvmcpuid_virt.toolfacts.facts import FORMAT_VERSION
from tests.conftest import REPO


def _run_main(module: str, args: list[str], xdg: Path) -> subprocess.CompletedProcess[str]:
    """`module`'s main() (a console script's) with args, its cache under `xdg`."""
    return subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())",
         *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(xdg)},
    )  # fmt: skip


def _cli(args: list[str], xdg: Path) -> subprocess.CompletedProcess[str]:
    return _run_main("kvmcpuid_virt.cli", args, xdg)


def _qemu_flags(args: list[str], xdg: Path) -> subprocess.CompletedProcess[str]:
    return _run_main("kvmcpuid_virt.commands.qemu_flags", args, xdg)


@pytest.fixture
def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "x"


@pytest.fixture
def kvm_device() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")


# --- commands with an unwritable cache --------------------------------------------


@pytest.mark.kvm
@pytest.mark.usefixtures("kvm_device")
@pytest.mark.parametrize("model", ["host", "auto"])
def test_qemu_flags_with_cache_below_a_file(under_a_file: Path, model: str) -> None:
    r = _qemu_flags(["--model", model], under_a_file)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("-cpu ") and r.stdout.rstrip().endswith(",enforce")
    assert not r.stderr


@pytest.mark.kvm
@pytest.mark.usefixtures("kvm_device")
def test_qemu_flags_with_a_cache_entry_that_is_a_directory(tmp_path: Path) -> None:
    if not os.path.exists(os.path.join(models.CPU_MAP_DIR, "x86_features.xml")):
        pytest.skip("libvirt's cpu_map is not installed (--model auto reads it)")
    # The models cache is written (and fails) on every run; this failed the
    # command with "cannot write .../cpu_map.json: Is a directory".
    (tmp_path / "kvmcpuid_virt" / "cpu_map.json").mkdir(parents=True)
    r = _qemu_flags(["--model", "auto"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("-cpu ")


@pytest.mark.kvm
@pytest.mark.usefixtures("kvm_device")
def test_verify_kvm_with_cache_below_a_file(under_a_file: Path) -> None:
    r = _cli(["verify", "--backend", "kvm"], under_a_file)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("kvm: ")
    assert "Traceback" not in r.stderr


@pytest.mark.kvm
@pytest.mark.usefixtures("kvm_device")
def test_verify_kvm_with_a_host_control_entry_that_is_a_directory(tmp_path: Path) -> None:
    from kvmcpuid_virt.kvm import Kvm

    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    # The fingerprint masks APIC IDs, so this is the path verify computes.
    entry = hostcontrol._cache_path(hostcontrol.fingerprint(supported),
                                    tmp_path / "kvmcpuid_virt")  # fmt: skip
    entry.mkdir(parents=True)
    r = _cli(["verify", "--backend", "kvm"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("kvm: ")
    # Losing this cache costs a probe on every run: that is worth a warning.
    assert "cannot write cache" in r.stderr and str(entry) in r.stderr


# --- the caches themselves -----------------------------------------------------------


def test_memo_store_into_an_unwritable_entry_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    os.makedirs(memo._path("k"))  # the entry is a directory: the write fails
    memo.store("k", "out", "err")
    assert memo.load("k") is None


def test_memo_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    memo.store("k", "out", "err")
    assert memo.load("k") == ("out", "err")
    assert (tmp_path / "kvmcpuid_virt" / "memo" / "k").is_file()


def test_models_cache_nested_too_deeply_is_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "kvmcpuid_virt").mkdir()
    (tmp_path / "kvmcpuid_virt" / "cpu_map.json").write_text('{"a":' + "[" * 100_000)
    assert models._read_cache("cpu_map.json", "key") is None


def test_models_cache_round_trip_and_unwritable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, under_a_file: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    doc = {"version": FORMAT_VERSION, "key": "k", "models": []}
    models._write_cache("x.json", doc)
    assert models._read_cache("x.json", "k") == doc
    assert models._read_cache("x.json", "other key") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(under_a_file))
    models._write_cache("x.json", doc)  # no exception: best effort
    assert models._read_cache("x.json", "k") is None


# --- the memo key covers the whole package ------------------------------------------


def test_memo_key_covers_the_files_the_review_found_missing() -> None:
    files = {os.path.relpath(p, memo._PKG) for p, _, _ in memo._package_files(memo._PKG)}
    for rel in ("analysis/baseline.py", "host.py", "cli/memo.py", "cpuid/fields.py",
                "cpuid/data/features.json", "commands/qemu_flags.py"):  # fmt: skip
        assert rel in files
    assert not any("__pycache__" in f for f in files)


def test_memo_key_follows_any_py_or_json_in_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "policy").mkdir(parents=True)
    (pkg / "cpuid" / "data").mkdir(parents=True)
    (pkg / "policy" / "__pycache__").mkdir()
    (pkg / "policy" / "baseline.py").write_text("A = 1\n")
    (pkg / "cpuid" / "data" / "features.json").write_text("{}")
    monkeypatch.setattr(memo, "_PKG", str(pkg))

    def key() -> str:
        return memo.key("qemu-flags", ("host",), b"table")

    before = key()
    assert key() == before  # deterministic
    # Not code: compiled files and other suffixes leave the key alone.
    (pkg / "policy" / "__pycache__" / "baseline.cpython-311.pyc").write_bytes(b"x")
    (pkg / "policy" / "notes.txt").write_text("x")
    assert key() == before
    (pkg / "policy" / "baseline.py").write_text("A = 22\n")  # size changes
    after_py = key()
    assert after_py != before
    (pkg / "cpuid" / "data" / "features.json").write_text('{"a": 1}')
    after_json = key()
    assert after_json != after_py
    (pkg / "policy" / "new.py").write_text("")  # a new module
    assert key() != after_json
    # Same size, new mtime (an edit that keeps the length) changes it too.
    st = os.stat(pkg / "policy" / "new.py")
    current = key()
    os.utime(pkg / "policy" / "new.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert key() != current


def test_memo_key_is_the_same_in_another_process() -> None:
    # The key must be stable across runs, or the memo never hits.
    code = "from kvmcpuid_virt.cli import memo; print(memo.key('c', ('o',), b't'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout for _ in range(2)}  # fmt: skip
    assert len(runs) == 1 and len(runs.pop().strip()) == 40



def test_the_session_uses_a_fresh_cache_home(
    fresh_cache_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # tests/conftest.py: nothing a test (or a CLI it starts) caches may come
    # from an earlier run; the directory is this session's own.
    assert os.environ["XDG_CACHE_HOME"] == str(fresh_cache_home)
    assert fresh_cache_home.parent == tmp_path_factory.getbasetemp()


@pytest.mark.qemu
def test_libvirt_xml_memo_hit_is_the_fresh_output_and_follows_the_domain(
    tmp_path: Path, data_dir: Path
) -> None:
    """A memoized libvirt-xml (second run) prints exactly what the first run
    computed, stderr notes included; patching another domain is not a hit."""
    dump = str(data_dir / "x86_64-cpuid-EPYC-9334-32-Core.xml")
    xdg = tmp_path / "cache"
    first = _cli(["libvirt-xml", "--from", dump], xdg)
    assert first.returncode == 0, first.stderr
    assert any((xdg / "kvmcpuid_virt" / "memo").iterdir())
    second = _cli(["libvirt-xml", "--from", dump], xdg)
    assert (second.returncode, second.stdout, second.stderr) == (0, first.stdout, first.stderr)
    for name in ("a", "b"):
        (tmp_path / f"{name}.xml").write_text(
            f"<domain type='kvm'><name>{name}</name><memory>65536</memory></domain>\n")
    a = _cli(["libvirt-xml", "--from", dump, "--patch", str(tmp_path / "a.xml")], xdg)
    b = _cli(["libvirt-xml", "--from", dump, "--patch", str(tmp_path / "b.xml")], xdg)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert "<name>a</name>" in a.stdout and "<name>b</name>" in b.stdout
    assert a.stdout.replace("<name>a</name>", "") == b.stdout.replace("<name>b</name>", "")
