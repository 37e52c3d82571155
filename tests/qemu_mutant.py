"""A mutant VMM for tests: a QEMU wrapper that appends one property to the
probe guest's -cpu value, then runs the real binary."""

from __future__ import annotations

from pathlib import Path


def qemu_wrapper(tmp_path: Path, qemu_binary: str, prop: str) -> Path:
    """A QEMU that appends `prop` to the probe guest's -cpu value."""
    wrapper = tmp_path / "qemu-mutant"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0\n"
        'for a in "$@"; do\n'
        f'  if [ $next = 1 ]; then a="$a,{prop}"; next=0; fi\n'
        '  [ "$a" = "-cpu" ] && next=1; args+=("$a")\n'
        "done\n"
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    return wrapper
