"""A job for the distributed tests, run by torchrun (or as one plain process).

    python -m torch.distributed.run --nproc-per-node=2 tests/distributed_job.py SCENARIO DIR

Every rank builds the same problem (a seeded MLP, perturbed checkpoints, data sizes the tiles
do not divide) and calls pathkernel collectively; results go to DIR.
"""
import json
import os
import signal
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

import pathkernel as pk  # noqa: E402
from models import mlp  # noqa: E402


def problem(symmetric: bool):
    torch.manual_seed(0)
    model = mlp(d_in=5, hidden=(12,), d_out=3).float()
    g = torch.Generator().manual_seed(1)
    ck = []
    w = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(3):
        w = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        ck.append((w, 0.1 * (t + 1)))
    X = torch.randn(203, 5, generator=g)
    Xq = None if symmetric else torch.randn(57, 5, generator=g)
    return model, ck, X, Xq


def init():
    if "RANK" in os.environ:
        from pathkernel.cli.distributed import init_process_group

        init_process_group("gloo")
        return torch.distributed.get_rank()
    return 0


def kill_after(journal: str, records: int):
    """SIGKILL this process once its journal holds ``records`` tiles (a crash mid-run)."""
    def watch():
        while True:
            try:
                with open(journal) as f:
                    n = sum(1 for line in f if line.startswith('{"tile"'))
            except OSError:
                n = 0
            if n >= records:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)
    threading.Thread(target=watch, daemon=True).start()


def main():
    scenario, out_dir = sys.argv[1], sys.argv[2]
    budget = {"ram": 450000, "ram-query": 110000}.get(scenario, 60000)
    rank = init()
    symmetric = "query" not in scenario
    model, ck, X, Xq = problem(symmetric)
    kw = dict(memory_budget=budget, progress=False, outputs="full" if "full" in scenario else "trace")
    if scenario.startswith("file"):
        out = os.path.join(out_dir, "k.npy")
        if "kill" in scenario and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
                and rank == int(os.environ.get("PK_KILL_RANK", "1")):
            own = out + ".journal" + ("" if rank == 0 else f".{rank}")
            kill_after(own, 2)
        if "crash" in scenario and rank == 1:
            kill_after(out + ".journal.1", 2)
        assert pk.path_kernel(model, ck, X, Xq, out=out, **kw) == out
    elif scenario.startswith("ram"):
        assert len(pk.plan(model, ck, X, Xq, **{k: v for k, v in kw.items()
                                               if k != "progress"}).tiles) > 2
        K = pk.path_kernel(model, ck, X, Xq, **kw)
        if rank == 0:
            np.save(os.path.join(out_dir, "k.npy"), K.numpy())
        else:
            assert K is None
    elif scenario == "rank0-only":
        if rank == 0:
            try:
                pk.path_kernel(model, ck, X, **kw)
            except RuntimeError as e:
                with open(os.path.join(out_dir, "error.txt"), "w") as f:
                    f.write(str(e))
        else:
            time.sleep(float(os.environ["PATHKERNEL_JOIN_TIMEOUT"]) + 5)
    elif scenario == "differ":
        if rank == 1:
            X = X + 1
        try:
            pk.path_kernel(model, ck, X, **kw)
        except ValueError as e:
            with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
                f.write(str(e))
    elif scenario == "tangent":
        K = pk.tangent_kernel(model, X[:40], X[40:71], outputs="full")
        if rank == 0:
            np.save(os.path.join(out_dir, "k.npy"), K.numpy())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"done{rank}.json"), "w") as f:
        json.dump({"rank": rank}, f)


if __name__ == "__main__":
    main()
