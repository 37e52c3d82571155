"""Record this machine's ToolFacts (what its QEMU and libvirt cpu_map say) as
JSON, for tests of pure code that must run without QEMU or libvirt:

    .venv/bin/python scripts/record_toolfacts.py tests/data/toolfacts-qemu-7.2.json

The recording is QEMU's and cpu_map's own answers (an independent source),
not output of the code under test; re-record when QEMU or libvirt change.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvmcpuid_virt.fsutil import atomic_write
from kvmcpuid_virt.toolfacts.learn import learn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the JSON file to write (atomically)")
    args = parser.parse_args()
    facts = learn()
    if facts.qemu is None:
        sys.stderr.write(f"record_toolfacts: {facts.qemu_missing}\n")
        return 2
    doc = facts.to_json()
    # The binary's path is this machine's; the facts are what matter.
    doc["qemu"]["binary"] = "qemu-system-x86_64"
    atomic_write(args.output, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
