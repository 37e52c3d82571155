"""How the conformance suite is run: with any pytest arguments added to its
own options (what `tox -e conformance -- ARGS` does), its reports still land
in the report directory; and a guest its machinery could not run is an
ERROR counted as "could not run", never a CPUID failure.

Each test runs the suite in a subprocess on a cheap selection, with the
reports in a temporary directory ($KVMCPUID_REPORTS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO

CHEAP = "conformance/test_kvm_api.py::test_significant_index_flag_marks_indexed_leaves"
REPORTS = ("conformance.xml", "conformance.json", "conformance.md", "conformance.html")


def _suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The suite as tox runs it, with `args` added; its report directory."""
    reports = tmp_path / "reports"
    env = dict(os.environ, KVMCPUID_REPORTS=str(reports))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", "conformance/pytest.ini", f"--rootdir={REPO}",
         "-o", f"cache_dir={tmp_path / 'cache'}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    return r, reports


def _tests(reports: Path) -> dict[str, str]:
    doc = json.loads((reports / "conformance.json").read_text())
    return {t["nodeid"]: t["outcome"] for t in doc["tests"]}


def test_tox_passes_the_suite_directory_by_default_and_nothing_else() -> None:
    # The options are the suite's own (pytest.ini, conftest.py), not tox's.
    import configparser

    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    command = " ".join(tox["testenv:conformance"]["commands"].split())
    assert command == "pytest -c conformance/pytest.ini --rootdir={toxinidir} {posargs:conformance}"


@pytest.mark.parametrize("args", [
    ["-k", "test_significant_index_flag"],
    [CHEAP],
    ["-x", "-k", "test_significant_index_flag"],
    ["--lf", "-k", "test_significant_index_flag"],
], ids=["-k", "test-id", "-x", "--lf"])
def test_any_pytest_arguments_keep_the_suites_options_and_reports(
    tmp_path: Path, args: list[str]
) -> None:
    r, reports = _suite(tmp_path, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in REPORTS:
        assert (reports / name).is_file(), name
    assert list(_tests(reports)) == [CHEAP]
    junit = etree.parse(str(reports / "conformance.xml"))
    assert [c.get("name") for c in junit.iter("testcase")] == [CHEAP.split("::")[-1]]
    assert "slowest 5 durations" in r.stdout  # the suite's --durations=5


def test_a_report_directory_given_on_the_command_line_wins(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    r, reports = _suite(tmp_path, "-k", "test_significant_index_flag",
                        f"--conformance-report-dir={elsewhere}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(REPORTS)
    assert not reports.exists()


def test_guests_a_refusing_libvirtd_never_ran_are_errors_not_failures(
    tmp_path: Path, kvm: object, libvirt_conn_uri: str
) -> None:
    """The real daemon, made to refuse every domain with the cgroup BPF
    EAGAIN (tests/plugin_refusing_libvirtd.py): the libvirt tests are
    pytest ERRORs in setup with the cause, the report counts them as "could
    not run" and shows the retries; no test FAILs."""
    r, reports = _suite(tmp_path, "-p", "tests.plugin_refusing_libvirtd",
                        "-k", "test_full_config or test_model")
    assert r.returncode == 1, r.stdout + r.stderr
    outcomes = _tests(reports)
    libvirt = {k: v for k, v in outcomes.items() if "[libvirt-" in k or "[libvirt]" in k}
    assert libvirt and set(libvirt.values()) == {"could-not-run"}, libvirt
    assert "failed" not in outcomes.values() and "error" not in outcomes.values()
    assert "passed" in outcomes.values() or "xfailed" in outcomes.values()  # kvm, qemu ran
    doc = json.loads((reports / "conformance.json").read_text())
    reason = next(t["reason"] for t in doc["tests"] if t["outcome"] == "could-not-run")
    assert "cgroup-bpf-eagain after 2 attempt(s)" in reason
    assert "Resource temporarily unavailable" in reason
    retries = doc["extras"]["libvirt_retries"]
    reruns = doc["extras"]["batches"]["libvirt"]["reruns"]
    assert reruns and all("cgroup-bpf-eagain" in why for why in reruns.values())
    # Each guest: in the batch, then once more alone; two attempts each time.
    assert retries["guests"] == 2 * len(reruns)
    assert retries["gave_up"]["cgroup-bpf-eagain"] == retries["guests"]
    assert retries["attempts"] == 2 * retries["guests"]
    junit = etree.parse(str(reports / "conformance.xml"))
    for case in junit.iter("testcase"):
        if "[libvirt" in str(case.get("name")):
            assert case.find("error") is not None and case.find("failure") is None
    md = (reports / "conformance.md").read_text()
    assert "## Could not run (the suite's machinery, not the host)" in md
    assert "COULD NOT RUN" in md and "given up: cgroup-bpf-eagain" in md
    assert "ERROR conformance/test_backends.py::test_full_config[libvirt]" in r.stdout
