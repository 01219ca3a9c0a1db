"""The process's host allocator, where a runtime must keep its resident memory bounded.

Used by exact tiling (vaeinfer.exact_tiling: many tile-sized buffers within a budget) and the
video runtime (vaeinfer.video_vae: one step after the other, memory constant in the clip's length).
"""

from __future__ import annotations


def bounded_malloc() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    large buffers come from the heap, whose freed holes are not given back: the resident set then
    grows with every run. A fixed threshold keeps every large buffer in its own mapping, returned
    on free. Process-wide, set once, on glibc only; results are unaffected."""
    global _SET
    if _SET:
        return
    _SET = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 256 << 10)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator keeps its own policy


def trim() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_SET = False
_M_MMAP_THRESHOLD = -3
