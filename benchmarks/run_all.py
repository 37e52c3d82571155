"""Run every benchmarks/bench_*.py in turn and print what each reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    wanted = set(argv)
    failed = 0
    for script in sorted(here.glob("bench_*.py")):
        if wanted and script.stem not in wanted:
            continue
        print(f"== {script.stem}", flush=True)
        module = f"benchmarks.{script.stem}"
        r = subprocess.run([sys.executable, "-m", module], cwd=here.parent, check=False)
        failed |= r.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
