"""What a memo key says of files: (path, mtime_ns, size) stamps, stdlib only
and cheap (os.scandir's entries know directories without a stat), for the
output memo (cli/memo.py) and the libvirt hook's verdict memo, both of which
run on budgeted start-up paths."""

from __future__ import annotations

import os

__all__ = ["file_stamps", "stamp"]


def stamp(path: str) -> tuple[str, int, int]:
    """(path, mtime_ns, size), or (path, -1, -1) for a path that cannot be
    stat()ed: a file that appears later still changes the key."""
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)


def file_stamps(top: str, suffixes: tuple[str, ...],
                recurse: bool = True) -> list[tuple[str, int, int]]:  # fmt: skip
    """The stamps of every file under `top` whose name ends with one of
    `suffixes` (below subdirectories too with `recurse`, __pycache__ left
    out), sorted: scandir's order is the filesystem's, not stable."""
    found: list[tuple[str, int, int]] = []
    stack = [top]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                if entry.name.endswith(suffixes):
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    found.append((entry.path, st.st_mtime_ns, st.st_size))
                elif (recurse and entry.name != "__pycache__"
                      and entry.is_dir(follow_symlinks=False)):  # fmt: skip
                    stack.append(entry.path)
    found.sort()
    return found
