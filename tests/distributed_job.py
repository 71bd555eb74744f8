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


def targets_problem(model, ck, X, Xq):
    """The problem in float64, for loss-gradient kernels."""
    ck = [({k: v.double() for k, v in w.items()}, lr) for w, lr in ck]
    return model.double(), ck, X.double(), None if Xq is None else Xq.double()


def labels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(10 + seed))


def init():
    if "RANK" in os.environ:
        from pathkernel.cli.distributed import init_process_group

        init_process_group("gloo")
        return torch.distributed.get_rank()
    return 0


def _tiles(line: str) -> int:
    """How many tiles a journal line records (0 for the header or a torn line)."""
    try:
        return len(json.loads(line).get("tiles", []))
    except ValueError:
        return 0


def kill_after(journal: str, records: int):
    """SIGKILL this process once its journal holds ``records`` tiles (a crash mid-run)."""

    def watch():
        while True:
            try:
                with open(journal) as f:
                    n = sum(_tiles(line) for line in f)
            except OSError:
                n = 0
            if n >= records:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


def count_extractions(path: str):
    """Write to ``path`` how many examples' features the path kernel extracts (every
    checkpoint counted), once the process exits."""
    import atexit

    from pathkernel._drivers import path_kernel as driver

    count = [0]
    real = driver.features

    def counted(mplan, spec, state, x, *a, **k):
        count[0] += spec.split(x)[0][0].shape[0]
        return real(mplan, spec, state, x, *a, **k)

    driver.features = counted
    atexit.register(lambda: open(path, "w").write(str(count[0])))


def ddp_problem():
    torch.manual_seed(0)
    model = mlp(d_in=4, hidden=(7,), d_out=3)  # float64, tanh
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (30,), generator=g)
    Xq = torch.randn(6, 4, generator=g, dtype=torch.float64)
    # global batches; the last is uneven (3 examples on rank 0, 2 on rank 1)
    perm = torch.randperm(30, generator=g)
    batches = [perm[0:8], perm[8:16], perm[16:24], perm[24:29]]
    return model, X, Y, Xq, batches


def shards(batch, world, micro):
    """Rank r's examples of a global batch (and its micro-batches), in rank order."""
    per = [batch[r::world] for r in range(world)]
    return [[p[k::micro] for k in range(micro)] for p in per]


def optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.03, weight_decay=0.05)
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.01)


def record(scenario, out_dir, rank, world):
    """DDP recording on ``world`` ranks, or (world = 1) the single-process reference that
    weights each example as DDP does: 1 / (world * local batch * micro-batches)."""
    from torch import nn

    kind = "adamw" if "adamw" in scenario else "sgd"
    micro = 2 if "nosync" in scenario else 1
    model, X, Y, Xq, batches = ddp_problem()
    ce = nn.CrossEntropyLoss(reduction="none")
    distributed = torch.distributed.is_initialized()
    W = int(os.environ.get("PK_WORLD", "2"))
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
        if "powersgd" in scenario:
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

            net.register_comm_hook(ps.PowerSGDState(process_group=None), ps.powerSGD_hook)
        opt = optimizer(kind, net.parameters())
        try:
            rec = pk.PathRecorder(
                net, opt, nn.CrossEntropyLoss(), (X, Y), Xq, quadrature=6, kernel="batch"
            )
        except ValueError as e:
            with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
                f.write(str(e))
            return
        for batch in batches:
            parts = shards(batch, W, micro)[rank]
            idx = torch.cat(parts)
            with rec.step(idx):
                opt.zero_grad()
                for k, part in enumerate(parts):
                    ctx = net.no_sync() if k < len(parts) - 1 else _Null()
                    with ctx:
                        (nn.functional.cross_entropy(net(X[part]), Y[part]) / micro).backward()
                opt.step()
    else:
        opt = optimizer(kind, model.parameters())
        steps = []
        for batch in batches:
            parts = shards(batch, W, micro)
            idx = torch.cat([torch.cat(p) for p in parts])
            w = torch.cat(
                [
                    torch.full((len(q),), 1.0 / (W * len(q) * micro), dtype=torch.float64)
                    for p in parts
                    for q in p
                ]
            )
            steps.append((idx, w))
        holder = {}

        def loss(out, y):
            return (ce(out, y) * holder["w"]).sum()

        rec = pk.PathRecorder(model, opt, loss, (X, Y), Xq, quadrature=6, kernel="batch")
        for idx, w in steps:
            holder["w"] = w
            with rec.step(idx):
                opt.zero_grad()
                loss(model(X[idx]), Y[idx]).backward()
                opt.step()
    km = rec.kernel_machine()
    if rank == 0:
        np.savez(
            os.path.join(out_dir, "km.npz"),
            contributions=km.contributions.numpy(),
            bias=km.bias.numpy(),
            predict=km.predict().numpy(),
            path_kernel=km.path_kernel.numpy(),
            fT=km.model_output.numpy(),
        )
    else:
        assert km is None


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def finish():
    """Leave together, with every DDP reducer gone before its process group (a reducer
    destroyed after the group aborts the process at exit)."""
    import gc

    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main():
    scenario, out_dir = sys.argv[1], sys.argv[2]
    if scenario.startswith("ddp"):
        rank = init()
        record(scenario, out_dir, rank, 2)
        finish()
        return
    budget = {"ram": 450000, "ram-query": 110000}.get(scenario, 60000)
    rank = init()
    symmetric = "query" not in scenario
    model, ck, X, Xq = problem(symmetric)
    kw = dict(
        memory_budget=budget, progress=False, outputs="full" if "full" in scenario else "trace"
    )
    if "targets" in scenario:  # loss-gradient kernels in float64
        model, ck, X, Xq = targets_problem(model, ck, X, Xq)
        Y, Yq = labels(X.shape[0], 0), None if Xq is None else labels(Xq.shape[0], 1)
        kw.update(outputs=pk.losses.cross_entropy, dtype=torch.float64)
        kw["targets"] = Y if Xq is None else (Y, Yq)
    if "project" in scenario:  # projected features (fewer dims than either layer has)
        kw["project"] = 24
    if "spill" in scenario:  # costs under which the plan keeps features in a scratch file
        from pathkernel._drivers import tiling

        dear = tiling.Costs(1e-3, 1e-2, 1e-4, 1e11, 1e-3, 1e-9)
        tiling._nominal_costs = tiling._measure = lambda *a, **k: dear
    if "passes" in scenario:  # column blocks consumed in passes, whatever they cost
        from pathkernel._drivers import tiling

        cost = tiling._cost

        def passes_only(*a, **k):
            c = cost(*a, **k)
            c.est += 0.0 if c.passes else 1e9
            return c

        tiling._cost = passes_only
    if scenario.startswith("file"):
        out = os.path.join(out_dir, "k.npy")
        if "spill" in scenario:
            plan_kw = {k: v for k, v in kw.items() if k != "progress"}
            plan = pk.plan(model, ck, X, Xq, out=out, **plan_kw)
            with open(os.path.join(out_dir, f"spill{rank}.txt"), "w") as f:
                f.write(str(plan.spill_bytes))
            with open(os.path.join(out_dir, f"plan{rank}.txt"), "w") as f:
                f.write(str(plan))
            count_extractions(os.path.join(out_dir, f"extracted{rank}.txt"))
        if (
            "kill" in scenario
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and rank == int(os.environ.get("PK_KILL_RANK", "1"))
        ):
            own = out + ".journal" + ("" if rank == 0 else f".{rank}")
            kill_after(own, 2)
        if "crash" in scenario and rank == 1:
            kill_after(out + ".journal.1", 2)
        assert pk.path_kernel(model, ck, X, Xq, out=out, **kw) == out
    elif scenario.startswith("ram"):
        assert (
            len(pk.plan(model, ck, X, Xq, **{k: v for k, v in kw.items() if k != "progress"}).tiles)
            > 2
        )
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
    elif scenario == "tangent-targets":
        y = kw["targets"]
        K = pk.tangent_kernel(
            model, X[:40], X[40:71], outputs=kw["outputs"], targets=(y[:40], y[40:71])
        )
        if rank == 0:
            np.save(os.path.join(out_dir, "k.npy"), K.numpy())
    finish()
    with open(os.path.join(out_dir, f"done{rank}.json"), "w") as f:
        json.dump({"rank": rank}, f)


if __name__ == "__main__":
    main()
