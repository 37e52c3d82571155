"""atomic_write: whole files or nothing, and never a device replaced."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from kvmcpuid_virt.errors import OutputError
from kvmcpuid_virt.fsutil import atomic_write


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
