"""Only the engine's worker runs torch on several threads (service/torch_threads.py): a torch
thread pool of any other live thread makes the worker's every op slower."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import require_testdata

SCRIPT = r"""
import glob, threading
import numpy as np, torch
from longscribe.service.engine import Engine
from longscribe.service.models import load_model
from longscribe.service.segment import SileroScorer

def threads():
    return len(glob.glob("/proc/self/task/*"))

torch.set_num_threads(2)
start = threads()
model = load_model()                      # on this (the main) thread
engine = Engine(model)                    # its backend built here too
scorer = SileroScorer()                   # the VAD, as a job's feeder runs it
scorer.score(np.zeros((64, 512), dtype=np.float32))
after_ours = threads()
engine.start()                            # warm-up on the worker: its pool is there
engine.stop()                             # the worker exits, its pool with it
assert torch.get_num_threads() == 2       # the caller's own count is unchanged
torch.randn(256, 256) @ torch.randn(256, 256)   # plain torch on this thread: a pool appears
print(start, after_ours, threads())
"""


def test_only_the_engine_worker_starts_a_torch_thread_pool() -> None:
    require_testdata()
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    start, after_ours, after_plain = map(int, out.stdout.split()[-3:])
    assert after_ours == start, (start, after_ours)
    # the check can tell: a multi-threaded op on this thread does start a pool
    assert after_plain > after_ours, (after_ours, after_plain)
