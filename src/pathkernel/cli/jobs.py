"""``pathkernel path-kernel`` and ``pathkernel describe``: the library from a job script.

    torchrun --nproc-per-node=K --max-restarts=3 -m pathkernel path-kernel \\
        --model pkg.module:factory --checkpoints 'ckpts/*.pt' --train train.npy --out K.npy

The model comes from a factory (``module:function`` returning an ``nn.Module``, put in eval
mode); checkpoints are saved state_dicts; inputs are ``.npy`` files (memory-mapped). Under
torchrun every rank joins the process group and computes its share; a restarted job resumes.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import sys

import numpy as np
import torch


def add_parsers(sub) -> None:
    p = sub.add_parser("path-kernel", help="a checkpoint path kernel into a .npy (torchrun-ready)")
    _model_args(p)
    p.add_argument(
        "--checkpoints",
        required=True,
        nargs="+",
        help="saved state_dicts: paths or glob patterns (natural order: ckpt_2 before ckpt_10)",
    )
    p.add_argument(
        "--weights",
        type=float,
        nargs="*",
        help="one weight (learning rate) per checkpoint, or one for all (default 1)",
    )
    p.add_argument(
        "--train",
        required=True,
        nargs="+",
        help=".npy of training inputs (columns); several: the model's positional inputs, or "
        "NAME=FILE.npy each for its keyword inputs (input_ids=ids.npy attention_mask=mask.npy)",
    )
    p.add_argument(
        "--query", nargs="+", help="query inputs (rows), as --train; default: train x train"
    )
    p.add_argument("--out", required=True, help="the .npy to write (resumed if it exists)")
    p.add_argument("--memory-budget", default="2GB", help="per rank, e.g. 8GB")
    p.add_argument(
        "--outputs",
        default="trace",
        help="trace, full, an output index, or with --targets a per-example loss: "
        + ", ".join(LOSSES),
    )
    p.add_argument(
        "--targets",
        help=".npy of the training examples' targets (loss-gradient kernels, TracInCP scores)",
    )
    p.add_argument("--query-targets", help=".npy of the query examples' targets")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--no-resume", action="store_true", help="start over even if --out exists")
    p.add_argument(
        "--no-spill",
        action="store_true",
        help="never keep features in a scratch file beside --out (recompute them instead)",
    )
    _projection_args(p)
    p.add_argument("--no-progress", action="store_true")
    d = sub.add_parser("describe", help="which rule and form each parameter of a model gets")
    _model_args(d)
    d.add_argument(
        "--input", required=True, nargs="+", help=".npy of a few example inputs (as --train)"
    )
    d.add_argument("--outputs", default="trace")
    _projection_args(d)


def _projection_args(p) -> None:
    p.add_argument(
        "--project",
        type=int,
        metavar="K",
        help="project each example's gradient to K random dims (approximate; large models)",
    )
    p.add_argument("--seed", type=int, default=0, help="the projection's seed")


class UsageError(ValueError):
    """A command-line argument that cannot be used (printed as one line, exit status 2)."""


def _model_args(p) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="module:function returning the nn.Module (e.g. mypkg.models:resnet)",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each rank: cuda:LOCAL_RANK)")


def load_model(spec: str, device: str) -> torch.nn.Module:
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise UsageError(f"--model: expected module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--model: cannot load {spec!r}: {e}") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model: {spec} returned {type(model).__name__}, not an nn.Module")
    return model.eval().to(device)


def natural_key(path: str):
    """``ckpt_2`` before ``ckpt_10``: digit runs compare as numbers."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def checkpoint_paths(patterns) -> list:
    """Each pattern's matches in natural order (patterns in the order given); a pattern that
    matches nothing is taken as a path."""
    return [
        p for pattern in patterns for p in sorted(glob.glob(pattern), key=natural_key) or [pattern]
    ]


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device: {name} asked for, but this torch sees no CUDA device "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} "
            "CUDA); use --device cpu"
        )
    if name == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:index], got {name!r}") from None
    return name


def _inputs(path: str, arg: str):
    """A memory-mapped array: blocks are read (and moved to the model's device) as needed."""
    if not os.path.isfile(path):
        raise UsageError(f"{arg}: no file {path!r}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"{arg}: {path!r} is not a .npy array ({e})") from None
    if not isinstance(a, np.ndarray):
        raise UsageError(f"{arg}: {path!r} holds several arrays (.npz); save one array per file")
    return a


def _input_set(values, arg: str):
    """One ``.npy`` (an array), several (a tuple: positional inputs), or ``NAME=FILE`` each (a
    dict: the model's keyword inputs)."""
    named = [v.partition("=") for v in values]
    keyed = [
        bool(n.isidentifier() and sep) and not os.path.isfile(v)
        for v, (n, sep, _) in zip(values, named)
    ]
    if any(keyed) and not all(keyed):
        raise UsageError(f"{arg}: give every input as NAME=FILE.npy, or none")
    if all(keyed):
        if len({n for n, _, _ in named}) < len(named):
            raise UsageError(f"{arg}: a name is given twice: {values}")
        return {n: _inputs(path, arg) for n, _, path in named}
    arrays = tuple(_inputs(v, arg) for v in values)
    return arrays[0] if len(arrays) == 1 else arrays


LOSSES = ("cross_entropy", "mse", "margin")  # pathkernel.losses by name


def _outputs(s: str):
    if s in LOSSES:
        from .. import losses

        return getattr(losses, s)
    return int(s) if s.lstrip("-").isdigit() else s


def _targets(args):
    """``targets=`` from ``--targets`` / ``--query-targets``."""
    if args.query_targets is not None and (args.targets is None or args.query is None):
        raise UsageError("--query-targets: needs --query and --targets")
    if args.targets is None:
        return None
    if args.outputs not in LOSSES:
        raise UsageError(f"--outputs: with --targets, expected one of {', '.join(LOSSES)}")
    if args.query is not None and args.query_targets is None:
        raise UsageError("--query-targets: with --query and --targets, the query's targets too")
    y = _inputs(args.targets, "--targets")
    return y if args.query is None else (y, _inputs(args.query_targets, "--query-targets"))


def run(args) -> int:
    from .. import describe, path_kernel

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(args.device)
    if args.cmd == "describe":
        model = load_model(args.model, device)
        dt = next(model.parameters()).dtype

        def tensor(a):  # describe reads its few examples whole
            t = torch.from_numpy(np.array(a))
            return (t.to(dt) if t.is_floating_point() else t).to(device)

        x = _input_set(args.input, "--input")
        if isinstance(x, dict):
            x = {k: tensor(a) for k, a in x.items()}
        else:
            x = tuple(map(tensor, x)) if isinstance(x, tuple) else tensor(x)
        print(
            describe(model, x, outputs=_outputs(args.outputs), project=args.project, seed=args.seed)
        )
        return 0
    if distributed:
        from .distributed import init_process_group

        init_process_group("nccl" if device.startswith("cuda") else "gloo")
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device).to(dtype)
    paths = checkpoint_paths(args.checkpoints)
    weights = args.weights or [1.0]
    if len(weights) == 1:
        weights = weights * len(paths)
    if len(weights) != len(paths):
        raise UsageError(
            f"--weights: expected 1 or {len(paths)} values (one per checkpoint), got {len(weights)}"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print("checkpoint -> weight:", file=sys.stderr)
        for path, w in zip(paths, weights):
            print(f"  {path} -> {w:g}", file=sys.stderr)
    targets = _targets(args)
    X = _input_set(args.train, "--train")
    Xq = None if args.query is None else _input_set(args.query, "--query")
    out = path_kernel(
        model,
        list(zip(paths, weights)),
        X,
        Xq,
        outputs=_outputs(args.outputs),
        targets=targets,
        out=args.out,
        memory_budget=args.memory_budget,
        dtype=dtype,
        resume=not args.no_resume,
        progress=not args.no_progress,
        spill=not args.no_spill,
        project=args.project,
        seed=args.seed,
    )
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    if rank == 0:
        print(out)
    if distributed:
        torch.distributed.destroy_process_group()
    return 0
