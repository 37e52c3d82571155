"""The options every command that asks several libvirt hosts shares
(docs/fleets.md): what to do with a host that cannot be asked, and how long
one may take. Stdlib only: it is imported while the parser is built."""

from __future__ import annotations

import argparse

__all__ = ["add_fleet_options"]


def add_fleet_options(p: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    """--skip-unreachable, and --connect-timeout unless the command times its
    hosts another way (verify's per-guest --timeout)."""
    p.add_argument("--skip-unreachable", action="store_true",
                   help="leave out a --connect host that cannot be asked, with a warning "
                   "(default: fail)")  # fmt: skip
    if timeout:
        p.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="a --connect host that has not answered by then has failed "
                       "(default: 60)")  # fmt: skip
