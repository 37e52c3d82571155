"""fsutil: atomic_write (whole files or nothing, never a device or a symlink
replaced), read_text, and the best-effort cache writer."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmcpuid_virt.errors import InputError, OutputError
from kvmcpuid_virt.fsutil import atomic_write, cache_dir, read_text, write_cache
from tests.conftest import REPO


def test_replaces_regular_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    out.write_text("old")
    atomic_write(str(out), "new")
    assert out.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_writes_into_a_fifo_instead_of_replacing_it(tmp_path: Path) -> None:
    # Stands in for /dev/null and /dev/stdout: a rename would turn the
    # special file into a regular one (it did, once, to this host's /dev/null).
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write(str(fifo), "through the pipe")
    reader.join(5)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_dev_null_stays_a_device() -> None:
    atomic_write(os.devnull, "discarded")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_missing_directory_is_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write(str(tmp_path / "no" / "f"), "x")


def test_symlink_is_followed_not_replaced(tmp_path: Path) -> None:
    # e.g. ~/.config/x.json -> dotfiles/x.json: the link must survive.
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(str(link), "new")
    assert link.is_symlink()
    assert target.read_text() == "new"


def test_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "secret"
    out.write_text("old")
    out.chmod(0o600)
    atomic_write(str(out), "new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text() == "new"


def test_new_file_gets_the_given_mode(tmp_path: Path) -> None:
    out = tmp_path / "new"
    atomic_write(str(out), "x", mode=0o640)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash after the rename but before the directory reaches the disk can
    # bring the old file back; record what fsync is called on, and when.
    out = tmp_path / "f"
    calls: list[tuple[bool, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append((stat.S_ISDIR(os.fstat(fd).st_mode), out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(str(out), "x")
    assert calls == [(False, False), (True, True)]  # the data, then the renamed entry


# --- read_text ------------------------------------------------------------------


def test_read_text_returns_text_and_source(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("héllo\n", encoding="utf-8")
    assert read_text(str(f)) == ("héllo\n", str(f))


def test_read_text_missing_file_is_one_line_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as info:
        read_text(str(missing))
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_read_text_non_utf8_is_input_error(tmp_path: Path) -> None:
    f = tmp_path / "latin1.xml"
    f.write_bytes("<cpu><model>Caf\u00e9</model></cpu>".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.xml: not UTF-8 text \(byte 0xe9 at offset 15\)"):
        read_text(str(f))


def test_read_text_stdin_is_named_and_read_as_bytes() -> None:
    # A subprocess: the real stdin, with its locale-dependent text layer.
    code = "from kvmcpuid_virt.fsutil import read_text; print(read_text('-'))"
    ok = subprocess.run([sys.executable, "-c", code], input=b"abc", capture_output=True,
                        env={**os.environ, "LC_ALL": "C"}, check=True)  # fmt: skip
    assert ok.stdout == b"('abc', '<stdin>')\n"
    bad = subprocess.run([sys.executable, "-c", code], input=b"\xff", capture_output=True)
    assert bad.returncode != 0
    assert b"InputError: <stdin>: not UTF-8 text" in bad.stderr


# --- cache_dir and write_cache -------------------------------------------------------


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / "kvmcpuid_virt")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # Unset, empty or relative: the XDG spec's default.
    for value in (None, "", "relative/dir"):
        if value is None:
            monkeypatch.delenv("XDG_CACHE_HOME")
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_dir() == str(tmp_path / "home" / ".cache" / "kvmcpuid_virt")


def test_write_cache_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.json"
    assert write_cache(str(path), "{}") is True
    assert path.read_text() == "{}"


@pytest.mark.parametrize("where", ["under-a-file", "entry-is-a-directory"])
def test_write_cache_failure_is_false_not_raised(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    # chmod cannot make a directory unwritable for root; these two fail for
    # everyone: mkdir below a regular file, and an entry that is a directory
    # (atomic_write would write into it, and raised OutputError before).
    (tmp_path / "file").write_text("")
    if where == "under-a-file":
        path = tmp_path / "file" / "x" / "c.json"
    else:
        path = tmp_path / "c.json"
        path.mkdir()
    with caplog.at_level(logging.DEBUG, logger="kvmcpuid_virt.fsutil"):
        assert write_cache(str(path), "{}") is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert str(path) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kvmcpuid_virt.fsutil"):
        assert write_cache(str(path), "{}", warn=True) is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


# --- the commands that read through read_text ------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip


@pytest.fixture
def latin1_domain(tmp_path: Path) -> Path:
    f = tmp_path / "domain.xml"
    f.write_bytes("<domain><description>Caf\u00e9</description><cpu/></domain>".encode("latin-1"))
    return f


@pytest.mark.kvm
def test_verify_libvirt_xml_latin1_is_one_line_error(latin1_domain: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine (verify reads the live table first)")
    # Was a UnicodeDecodeError traceback.
    r = _cli("verify", "--backend", "kvm", "--libvirt-xml", str(latin1_domain))
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"kvmcpuid: {latin1_domain}: not UTF-8 text (byte 0xe9 at offset 24)\n"


@pytest.mark.kvm
def test_verify_libvirt_xml_missing_file_names_it_first(tmp_path: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine (verify reads the live table first)")
    missing = tmp_path / "missing.xml"
    r = _cli("verify", "--backend", "kvm", "--libvirt-xml", str(missing))
    assert r.returncode == 2
    assert r.stderr == f"kvmcpuid: {missing}: cannot read: No such file or directory\n"


def test_libvirt_xml_patch_latin1_is_one_line_error(latin1_domain: Path) -> None:
    # The domain is read before /dev/kvm is opened, so this needs no KVM.
    r = _cli("libvirt-xml", "--patch", str(latin1_domain))
    assert r.returncode == 2
    assert r.stderr == f"kvmcpuid: {latin1_domain}: not UTF-8 text (byte 0xe9 at offset 24)\n"
