"""The one exception tree of kvmcpuid_virt, most generic first.

KvmcpuidError                  anything this package raises on purpose; the CLI
│                              prints its message on one line and exits non-zero
├── KvmError                   the /dev/kvm device or one of its ioctls
│   ├── KvmUnavailableError    no /dev/kvm (module not loaded, no VT-x/AMD-V)
│   ├── KvmPermissionError     /dev/kvm exists but may not be opened
│   ├── NotKvmDeviceError      the path is not a KVM device
│   ├── KvmApiVersionError     KVM_GET_API_VERSION is not 12
│   ├── KvmCapabilityError     a required KVM_CAP_* is missing
│   └── KvmIoctlError          an ioctl failed (carries errno and the ioctl name)
│       └── CpuidSizeError     nent negotiation gave up after bounded retries
├── InputError                 bad user input: a dump, an XML file, a name
│   ├── DumpFormatError        a dump that cannot be parsed (names file and line)
│   └── UnknownFeatureError    a feature name that is not in the registry
├── OutputError                an output file that cannot be written
├── PolicyError                a configuration that cannot be built
│   └── UnsupportedFeatureError  a requested feature the host cannot give
├── ToolError                  QEMU or libvirt misbehaved or is missing
└── ProbeError                 a guest did not produce a result
    └── ProbeTimeoutError      a guest did not finish in time
"""

from __future__ import annotations

__all__ = [
    "CpuidSizeError",
    "DumpFormatError",
    "InputError",
    "KvmApiVersionError",
    "KvmCapabilityError",
    "KvmError",
    "KvmIoctlError",
    "KvmPermissionError",
    "KvmUnavailableError",
    "KvmcpuidError",
    "NotKvmDeviceError",
    "OutputError",
    "PolicyError",
    "ProbeError",
    "ProbeTimeoutError",
    "ToolError",
    "UnknownFeatureError",
    "UnsupportedFeatureError",
]


class KvmcpuidError(Exception):
    """Base of every error raised on purpose; str() is a one-line message."""


class KvmError(KvmcpuidError):
    pass


class KvmUnavailableError(KvmError):
    pass


class KvmPermissionError(KvmError):
    pass


class NotKvmDeviceError(KvmError):
    pass


class KvmApiVersionError(KvmError):
    pass


class KvmCapabilityError(KvmError):
    pass


class KvmIoctlError(KvmError):
    def __init__(self, request: str, errno: int, message: str) -> None:
        super().__init__(message)
        self.request = request
        self.errno = errno


class CpuidSizeError(KvmIoctlError):
    pass


class InputError(KvmcpuidError):
    pass


class DumpFormatError(InputError):
    def __init__(self, source: str, line: int | None, message: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        # One line whoever prints it: libxml2's messages end in "\n" mid-text.
        super().__init__(" ".join(f"{where}: {message}".splitlines()))
        self.source = source
        self.line = line


class UnknownFeatureError(InputError):
    def __init__(self, name: str, suggestions: list[str] | tuple[str, ...] = ()) -> None:
        hint = ""
        if suggestions:
            hint = "; did you mean " + " or ".join(repr(s) for s in suggestions) + "?"
        super().__init__(f"unknown feature {name!r}{hint}")
        self.name = name
        self.suggestions = tuple(suggestions)


class OutputError(KvmcpuidError):
    pass


class PolicyError(KvmcpuidError):
    pass


class UnsupportedFeatureError(PolicyError):
    pass


class ToolError(KvmcpuidError):
    pass


class ProbeError(KvmcpuidError):
    pass


class ProbeTimeoutError(ProbeError):
    pass
