"""Wall and CPU time of weight matching for the 3 x 512 MLP of examples/alignment.py.

    python examples/alignment_speed.py 1     # one torch thread
    python examples/alignment_speed.py 2     # two threads (torch's default on 2 cores)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import alignment as ex  # noqa: E402

import mergelab.align as al  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.backends.mkldnn.enabled = False
x, y, _, _, _ = ex.load_data()
torch.manual_seed(7)
a, b = ex.train(ex.MLP(40, 512), x, y, 200, 0), ex.train(ex.MLP(40, 512), x, y, 200, 1)
spec = al.spec_for(a)
sa, sb = a.state_dict(), b.state_dict()
al.weight_matching(spec, sa, sb)  # warm-up
for _ in range(3):
    wall, cpu = time.perf_counter(), time.process_time()
    r = al.weight_matching(spec, sa, sb)
    print(f"{torch.get_num_threads()} thread(s): wall {time.perf_counter() - wall:.3f} s, "
          f"CPU {time.process_time() - cpu:.3f} s, {r.sweeps} sweeps, objective {r.objective[-1]:.2f}")
