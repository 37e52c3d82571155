"""The conformance report's at-a-glance lines name the feature-MSR checks
too: run on a cheap selection (raw KVM's microcode-revision check), the
line counts exactly what pytest's own JUnit XML says of those tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lxml import etree

from tests.conftest import REPO


def test_glance_counts_the_msr_checks(kvm: object, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    env = dict(os.environ, KVMCPUID_REPORTS=str(reports))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", "conformance/pytest.ini", f"--rootdir={REPO}",
         "-o", f"cache_dir={tmp_path / 'cache'}", "conformance/test_msrs.py", "-k",
         "test_ucode_rev_reaches_the_guest and kvm"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    junit = etree.parse(str(reports / "conformance.xml"))
    cases = [c for c in junit.iter("testcase") if "ucode_rev" in str(c.get("name"))]
    passed = sum(1 for c in cases if not len(c))  # no failure/error/skipped child
    assert passed >= 1
    md = (reports / "conformance.md").read_text()
    assert f"- microcode revision reaches the guest: {passed} pass" in md.splitlines()
