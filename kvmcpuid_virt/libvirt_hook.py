"""The libvirt hook: what libvirt runs as /etc/libvirt/hooks/qemu.d/kvmcpuid
(installed by hook_install) on every operation of every QEMU domain.

The installed file is a /bin/sh script: on any operation but `prepare begin`
(a start), `restore begin` and `migrate begin` (the incoming side) it exits
0 at once, without Python and without reading the domain XML. On those three
it runs `main()` here, which decides from the domain's `<cpu>` whether this
host can give it (analysis.compat), and then:
- enforce mode: refuses (exit 1, one line on stderr, which libvirt shows to
  whoever typed `virsh start`) what does not fit;
- warn mode: logs it and lets the domain go;
- on an error of the tool itself (no cache, unreadable XML, a bug): lets the
  domain go and logs why (fail-open), unless installed --fail-closed.
It writes nothing to stdout: for restore and migrate libvirt would take that
as a replacement domain XML. It never calls libvirt (the daemon is waiting
for it: deadlock) and never starts QEMU; a watchdog ends it after
WATCHDOG_SECONDS whatever happens, by the same fail-open/closed rule.

The verdict is memoized, so that a domain start costs about Python's start-up
(~10 ms here) and not the ~150 ms of lxml, the registry and the cached tool
facts: the key hashes everything the verdict depends on (the domain's
`<cpu>` and `<features>` and its type, KVM's table read live with the per-CPU
APIC ID fields masked, the kernel and boot, the QEMU binary, cpu_map, the
cached tool facts and host-control files, this package's files). On a miss
the verdict is computed from exactly the reduced document the key covers.

Stdlib-only at module level (and kvmcpuid_virt.stamps, the file stamps
cli/memo.py keys on too, itself stdlib-only), and only modules that cost
well under a millisecond (no re, json, enum, logging, struct, signal: each would cost a
few milliseconds of a 30 ms budget). That is why the KVM table is read here
with its own ioctl (kvm.system costs ~9 ms to import; tests/test_hook.py
checks the two agree) and the key is not cli.memo's (cli costs ~6 ms).
"""

from __future__ import annotations

import os
import sys

from kvmcpuid_virt.stamps import file_stamps, stamp

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Sequence
    from hashlib import sha256
else:
    import _signal  # signal itself imports enum (~4 ms)

    try:
        # The builtin SHA-256 (~0.1 ms); hashlib loads OpenSSL (~3 ms).
        from _sha256 import sha256
    except ImportError:  # other Python builds (3.12 renamed it _sha2)
        from hashlib import sha256

__all__ = [
    "CANARY_PREFIX",
    "CHECKED_OPS",
    "KVM_GET_SUPPORTED_CPUID",
    "MANIFEST_TAG",
    "WATCHDOG_SECONDS",
    "Decision",
    "judge",
    "main",
    "masked_kvm_table",
    "parse_manifest",
    "reduce_domain",
    "verdict_key",
]

# The operations checked, as libvirt names them in argv[2:4].
CHECKED_OPS = frozenset({("prepare", "begin"), ("restore", "begin"), ("migrate", "begin")})
_VERB = {"prepare": "start", "restore": "restore", "migrate": "migrate in"}
# A domain whose name starts with this is refused at `prepare begin` whatever
# its CPU, before QEMU starts: `kvmcpuid hook status` and `install` create
# one to prove libvirt runs the hook (no other side effect).
CANARY_PREFIX = "kvmcpuid-hook-canary-"
MANIFEST_TAG = "#kvmcpuid-hook: "
WATCHDOG_SECONDS = 10
_MAX_XML = 64 << 20  # a domain XML is a few KiB; never read without bound
_KEY_VERSION = "kvmcpuid-hook 1"

# _IOWR(KVMIO=0xAE, 0x05, struct kvm_cpuid2): kvm/abi.py's Ioctl; the
# struct is u32 nent, u32 padding, then nent 40-byte kvm_cpuid_entry2
# (function, index, flags, eax, ebx, ecx, edx, 3 x u32 padding).
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
_ENTRY_WORDS = 10
_MAX_NENT = 4096
# Per-CPU fields KVM answers for the CPU the calling thread runs on (leaf,
# register index in the entry, mask): not part of the key; compat ignores
# them (analysis.compare.GUEST_STATE_MASKS).
_PER_CPU = ((0x1, 4, 0xFF00_0000), (0xB, 6, 0xFFFF_FFFF), (0x1F, 6, 0xFFFF_FFFF),
            (0x8000_001E, 3, 0xFFFF_FFFF))  # fmt: skip


# --- the installed file's manifest ------------------------------------------------


def parse_manifest(text: str) -> dict[str, list[str]]:
    """The `#kvmcpuid-hook: KEY=VALUE` lines of an installed hook (every
    value of each key, in order); {} for a file that is not ours."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(MANIFEST_TAG):
            key, _, value = line[len(MANIFEST_TAG):].partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _one(manifest: dict[str, list[str]], key: str, default: str = "") -> str:
    values = manifest.get(key)
    return values[-1] if values else default


# --- the domain XML, reduced to what the verdict reads ----------------------------


class _Unreadable(Exception):
    pass


def _tag_end(text: str, start: int) -> int:
    """The index after the '>' closing the tag that starts at `start`,
    quoted attribute values skipped."""
    i = start + 1
    quote = ""
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == ">":
            return i + 1
        i += 1
    raise _Unreadable("unterminated tag")


def _skip(text: str, start: int, end: str) -> int:
    i = text.find(end, start)
    if i < 0:
        raise _Unreadable(f"unterminated {text[start:start + 9]!r}")
    return i + len(end)


def reduce_domain(xml: str) -> str:
    """The domain's root tag (without the `id` attribute libvirt gives a
    running domain, which changes at every start), its top-level <features>
    and <cpu> elements, and its end tag: everything analysis.compat reads of
    a domain, as a document of its own. A tag scan that skips comments,
    CDATA, processing instructions and quoted values; the hardened parser
    reads the result (a DOCTYPE, refused there, is kept for it to refuse)."""
    i = 0
    depth = 0
    root = ""
    kept: list[str] = []
    start_of: int | None = None
    n = len(xml)
    while True:
        i = xml.find("<", i)
        if i < 0 or i >= n:
            break
        if xml.startswith("<!--", i):
            i = _skip(xml, i + 4, "-->")
            continue
        if xml.startswith("<![CDATA[", i):
            i = _skip(xml, i + 9, "]]>")
            continue
        if xml.startswith("<?", i):
            i = _skip(xml, i + 2, "?>")
            continue
        if xml.startswith("<!", i):
            end = _tag_end(xml, i)
            kept.append(xml[i:end])  # a DOCTYPE: for the parser to refuse
            i = end
            continue
        end = _tag_end(xml, i)
        tag = xml[i:end]
        closing = tag.startswith("</")
        selfclose = tag.endswith("/>")
        name = tag[2 if closing else 1:].split(None, 1)[0].rstrip("/>") if len(tag) > 2 else ""
        if closing:
            depth -= 1
            if depth == 1 and start_of is not None:
                kept.append(xml[start_of:end])
                start_of = None
            elif depth == 0:
                return root + "".join(kept) + tag
        else:
            if depth == 0:
                root = _without_id(tag)
            elif depth == 1 and name in ("cpu", "features"):
                if selfclose:
                    kept.append(tag)
                else:
                    start_of = i
            if not selfclose:
                depth += 1
        i = end
    raise _Unreadable("no complete root element")


def _without_id(tag: str) -> str:
    """`tag` without its id='N' attribute (found outside quoted values)."""
    i = 0
    quote = ""
    while i < len(tag):
        c = tag[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif tag.startswith(" id=", i) or tag.startswith("\tid=", i) or tag.startswith(
                "\nid=", i):  # fmt: skip
            q = tag[i + 4:i + 5]
            close = tag.find(q, i + 5) if q in "\"'" else -1
            if close > 0:
                return tag[:i] + tag[close + 1:]
        i += 1
    return tag


# --- KVM's table and the key ----------------------------------------------------------


def masked_kvm_table(path: str = "/dev/kvm") -> bytes:
    """KVM_GET_SUPPORTED_CPUID's entries as bytes, per-CPU fields zeroed.
    E2BIG: grow and retry; ENOMEM (the 2010 API): retry at the nent the
    kernel wrote back; bounded."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        nent = 256
        for _ in range(8):
            buf = bytearray(8 + 4 * _ENTRY_WORDS * nent)
            buf[0:4] = nent.to_bytes(4, "little")
            try:
                fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf)
                break
            except OSError as exc:
                if exc.errno == 7 and nent < _MAX_NENT:  # E2BIG
                    nent *= 2
                elif exc.errno == 12:  # ENOMEM, nent adjusted
                    nent = min(int.from_bytes(buf[0:4], "little") or nent, _MAX_NENT)
                else:
                    raise
        else:
            raise OSError("KVM_GET_SUPPORTED_CPUID: no size accepted")
    finally:
        os.close(fd)
    count = int.from_bytes(buf[0:4], "little")
    words = memoryview(buf)[8:8 + 4 * _ENTRY_WORDS * count].cast("I").tolist()
    for e in range(0, len(words), _ENTRY_WORDS):
        for leaf, reg, mask in _PER_CPU:
            if words[e] == leaf:
                words[e + reg] &= ~mask & 0xFFFF_FFFF
    return repr(words).encode()


_PKG = os.path.dirname(os.path.abspath(__file__))
_CPU_MAP = "/usr/share/libvirt/cpu_map"


def verdict_key(domain: str, table: bytes, qemu: str, cache: str) -> str:
    """The memo key of a verdict: everything it is a function of. `cache`:
    the tool's cache directory (tool facts, host control)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    parts: list[object] = [
        _KEY_VERSION, sys.version_info[:2], os.uname().release, boot,
        stamp(os.path.realpath(qemu)) if qemu else None, stamp(_CPU_MAP),
        stamp(os.path.join(_CPU_MAP, "index.xml")),
        stamp(os.path.join(_CPU_MAP, "x86_features.xml")),
        [f for f in file_stamps(cache, (".json",), False)
         if os.path.basename(f[0]).startswith(("qemu-", "cpu_map", "hostcontrol-"))],
        file_stamps(_PKG, (".py", ".json"), True),
    ]  # fmt: skip
    h = sha256(repr(parts).encode())
    h.update(b"\0" + table + b"\0" + domain.encode())
    digest: str = h.hexdigest()
    return digest[:40]


# --- the verdict (slow path: only on a memo miss) -------------------------------------


class Decision:
    """What the hook decided: fits or not, the one-line reason naming what
    does not fit, and why the facts were incomplete (None: they were fresh)."""

    __slots__ = ("fits", "reason", "stale")

    def __init__(self, fits: bool, reason: str, stale: str | None = None) -> None:
        self.fits = fits
        self.reason = reason
        self.stale = stale

    def encode(self) -> str:
        return ("fits" if self.fits else "refuse") + "\t" + self.reason

    @classmethod
    def decode(cls, text: str) -> Decision | None:
        head, sep, reason = text.partition("\t")
        if not sep or head not in ("fits", "refuse") or "\n" in reason:
            return None
        return cls(head == "fits", reason)


def judge(domain: str, qemu: str | None, source: str = "<domain>") -> Decision:
    """compat's verdict on `domain` (reduce_domain's output) against this
    host: the live KVM table, the cached tool facts (never QEMU: stale facts
    judge without QEMU's part) and the cached host-control result."""
    from kvmcpuid_virt.analysis.compat import judge_text
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.hostview import host_of, live_table
    from kvmcpuid_virt.toolfacts.cached import cached_facts

    cached = cached_facts(qemu or None)
    host = host_of(Dump(live_table(), "supported", source="this host"), cached.facts,
                   this_host=True)  # fmt: skip
    verdict = judge_text(domain, source, host, cached.facts)
    return Decision(verdict.fits, verdict.missing(), cached.stale)


# --- acting on it -------------------------------------------------------------------


def _log(path: str, name: str, op: str, text: str) -> None:
    """One line appended to the hook's log (O_APPEND: lines from concurrent
    starts do not interleave); best effort, a log that cannot be written must
    not decide a domain start."""
    import time

    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    line = " ".join(f"{when} {name} {op}: {text}".split()) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


def _memo_path(cache: str, key: str) -> str:
    return os.path.join(cache, "hook-memo", key)


def _memo_load(cache: str, key: str) -> Decision | None:
    try:
        with open(_memo_path(cache, key), encoding="utf-8") as f:
            return Decision.decode(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def _memo_store(cache: str, key: str, verdict: Decision) -> None:
    from kvmcpuid_virt.fsutil import write_cache

    write_cache(_memo_path(cache, key), verdict.encode())


def _run(args: Sequence[str], manifest: dict[str, list[str]], log: str) -> int:
    name, op, sub = [*args, "", "", ""][:3]
    enforce = _one(manifest, "mode", "enforce") == "enforce"
    if (op, sub) not in CHECKED_OPS:
        return 0
    if op == "prepare" and name.startswith(CANARY_PREFIX):
        sys.stderr.write(f"kvmcpuid hook: active (mode {_one(manifest, 'mode', 'enforce')}, "
                         f"fail-{_one(manifest, 'fail', 'open')})\n")  # fmt: skip
        return 1
    raw = sys.stdin.buffer.read(_MAX_XML + 1)
    if len(raw) > _MAX_XML:
        raise _Unreadable(f"domain XML larger than {_MAX_XML} bytes")
    try:
        xml = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"domain XML is not UTF-8 ({exc.reason})") from None
    domain = reduce_domain(xml)
    qemu = _one(manifest, "qemu")
    qemu = "" if qemu == "-" else qemu  # none was found at install
    # Where the tool facts were learned, whatever HOME and PATH libvirt
    # passes (fsutil.cache_dir and toolfacts.learn.find_qemu read these).
    os.environ["XDG_CACHE_HOME"] = _one(manifest, "cache")
    if qemu:
        os.environ["KVMCPUID_QEMU"] = qemu
    cache = os.path.join(_one(manifest, "cache"), "kvmcpuid_virt")
    key = verdict_key(domain, masked_kvm_table(), qemu, cache)
    verdict = _memo_load(cache, key)
    if verdict is None:
        verdict = _judge_quietly(domain, qemu, name, op, log)
        if verdict.stale is None:
            _memo_store(cache, key, verdict)
        else:
            _log(log, name, op, f"warning: {verdict.stale}; judged without QEMU's facts. "
                 "Run `kvmcpuid hook install` again to refresh them")  # fmt: skip
    if verdict.fits:
        return 0
    what = f"this host cannot give {name}'s CPU: {verdict.reason}"
    if enforce:
        _log(log, name, op, f"refused: {what}")
        sys.stderr.write(f"kvmcpuid hook: refusing to {_VERB[op]} {name}: {what} "
                         f"(kvmcpuid compat DOMAIN.xml tells more)\n")  # fmt: skip
        return 1
    _log(log, name, op, f"warn mode, let go: {what}")
    return 0


def _judge_quietly(domain: str, qemu: str, name: str, op: str, log: str) -> Decision:
    """judge(), with whatever it writes (warnings on stderr) sent to the log
    and nothing to stdout: libvirt reads a restore's or migration's stdout
    as a new domain XML."""
    import contextlib
    import io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        verdict = judge(domain, qemu or None, f"domain {name}")
    for line in captured.getvalue().splitlines():
        if line.strip():
            _log(log, name, op, line)
    return verdict


def _fail(manifest: dict[str, list[str]], log: str, name: str, op: str, why: str) -> int:
    """The tool itself failed: fail-open (let the domain go, log why) unless
    installed --fail-closed."""
    if _one(manifest, "fail", "open") == "closed":
        _log(log, name, op, f"error, refused (fail-closed): {why}")
        sys.stderr.write(f"kvmcpuid hook: cannot check {name}'s CPU, refusing (installed "
                         f"--fail-closed): {why}\n")  # fmt: skip
        return 1
    _log(log, name, op, f"error, let go (fail-open): {why}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The installed script's entry: argv is [SCRIPT, DOMAIN, OPERATION,
    SUB-OPERATION, EXTRA] (SCRIPT: the installed file, whose manifest says
    the mode and where things are)."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = args[0] if args else ""
    name, op = [*args[1:3], "", ""][:2]
    manifest: dict[str, list[str]] = {}
    log = "/var/log/libvirt/kvmcpuid-hook.log"
    try:
        with open(script, encoding="utf-8") as f:
            manifest = parse_manifest(f.read())
        log = _one(manifest, "log", log)
        _watchdog(manifest, log, name, op)
        return _run(args[1:], manifest, log)
    except BaseException as exc:  # any failure of the tool is fail-open (or closed)
        if isinstance(exc, SystemExit):
            raise
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
        return _fail(manifest, log, name, op, f"{type(exc).__name__}: {exc}{where}")


def _watchdog(manifest: dict[str, list[str]], log: str, name: str, op: str) -> None:
    """End the process after WATCHDOG_SECONDS whatever it is doing: libvirt
    waits for the hook without a timeout, so a hang would hang the start."""

    def expire(_signum: int, _frame: object) -> None:
        status = _fail(manifest, log, name, op, f"no verdict within {WATCHDOG_SECONDS} s")
        sys.stderr.flush()
        os._exit(status)

    _signal.signal(_signal.SIGALRM, expire)
    _signal.alarm(WATCHDOG_SECONDS)
