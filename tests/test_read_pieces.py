"""fsutil's capped reader reads a regular file at its size and anything else
in pieces: a FIFO whose writer pauses mid-file is still read whole, and the
16 MiB cap still holds for a device that never ends."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvmcpuid_virt.errors import DumpFormatError, InputError
from kvmcpuid_virt.fsutil import MAX_INPUT_BYTES, load_dump, read_text


def test_fifo_written_in_pieces_is_read_whole(tmp_path: Path) -> None:
    text = "x" * 70_000 + "\n" + "y" * 100 + "\n"  # more than one 64 KiB piece
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "w") as f:
            f.write(text[:100])
            f.flush()
            time.sleep(0.2)  # the reader sees a short read first
            f.write(text[100:])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        got, source = read_text(str(fifo))
    finally:
        t.join(5)
    assert got == text and source == str(fifo)


def test_regular_file_at_the_cap_is_read_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    at_cap = tmp_path / "at.txt"
    at_cap.write_bytes(b"a" * MAX_INPUT_BYTES)
    assert len(read_text(str(at_cap))[0]) == MAX_INPUT_BYTES
    over = tmp_path / "over.txt"
    over.write_bytes(b"a" * (MAX_INPUT_BYTES + 1))
    with pytest.raises(InputError, match="larger than 16 MiB"):
        read_text(str(over))


def test_endless_device_is_refused_at_the_cap() -> None:
    with pytest.raises(DumpFormatError, match="larger than 16 MiB"):
        load_dump("/dev/zero")
