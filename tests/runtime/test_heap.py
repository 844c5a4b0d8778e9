"""The gateway gives freed heap back to the OS (gateway.heap): with glibc, as CI and the
supported hosts have, memory freed in the middle of the heap is returned by a trim."""

from __future__ import annotations

from pathlib import Path

from edgetwin.runtime import heap


def rss_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_heap_freed_in_the_middle_goes_back_to_the_os_on_a_trim() -> None:
    assert heap.available()  # glibc: Debian, the systemd unit's hosts, CI
    # 2 KB objects live on glibc's heap (over pymalloc's 512 bytes, under mmap's
    # threshold); keeping one in 64 and the last holds the heap's top, so free() alone
    # cannot shrink it: only a trim gives the free pages in between back.
    blocks = [bytes(2000) for _ in range(20_000)]  # ~40 MB
    kept = [*blocks[::64], blocks[-1]]
    del blocks
    before = rss_kb()
    assert heap.trim()
    after = rss_kb()
    assert before - after > 20_000, (before, after)
    assert len(kept) == 314
