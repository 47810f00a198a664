"""The heap policy of a training task: glibc's mmap threshold stays fixed, so freed buffers go back."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="the heap policy is glibc's mallopt: Linux only",
)

# In a fresh interpreter: optionally apply the policy, free one 4 MiB block (glibc's dynamic
# threshold then rises to 4 MiB), allocate 1 MiB, and report whether it got its own mapping.
PROBE = """
import ctypes, json, sys
from ml.training.resources import limit_heap_retention

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
policy = limit_heap_retention() if sys.argv[1] == "policy" else None
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"policy": policy, "mapped_blocks": mapped}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, env={**clean_env, **env},
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_batch_sized_buffer_no_longer_raises_the_threshold_into_the_heap():
    default = _probe("default")
    fixed = _probe("policy")
    # glibc's default: after a 4 MiB block is freed, 1 MiB comes from the heap (kept on free).
    assert default["mapped_blocks"] == 0, default
    # With the policy, the same 1 MiB is its own mapping, returned to the kernel on free.
    assert fixed["mapped_blocks"] == 1, fixed
    assert "128 KiB" in fixed["policy"]


def test_a_threshold_the_user_set_in_the_environment_is_left_as_set():
    result = _probe("policy", MALLOC_MMAP_THRESHOLD_="8388608")
    assert "from the environment" in result["policy"], result
    # glibc applied the user's 8 MiB: 1 MiB comes from the heap, not a mapping.
    assert result["mapped_blocks"] == 0, result
