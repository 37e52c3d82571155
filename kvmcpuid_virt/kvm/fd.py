"""KvmFd: the base of every object that owns a KVM file descriptor, and the
one place where ioctl errno values become exceptions."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from types import TracebackType

from kvmcpuid_virt.errors import KvmIoctlError
from kvmcpuid_virt.kvm.abi import Ioctl

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any, Self

__all__ = ["IoctlFn", "KvmFd", "ioctl_error"]

# (fd, request, arg) -> int; fcntl.ioctl in production, a simulated kernel in
# the tests that exercise behaviours this machine's kernel does not have.
if TYPE_CHECKING:
    IoctlFn = Callable[[int, int, Any], int]
else:
    IoctlFn = Callable


def _real_ioctl(fd: int, request: int, arg: Any) -> int:
    result: int = fcntl.ioctl(fd, request, arg)
    return result


_HINTS = {
    errno.E2BIG: "the buffer is too small",
    errno.ENOMEM: "the buffer is larger than the kernel accepts",
    errno.ENOTTY: "the file is not a KVM device, or this kernel lacks the ioctl",
    errno.EINVAL: "the kernel rejected the arguments",
    errno.EFAULT: "the kernel could not access the buffer",
    errno.EPERM: "operation not permitted",
    errno.EACCES: "permission denied",
    errno.EBUSY: "the object is busy",
    errno.EEXIST: "the object already exists",
}


def ioctl_error(request: int, exc: OSError) -> KvmIoctlError:
    """The exception for a failed KVM ioctl, naming the ioctl and the errno."""
    code = exc.errno or 0
    name = Ioctl.name(request)
    hint = _HINTS.get(code, os.strerror(code) if code else str(exc))
    return KvmIoctlError(name, code, f"{name} failed: {errno.errorcode.get(code, code)} ({hint})")


class KvmFd:
    """Owns one file descriptor (O_CLOEXEC); a context manager that closes it."""

    # Class default so close() and __del__ work on a half-constructed object.
    _fd: int | None = None

    def __init__(self, fd: int, ioctl: IoctlFn | None = None) -> None:
        self._fd: int | None = fd
        self._ioctl_fn: IoctlFn = ioctl or _real_ioctl

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def ioctl(self, request: int, arg: Any = 0) -> int:
        try:
            return self._ioctl_fn(self.fd, request, arg)
        except OSError as exc:
            raise ioctl_error(request, exc) from None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close must not leak the fd; errors here have nowhere to go.
        with contextlib.suppress(OSError):
            self.close()
