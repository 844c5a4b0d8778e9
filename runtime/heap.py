"""Giving freed heap memory back to the operating system.

glibc keeps memory freed by C code and by Python objects over 512 bytes (SQLite's
pages, paho's buffers, parsed manifests and payloads) in its heaps for reuse. After a
burst (loading a thousand manifests, a thousand devices reporting at once) the gateway
held ~7 MB it no longer used (scripts/bench/memory.py). ``malloc_trim(0)`` returns the
free pages; it costs well under a millisecond, so the gateway calls it every
:data:`TRIM_EVERY_S`. Where the C library has no ``malloc_trim`` (musl, macOS) it is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_EVERY_S = 10.0


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _find_trim()


def available() -> bool:
    """Whether this C library can give free heap back (glibc)."""
    return _TRIM is not None


def trim() -> bool:
    """Give free heap pages back to the OS; True if any were."""
    return bool(_TRIM(0)) if _TRIM is not None else False
