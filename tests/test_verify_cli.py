"""`kvmcpuid verify` end to end on this host's real KVM, QEMU and libvirtd.

The expectations come from outside the code under test: which features this
host's KVM supports is read from KVM_GET_SUPPORTED_CPUID in the test, and the
bit positions (CPUID.80000001H:ECX[0] LAHF-SAHF, ECX[5] ABM/LZCNT, ECX[6]
SSE4A, ECX[11] XOP, ECX[16] FMA4, ECX[21] TBM) are the ones the AMD APM and
Intel SDM give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from tests.conftest import REPO
from tests.qemu_mutant import qemu_wrapper

LAHF = (0x8000_0001, "ecx", 0)
# Features a host's KVM may lack, all in a word KVM_SET_CPUID2 controls on
# the hosts seen so far: abm (missing on this nested AMD host), then the
# AMD-only ones an Intel host's KVM never offers. libvirt spells them so too.
UNSUPPORTED_CANDIDATES = {
    "abm": (0x8000_0001, "ecx", 5),
    "sse4a": (0x8000_0001, "ecx", 6),
    "xop": (0x8000_0001, "ecx", 11),
    "fma4": (0x8000_0001, "ecx", 16),
    "tbm": (0x8000_0001, "ecx", 21),
}


def _verify(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "verify", *args],
        capture_output=True, text=True, cwd=REPO, input=stdin, timeout=120,
    )


def _supported_bit(kvm: Kvm, leaf: int, reg: str, bit: int) -> bool:
    return bool(kvm.supported_cpuid().get(leaf, 0, reg) >> bit & 1)  # type: ignore[arg-type]


def _guest_bit(doc: dict[str, object], name: str) -> list[dict[str, object]]:
    out = []
    for backend in doc["backends"]:  # type: ignore[attr-defined]
        cmp = backend["comparison"]
        if cmp:
            out += [m for m in cmp["mismatches"] if m["name"] == name]
    return out


def test_raw_kvm_full_configuration_passes(kvm: Kvm) -> None:
    r = _verify("--backend", "kvm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().startswith("kvm: ") and "0 mismatch" in r.stdout


def test_json_report_shape(kvm: Kvm) -> None:
    r = _verify("--backend", "kvm", "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and r.returncode == 0
    [backend] = doc["backends"]
    assert backend["backend"] == "kvm" and backend["comparison"]["bits_compared"] > 100


def test_qemu_flags_turning_lahf_off_show_off_in_guest(kvm: Kvm, qemu_binary: str) -> None:
    if not _supported_bit(kvm, *LAHF):
        pytest.skip("this host's KVM does not support lahf_lm")
    # The flags a user would have: what kvmcpuid-qemu-flags prints (plain
    # `-cpu host` aborts on some nested hosts, see adapters/qemu.py).
    flags = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "qemu-flags", "--disable", "lahf-lm"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout.strip()
    assert "lahf-lm=off" in flags
    r = _verify("--qemu-flags", flags, "--format", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert doc["backends"][0]["backend"] == "qemu"
    assert not _guest_bit(doc, "lahf-lm")


def test_qemu_flags_claiming_off_but_running_on_is_caught(kvm: Kvm, qemu_binary: str) -> None:
    # A wrong expectation must not pass: the config says lahf-lm off, while the
    # raw KVM backend (given the full table) sets it on.
    if not _supported_bit(kvm, *LAHF):
        pytest.skip("this host's KVM does not support lahf_lm")
    r = _verify("--backend", "kvm", "--disable", "lahf-lm", "--format", "json")
    assert r.returncode == 0  # raw KVM sets the config's table: off, and off is seen
    doc = json.loads(r.stdout)
    assert not _guest_bit(doc, "lahf-lm")


def test_libvirt_check_none_requiring_an_unsupported_feature_is_reported(
    kvm: Kvm, libvirt_conn_uri: str, tmp_path: Path
) -> None:
    # The example is abm, which this host's KVM lacks; elsewhere the
    # first candidate the host's KVM lacks stands in for it.
    name = next((n for n, pos in UNSUPPORTED_CANDIDATES.items()
                 if not _supported_bit(kvm, *pos)), None)
    if name is None:
        pytest.skip(f"this host's KVM supports all of {sorted(UNSUPPORTED_CANDIDATES)}")
    # qemu64 (not host-passthrough, which aborts on hosts whose KVM lists
    # arch-capabilities but refuses its MSR) plus the feature, without
    # libvirt's own check.
    cpu = (
        "<cpu mode='custom' match='exact' check='none'><model>qemu64</model>"
        f"<feature policy='require' name='{name}'/></cpu>"
    )
    path = tmp_path / "cpu.xml"
    path.write_text(cpu)
    r = _verify("--libvirt-xml", str(path), "--format", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    [m] = _guest_bit(doc, name)
    assert m["requested"] is True and m["guest"] is False and m["supported"] is False


def test_bad_input_is_one_line_error(tmp_path: Path) -> None:
    r = _verify("--qemu-flags", "host,evil=on\"", "--backend", "qemu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = _verify("--libvirt-xml", str(tmp_path / "missing.xml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True),
    ("qemu:///session", True),
    ("qemu+unix:///system?socket=/run/test/libvirt-sock", True),
    ("qemu://localhost/system", True),
    ("qemu+ssh://host.example/system", False),
    ("qemu+tcp://10.0.0.1/system", False),
    ("test:///default", False),
])
def test_libvirt_backend_uri_must_be_local(uri: str, local: bool) -> None:
    # The probe hands libvirtd the image and the serial file by local path.
    from kvmcpuid_virt.probe.libvirt import is_local

    assert is_local(uri) is local


def test_remote_connect_and_missing_qemu_are_usage_errors() -> None:
    r = _verify("--connect", "qemu+ssh://host.example/system")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "libvirtd on this machine" in r.stderr
    r = _verify("--backend", "qemu", "--qemu", "/nonexistent/qemu")
    assert r.returncode == 2 and "not an executable file" in r.stderr


def test_qemu_backend_runs_the_binary_it_is_given(
    kvm: Kvm, qemu_binary: str, tmp_path: Path
) -> None:
    # A wrapper that records its arguments, then runs the real QEMU: the
    # backend must start the guest through it.
    marker = tmp_path / "ran"
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexec {qemu_binary} "$@"\n')
    wrapper.chmod(0o755)
    r = _verify("--backend", "qemu", "--qemu", str(wrapper))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-cpu" in marker.read_text()


@pytest.mark.parametrize(("uri", "where"), [
    ("qemu:///system", "/var/log/libvirt/qemu/d.log"),
    ("qemu+unix:///system?socket=/run/x/sock", "/var/log/libvirt/qemu/d.log"),
    ("qemu:///session", "/xdg/libvirt/qemu/log/d.log"),
    ("qemu+ssh://host.example/system", None),
])
def test_domain_log_paths_are_libvirts(
    uri: str, where: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libvirt's documented log locations: LOCALSTATEDIR/log/libvirt/qemu for
    # the system daemon, $XDG_CACHE_HOME/libvirt/qemu/log for the session one.
    from kvmcpuid_virt.probe.libvirt import domain_log

    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    got = domain_log(uri, "d")
    assert (None if got is None else str(got)) == where


def test_a_bad_libvirt_xml_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cpu.xml"
    bad.write_text("<cpu mode='custom'><model>qemu64</model>"
                   "<feature policy='bogus' name='sse2'/></cpu>")  # fmt: skip
    r = _verify("--backend", "kvm", "--libvirt-xml", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{bad}: feature 'sse2': unknown policy 'bogus'" in r.stderr


def test_ctrl_c_during_verify_of_every_backend_leaves_nothing(
    kvm: Kvm, qemu_binary: str, libvirt_conn_uri: str
) -> None:
    # The libvirt guest runs in a thread beside the other backends; Ctrl-C
    # cancels it, and its domain and domain log are gone before exit 130.
    import signal
    import time

    import libvirt

    from kvmcpuid_virt.probe.libvirt import DOMAIN_PREFIX, domain_log

    def ours() -> tuple[list[str], list[Path]]:
        conn = libvirt.open(libvirt_conn_uri)
        try:
            doms = [d.name() for d in conn.listAllDomains() if d.name().startswith(DOMAIN_PREFIX)]
        finally:
            conn.close()
        log = domain_log(libvirt_conn_uri, DOMAIN_PREFIX)
        logs = [] if log is None else list(log.parent.glob(DOMAIN_PREFIX + "*.log"))
        return doms, logs

    before = ours()
    proc = subprocess.Popen([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--connect",
                             libvirt_conn_uri], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    # Interrupt once libvirt has the domain (while QEMU and raw KVM run too).
    deadline = time.monotonic() + 20
    while len(ours()[0]) == len(before[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(ours()[0]) > len(before[0]), "verify never started a libvirt domain"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err
    assert ours() == before


# -- exit statuses (docs/exit-codes.md) -------------------------------------

NO_DAEMON = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def test_help_lists_every_exit_status() -> None:
    from kvmcpuid_virt.commands import verify as command

    r = _verify("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for status, words in [
        (command.EXIT_OK, "every bit this host controls matches"),
        (command.EXIT_MISMATCH, "a bit differs, or a backend refused the configuration"),
        (command.EXIT_USAGE, "bad arguments or input"),
        (command.EXIT_COULD_NOT_RUN, "no mismatch, but a backend could not run the guest"),
        (command.EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
        (command.EXIT_TERMINATED, "terminated (SIGTERM)"),
    ]:
        assert f"{status} {words}" in text, (status, words)
    doc = (REPO / "docs" / "exit-codes.md").read_text()
    for status in (0, 1, 2, 3, 130, 143):
        assert f"| {status} |" in doc, status


def test_a_libvirtd_that_cannot_be_reached_is_could_not_run(kvm: Kvm, tmp_path: Path) -> None:
    """No daemon on the socket: the libvirt backend's machinery could not
    run the guest (3), not a mismatch (1) nor a usage error (2)."""
    r = _verify("--backend", "libvirt", "--connect", NO_DAEMON, "--no-host-control")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "libvirt: could not run the guest: cannot connect to libvirt" in r.stdout
    r = _verify("--backend", "libvirt", "--connect", NO_DAEMON, "--no-host-control",
                "--format", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 3 and doc["status"] == "could-not-run" and doc["exit_status"] == 3
    [backend] = doc["backends"]
    assert backend["could_not_run"] is True and backend["ok"] is False


def test_a_mismatch_or_refusal_outranks_a_backend_that_could_not_run() -> None:
    # A refusal (libvirt rejecting the domain) is an answer about the
    # configuration: 1, whatever another backend's machinery did.
    from kvmcpuid_virt.commands.verify import exit_status
    from kvmcpuid_virt.verify import BackendReport

    def report(error: str | None, machinery: bool) -> BackendReport:
        return BackendReport(Backend.LIBVIRT, None, 0.0, error=error, machinery=machinery)

    refused, broken = report("refused", False), report("unreachable", True)
    assert exit_status([broken]) == 3
    assert exit_status([refused, broken]) == exit_status([broken, refused]) == 1


def test_what_could_not_run_means() -> None:
    from kvmcpuid_virt.errors import (
        InputError,
        KvmIoctlError,
        KvmUnavailableError,
        ProbeError,
        ProbeTimeoutError,
        ToolError,
    )
    from kvmcpuid_virt.probe.libvirt import DomainRefusedError, LibvirtUnavailableError
    from kvmcpuid_virt.verify import could_not_run

    machinery = [LibvirtUnavailableError("cannot connect"), ProbeTimeoutError("no end"),
                 KvmUnavailableError("no /dev/kvm"), ToolError("QMP conversation failed"),
                 KvmIoctlError("KVM_CREATE_VM", 12, "KVM_CREATE_VM failed: ENOMEM")]
    answers = [DomainRefusedError("unknown CPU model"), ProbeError("QEMU exited with status 1"),
               KvmIoctlError("KVM_SET_CPUID2", 22, "KVM_SET_CPUID2 failed: EINVAL"),
               InputError("cannot run QEMU with -cpu")]
    assert [could_not_run(e) for e in machinery] == [True] * len(machinery)
    assert [could_not_run(e) for e in answers] == [False] * len(answers)


def test_simulated_daemon_refusing_until_retries_run_out_is_could_not_run(
    kvm: Kvm, libvirt_conn_uri: str, live_facts: ToolFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify() against the real daemon, whose createXML is made to refuse
    every domain with the cgroup BPF EAGAIN: the libvirt report says the
    guest could not run and why, the status is 3."""
    import kvmcpuid_virt.verify as engine
    from kvmcpuid_virt.commands.verify import exit_status
    from kvmcpuid_virt.config.build import build
    from kvmcpuid_virt.probe.retry import RetryPolicy
    from tests.simulated_libvirt import Refusals, SimulatedRefusingDaemon

    policy = RetryPolicy(attempts=3, base=0.01, cap=0.02)
    monkeypatch.setattr(engine, "LibvirtProbe", lambda uri: SimulatedRefusingDaemon(
        uri, Refusals(create=100), retry=policy))
    table = kvm.supported_cpuid()
    target = engine.target_for(build(table, facts=live_facts, source="/dev/kvm"), live_facts)
    [report] = engine.verify(target, [Backend.LIBVIRT], supported=table,
                             libvirt_uri=libvirt_conn_uri)
    assert report.could_not_run and report.comparison is None
    assert report.error is not None
    assert "cgroup-bpf-eagain after 3 attempt(s)" in report.error
    assert "Resource temporarily unavailable" in report.error
    assert exit_status([report]) == 3


def test_sigterm_during_verify_of_every_backend_leaves_nothing(
    kvm: Kvm, qemu_binary: str, libvirt_conn_uri: str
) -> None:
    # As Ctrl-C, with its own status: the libvirt guest's domain and log are
    # gone before exit 143.
    import signal
    import time

    import libvirt

    from kvmcpuid_virt.probe.libvirt import DOMAIN_PREFIX, domain_log

    def ours() -> tuple[list[str], list[Path]]:
        conn = libvirt.open(libvirt_conn_uri)
        try:
            doms = [d.name() for d in conn.listAllDomains() if d.name().startswith(DOMAIN_PREFIX)]
        finally:
            conn.close()
        log = domain_log(libvirt_conn_uri, DOMAIN_PREFIX)
        logs = [] if log is None else list(log.parent.glob(DOMAIN_PREFIX + "*.log"))
        return doms, logs

    before = ours()
    proc = subprocess.Popen([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--connect",
                             libvirt_conn_uri], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 20
    while len(ours()[0]) == len(before[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(ours()[0]) > len(before[0]), "verify never started a libvirt domain"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().endswith("terminated"), err
    assert ours() == before


# One -cpu property a VMM could add, per field class (identity, max leaf,
# brand, address size), and the field verify must name. host-phys-bits=off:
# with it on (as for -cpu host), QEMU ignores phys-bits.
MUTANTS = {
    "stepping=9": "stepping: configured ",
    "level=7": "max basic leaf: configured ",
    "model-id=Evil": "brand string: configured ",
    "host-phys-bits=off,phys-bits=36": "physical address bits: configured ",
}


@pytest.mark.parametrize("prop", sorted(MUTANTS))
def test_a_vmm_changing_one_field_fails_naming_it(
    kvm: Kvm, qemu_binary: str, tmp_path: Path, prop: str
) -> None:
    r = _verify("--backend", "qemu", "--qemu", str(qemu_wrapper(tmp_path, qemu_binary, prop)))
    assert r.returncode == 1, r.stdout + r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith(MUTANTS[prop])]
    assert line.endswith("(changed in the VMM)"), line
    if prop == "stepping=9":
        assert line.endswith("guest sees 9 (changed in the VMM)")
    if prop == "model-id=Evil":
        assert "guest sees 'Evil'" in line
    doc = json.loads(_verify("--backend", "qemu", "--qemu",
                             str(qemu_wrapper(tmp_path, qemu_binary, prop)),
                             "--format", "json").stdout)
    [cmp] = [b["comparison"] for b in doc["backends"]]
    assert any(m["text"] == line and m["layer"] == "vmm" for m in cmp["field_mismatches"])


def test_the_same_wrapper_without_a_mutation_passes(
    kvm: Kvm, qemu_binary: str, tmp_path: Path
) -> None:
    # The mutant tests' wrapper itself changes nothing: an empty property
    # would be refused, so `hypervisor=on` (already on) stands in.
    r = _verify("--backend", "qemu", "--qemu",
                str(qemu_wrapper(tmp_path, qemu_binary, "hypervisor=on")))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_backend_compares_fields_and_passes(kvm: Kvm, qemu_binary: str,
                                                  libvirt_conn_uri: str) -> None:
    r = _verify("--connect", libvirt_conn_uri, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [b["backend"] for b in doc["backends"]] == ["kvm", "qemu", "libvirt"]
    for b in doc["backends"]:
        cmp = b["comparison"]
        assert cmp["fields_compared"] > 10 and cmp["bits_compared"] > 1000, b["backend"]


def test_libvirt_host_guest_is_held_to_the_configuration(kvm: Kvm,
                                                          libvirt_conn_uri: str) -> None:
    """This host's full CPU under libvirt (host-passthrough, the host's
    caches): identity, max leaves, address sizes and cache leaves are held to
    the configuration; what stays not modelled is only what QEMU fills in
    itself with no setting to change it (docs/field-rules.md)."""
    r = _verify("--backend", "libvirt", "--connect", libvirt_conn_uri, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    [cmp] = [b["comparison"] for b in json.loads(r.stdout)["backends"]]
    unmodelled = {m["name"] for m in cmp["field_mismatches"] if not m["modelled"]}
    assert unmodelled <= {"MONITOR/MWAIT line sizes and extensions",
                          "brand ID and package type (AMD)",
                          "performance optimization identifiers (AMD)"}, unmodelled


def test_topology_is_verified_on_the_vmm_backends(kvm: Kvm, qemu_binary: str,
                                                  libvirt_conn_uri: str) -> None:
    r = _verify("--connect", libvirt_conn_uri, "--topology", "sockets=1,cores=2,threads=2",
                "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    by = {t["backend"]: t for t in doc["topology"]}
    for b in ("kvm", "qemu", "libvirt"):
        assert by[b]["ok"] and by[b]["vcpus_reported"] == 4 and by[b]["problems"] == [], by[b]


def test_a_vmm_booting_another_topology_fails_verify(kvm: Kvm, qemu_binary: str,
                                                     tmp_path: Path) -> None:
    wrapper = tmp_path / "qemu-smp-mutant"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0\n"
        'for a in "$@"; do\n'
        '  if [ $next = 1 ]; then a="4,sockets=2,cores=1,threads=2"; next=0; fi\n'
        '  [ "$a" = "-smp" ] && next=1; args+=("$a")\n'
        "done\n"
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    r = _verify("--backend", "qemu", "--qemu", str(wrapper), "--topology",
                "sockets=1,cores=2,threads=2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "qemu: topology sockets=1,cores=2,threads=2: " in r.stdout
    assert "logical processor count (1 EBX[23:16]): the topology needs at least 4, guest " \
           "sees 2" in r.stdout, r.stdout  # fmt: skip


def test_a_bad_topology_is_one_line(kvm: Kvm) -> None:
    r = _verify("--topology", "sockets=1,cores=2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "topology" in r.stderr, r.stderr


@pytest.mark.parametrize(("prop", "field"), [
    ("model-id=Evil", "brand string: configured 'AMD EPYC Processor', guest sees 'Evil'"),
    ("host-phys-bits=off,phys-bits=36", "physical address bits: configured 40, guest sees 36"),
])
def test_a_named_models_brand_and_address_size_are_held_to_qemus(
    kvm: Kvm, qemu_binary: str, tmp_path: Path, prop: str, field: str
) -> None:
    """A named model's brand string and physical address bits are what QEMU's
    own expansion of the model says (model-id, phys-bits or its default 40):
    a VMM changing either fails verify, naming the field."""
    ok = _verify("--backend", "qemu", "--model", "EPYC", "--allow-unsupported")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = _verify("--backend", "qemu", "--model", "EPYC", "--allow-unsupported", "--qemu",
                str(qemu_wrapper(tmp_path, qemu_binary, prop)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert any(line.startswith(field) for line in r.stdout.splitlines()), r.stdout


def test_sigterm_during_a_topology_guest_leaves_no_qemu(kvm: Kvm, qemu_binary: str,
                                                        tmp_path: Path) -> None:
    """SIGTERM while the multi-vCPU guest runs: exit 143, its QEMU gone. The
    wrapper boots one vCPU where four are configured, so the BSP waits (for
    its TSC bound) for APs that never come: the signal lands mid-guest."""
    import os
    import signal
    import time

    pidfile = tmp_path / "qemu.pid"
    wrapper = tmp_path / "qemu-slow-smp"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0; smp=0\n"
        'for a in "$@"; do\n'
        '  if [ $next = 1 ]; then a="1,sockets=1,cores=1,threads=1"; next=0; smp=1; fi\n'
        '  [ "$a" = "-smp" ] && next=1; args+=("$a")\n'
        "done\n"
        f'[ $smp = 1 ] && echo $$ > {pidfile}\n'
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--backend",
                             "qemu", "--qemu", str(wrapper), "--topology",
                             "sockets=1,cores=2,threads=2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pidfile.exists(), "the topology guest never started"
    time.sleep(0.3)
    pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:  # gone (a zombie not yet reaped by its new parent counts as gone)
        alive = False
    assert not alive, f"QEMU {pid} outlived verify"
