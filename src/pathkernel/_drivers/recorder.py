"""``PathRecorder``: record a real training loop and build its exact kernel machine.

For each step the train side (per-example gradients of the batch loss at ``w_t``) comes from
the user's own forward/backward through hooks; the query side (per-example Jacobians) is
evaluated at quadrature nodes on the segment ``w_t -> w_{t+1}`` with ``functional_call``,
leaving the model and the optimizer untouched. Every step is checked: the update the recorded
gradients explain must be the update the optimizer made.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .. import _backend
from .._autograd import with_autograd
from .._backend import Term
from .._capture.blocks import concat_blocks, dot_params, per_example_grads, summed_grads, to_terms
from .._capture.extract import CHUNK, block_from_recorded, features
from .._capture.outputs import OutputsArg, OutputSpec, output_tensor, with_output_tensor
from .._capture.plan import ModelPlan, cast_inputs, check_model, model_state
from .._capture.probe import probe
from .._capture.recording import StepRecording
from .._checks import (
    as_inputs,
    check_finite_block,
    check_inputs_match,
    check_same_features,
    check_same_keys,
    input_keys,
    resolve_dtype,
    run_model_once,
)
from .ddp import DataParallel
from .machine import KernelMachine
from .optim import OptimizerModel
from .optim import quadrature as quadrature_rule

KERNELS = (None, "batch", "full")


class StepMismatchError(RuntimeError):
    """The optimizer's update is not the one the recorded per-example gradients explain."""


class PathRecorder:
    """Records a training run and yields its kernel machine.

    Use ``with rec.step(idx):`` around each optimizer step of your own loop, where ``idx``
    are the indices of the step's training examples in ``train``; then ``rec.kernel_machine()``.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: ``torch.optim.SGD`` (any lr schedule, momentum, dampening, nesterov,
            weight decay), ``Adam`` or ``AdamW``, holding all of the model's trainable parameters.
        loss_fn: ``loss_fn(model(X[idx]), Y[idx])`` is the loss your loop backpropagates.
        train: ``(X, Y)``, the training set (X: a tensor, a tuple or a dict of tensors, batch
            first; a dict's are the model's keyword arguments).
        query: inputs at which to explain the model (default: the training inputs).
        quadrature: Gauss-Legendre nodes per step (exact), ``"left"`` (Domingos' left
            endpoint approximation) or ``"trapezoid"``.
        kernel: ``None``, ``"batch"`` (path kernel over the pairs whose training example is in
            the step's batch) or ``"full"`` (every training example at every step).
        outputs: output mode of the path kernel (as in ``tangent_kernel``).
        dtype: precision of the query-side features (default: the model's). Accumulators are
            float64.
        out: a folder: the ``[M, N, C]`` contributions (and the path kernel) are kept in
            ``contributions.npy`` / ``path_kernel.npy`` there (numpy memmaps, readable with
            ``np.load(..., mmap_mode="r")``) instead of RAM; the kernel machine shares them.
    """

    @with_autograd
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn,
        train,
        query=None,
        *,
        quadrature=4,
        kernel: Optional[str] = None,
        outputs: OutputsArg = "trace",
        dtype: Optional[torch.dtype] = None,
        out=None,
    ):
        check_model(model)
        self.dp = DataParallel(model)  # a DDP model: this rank's shard of every step
        model = self.dp.module
        self.share = 1.0 / self.dp.world  # DDP averages the ranks' gradients
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn: expected a callable loss(output, target), got {type(loss_fn).__name__}"
            )
        if not isinstance(train, (tuple, list)) or len(train) != 2:
            raise TypeError("train: expected a pair (X, Y)")
        keys = input_keys(train[0], "train")
        self.X = as_inputs(train[0], "train")
        self.Y = train[1]
        if (
            not isinstance(self.Y, torch.Tensor)
            or self.Y.dim() == 0
            or self.Y.shape[0] != self.X[0].shape[0]
        ):
            raise ValueError(
                f"train: expected Y with {self.X[0].shape[0]} rows like X, got "
                f"{tuple(self.Y.shape) if isinstance(self.Y, torch.Tensor) else type(self.Y).__name__}"  # noqa: E501
            )
        check_inputs_match(model, self.X, "train")
        if query is None:
            self.Xq = self.X
        else:
            check_same_keys(keys, input_keys(query, "query"), "train", "query")
            self.Xq = as_inputs(query, "query")
            check_inputs_match(model, self.Xq, "query")
            check_same_features(self.X, self.Xq, "train", "query")
        self.nodes, self.weights = quadrature_rule(quadrature)
        self.quadrature = quadrature
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected None, 'batch' or 'full', got {kernel!r}")
        self.kernel = kernel
        self.spec = OutputSpec(outputs)
        self.full = OutputSpec("full")
        self.dtype = resolve_dtype(dtype, model)
        run_model_once(model, self.X, "train", keys)
        if query is not None:
            run_model_once(model, self.Xq, "query", keys)
        self.model = model
        self.plan = ModelPlan(model, "auto", keys)
        probe(self.plan, self.X, dtype=self.dtype)
        probe(self.plan, self.Xq, dtype=self.dtype)
        self.trace = self.plan.trace_for(self.X)
        self.opt = OptimizerModel(optimizer, {id(p): n for n, p in self.plan.params.items()})
        self.loss_fn = loss_fn

        self.N, self.M = self.X[0].shape[0], self.Xq[0].shape[0]
        self.f0 = self._query_outputs()
        self.C = self.f0.shape[1]
        self.out = out
        self.contributions = self._accumulator("contributions", (self.M, self.N, self.C))
        self.bias = self.f0.clone()
        self.path_kernel = None
        if kernel is not None:
            shape = (self.M, self.N, self.C, self.C) if self.spec.full else (self.M, self.N)
            self.path_kernel = self._accumulator("path_kernel", shape)
        # momentum / Adam(W) carry each example's share of the update from step to step
        self.stateful = not self.opt.sgd_plain
        if self.stateful:
            self._check_dense_memory()
            names = list(
                self.plan.unflatten(
                    torch.zeros(sum(self.plan.group_size(k) for k in self.plan.group_keys()))
                )
            )
            self.U = {
                n: torch.zeros(self.N, self.plan.params[n].numel(), dtype=torch.float64)
                for n in names
            }
            self.U_rest = {
                n: v.reshape(-1) if self.dp.lead else torch.zeros_like(v.reshape(-1))
                for n, v in self.opt.init_state(names).items()
            }
        self.steps = 0
        self.step_errors = []
        self.broken: Optional[str] = None  # why recording stopped (the steps before it stand)
        self.w_last = self._weights()  # the weights the last recorded step left

    def _check_dense_memory(self) -> None:
        """Momentum and Adam(W) keep every example's share of the first moment ([N, P] float64,
        and a step's shares as much again): refuse up front what cannot fit."""
        P = sum(p.numel() for p in self.plan.params.values())
        need = 2 * self.N * P * 8
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        if need > ram // 2:
            raise ValueError(
                f"optimizer: {self.opt.kind} with momentum or moments needs per-example shares of "
                f"the update, 2 x N x P float64 = {need / 2**30:.1f} GiB for N={self.N}, P={P}, "
                f"more than half this machine's memory ({ram / 2**30:.1f} GiB); record plain SGD "
                "(factored, no such buffer), fewer training examples, or a smaller model"
            )

    def _accumulator(self, name: str, shape) -> torch.Tensor:
        """A float64 zero tensor in RAM, or backed by ``<out>/<name>.npy``."""
        if self.out is None:
            return torch.zeros(shape, dtype=torch.float64)
        import numpy as np

        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(os.fspath(self.out), f"{name}.npy")
        return torch.from_numpy(
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)
        )

    # ---- the user's loop ----------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, idx):
        """Wrap one optimizer step: forward, backward and ``optimizer.step()`` on ``train[idx]``."""
        if self.broken:
            raise RuntimeError(
                f"PathRecorder: recording stopped at step {self.steps} ({self.broken}); "
                "kernel_machine() explains the steps before it"
            )
        idx = self._check_idx(idx)
        self.dp.check_hooks()
        moved = self._moved_since_last_step()
        if moved:
            self.broken = (
                f"the weights changed between recorded steps ({moved}): an optimizer step or "
                "another change outside a `with rec.step(idx):` block"
            )
            raise StepMismatchError(f"step {self.steps}: {self.broken}")
        w_t = self.w_last
        had = {n: self.opt.has_buffer(n) for n in w_t} if self.stateful else {}
        cap = StepRecording(self.plan, self.trace)
        steps = []

        def before_step(opt, args, kwargs):  # must return None: a value would replace the args
            steps.append(1)
            self.opt.snapshot()

        hook = self.opt.opt.register_step_pre_hook(before_step)
        try:
            with cap:
                yield
        except BaseException:
            if any(not torch.equal(p.detach(), w_t[n]) for n, p in self.plan.params.items()):
                self.broken = f"step {self.steps} raised after changing the weights"
            raise
        finally:
            hook.remove()
        try:
            if len(steps) != 1:
                self._fail(f"expected one optimizer.step() inside the block, saw {len(steps)}")
            self._record(idx, w_t, had, cap)
        except (StepMismatchError, ValueError) as e:
            self.broken = str(e)
            raise
        self.w_last = self._weights()

    def _weights(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.plan.params.items()}

    def _moved_since_last_step(self) -> str:
        """The parameters whose values differ from those the last recorded step left."""
        moved = [
            n for n, p in self.plan.params.items() if not torch.equal(p.detach(), self.w_last[n])
        ]
        if not moved:
            return ""
        return ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")

    def _check_idx(self, idx) -> torch.Tensor:
        t = torch.as_tensor(idx)
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(
                f"idx: expected a non-empty 1-d sequence of integer indices, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
        t = t.long()
        if (t < 0).any() or (t >= self.N).any():
            raise ValueError(
                f"idx: indices must lie in [0, {self.N}), got min {int(t.min())}, "
                f"max {int(t.max())}"
            )
        if t.unique().numel() != t.numel():
            raise ValueError(
                "idx: contains repeated indices; each example may appear once per step"
            )
        return t

    def _fail(self, msg: str):
        raise StepMismatchError(f"step {self.steps}: {msg}")

    def _record(self, idx, w_t, had, cap: StepRecording) -> None:
        """Check the step, then add its contributions (and path kernel) to the accumulators."""
        xb = tuple(x[idx] for x in self.X)
        parts = self._verified_forwards(idx, xb, cap)
        state_t = self._state(w_t)
        train = concat_blocks(
            [
                block_from_recorded(
                    self.plan,
                    uses,
                    self.trace,
                    state_t,
                    cast_inputs(x, self.dtype),
                    u.to(self.dtype),
                )
                for uses, x, u in parts
            ]
        )
        check_finite_block(train, "train")
        delta = {n: (p.detach() - w_t[n]).double() for n, p in self.plan.params.items()}
        # torch optimizers skip parameters that got no gradient (weight decay included)
        skipped = {n for n, p in self.plan.params.items() if p.grad is None}
        if self.stateful:
            shares, rest = self._stateful_shares(idx, train, w_t, had, delta, skipped)
        else:
            shares, rest = None, self._plain_sgd_rest(train, w_t, delta, skipped)
        self._accumulate_nodes(idx, train, w_t, shares, rest)
        if self.kernel is not None:
            self._add_path_kernel(idx, state_t)
        self.steps += 1

    def _verified_forwards(self, idx, xb, cap: StepRecording):
        """``(uses, inputs, output gradient)`` of each forward pass in the block (several under
        DDP's ``no_sync()`` gradient accumulation), whose inputs together must be
        ``train[0][idx]``. With one pass, its output gradient must be that of
        ``loss_fn(model(X[idx]), Y[idx])``; with several, the user's own scaling of the
        micro-batch losses is allowed (the update check still holds them to account)."""
        K = len(cap.root_outputs)
        if K == 0:
            self._fail("expected a forward pass of the model inside the block, saw none")
        ins = [tuple(a) for a in cap.root_inputs]
        joined = tuple(
            torch.cat([x[i] for x in ins])
            if all(isinstance(x[i], torch.Tensor) for x in ins)
            else None
            for i in range(len(ins[0]))
        )
        if len(joined) != len(xb) or not all(
            a is not None and a.shape == b.shape and torch.equal(a, b) for a, b in zip(joined, xb)
        ):
            self._fail(
                "the model was called on inputs other than train[0][idx]"
                + (" (its forward passes, in order)" if K > 1 else "")
            )
        if any(u is None for u in cap.root_grads):
            self._fail("no backward pass reached the model's output inside the block")
        if K == 1:
            self._check_loss_gradient(idx, cap.root_outputs[0], cap.root_grads[0])
        return list(zip(cap.uses, ins, cap.root_grads))

    def _check_loss_gradient(self, idx, out, u) -> None:
        fl = output_tensor(out).detach().clone().requires_grad_(True)
        with torch.enable_grad():  # the loss of what the model returned, its logits a leaf
            loss = self.loss_fn(with_output_tensor(out, fl), self.Y[idx])
        if not torch.isfinite(loss).all():
            raise ValueError(f"step {self.steps}: the loss is not finite ({loss.item()})")
        gl = torch.autograd.grad(loss, fl)[0]
        gap = (gl - u).norm() / max(gl.norm().item(), 1e-300)
        if gap > self._tol():
            self._fail(
                f"the gradient at the model output is not that of loss_fn(model(X[idx]), Y[idx]) "
                f"(relative difference {gap:.2e})"
            )

    def _plain_sgd_rest(self, train, w_t, delta, skipped) -> Dict[str, torch.Tensor]:
        """Plain SGD: check the update against the batch gradient and return the part of it
        that no example carries (weight decay)."""
        lr, wd = self.opt.lr(), self.opt.weight_decay()
        local = summed_grads(self.plan, train)
        gsum = self.dp.allreduce(
            {n: self.share * local.get(n, torch.zeros_like(delta[n])).double() for n in delta}
        )
        pred = {
            n: torch.zeros_like(delta[n])
            if n in skipped
            else -lr * (gsum[n] + wd * w_t[n].double())
            for n in delta
        }
        self._check_update(pred, delta)
        if not self.dp.lead:  # the rest is rank 0's
            return {n: torch.zeros_like(delta[n]) for n in delta}
        return {n: delta[n] + lr * gsum[n] for n in delta}

    def _accumulate_nodes(self, idx, train, w_t, shares, rest) -> None:
        """The query side at each quadrature node of the segment w_t -> w_{t+1}: the bias
        gets the rest of the update, the contributions the examples' shares."""
        phibar = None
        side1, side2 = [], []  # plain SGD: the query at every node against the step's batch
        for s, wk in zip(self.nodes.tolist(), self.weights.tolist()):
            state = self._state(
                {n: w_t[n] + s * (p.detach() - w_t[n]) for n, p in self.plan.params.items()}
            )
            qb = features(
                self.plan, self.full, state, cast_inputs(self.Xq, self.dtype), CHUNK, "query"
            )
            self.bias += wk * dot_params(self.plan, qb, rest).double()
            if self.stateful:
                g = per_example_grads(self.plan, qb).double()
                phibar = wk * g if phibar is None else phibar.add_(wk * g)
            else:
                a, b = to_terms(self.plan, qb, train, scale=wk)
                side1 += a
                side2 += b
        if not self.stateful:
            tmp = torch.zeros(self.M, idx.numel(), self.C, 1, dtype=torch.float64)
            _backend.accumulate(tmp, side1, side2, alpha=-self.opt.lr() * self.share)
            self.contributions[:, idx] += tmp[..., 0]
        else:  # straight into the accumulator: no per-step M x N temporary
            _backend.accumulate(
                self.contributions.view(self.M, self.N, self.C, 1),
                [Term(None, phibar.unsqueeze(1), 0.0)],
                [Term(None, shares[:, None, None, :], 0.0)],
            )

    def _stateful_shares(self, idx, train, w_t, had, delta, skipped):
        G = self.share * per_example_grads(self.plan, train)[:, 0].double()  # [B, P]
        g = self.plan.unflatten(G)
        shares, rest = {}, {}
        for n in self.U:
            if n in skipped:
                shares[n] = torch.zeros_like(self.U[n])
                rest[n] = torch.zeros(self.U[n].shape[1], dtype=torch.float64)
                continue
            w = w_t[n].double().reshape(-1)
            share, r = self.opt.step_dense(
                n,
                self.U[n],
                self.U_rest[n],
                idx,
                g[n].reshape(idx.numel(), -1),
                w if self.dp.lead else torch.zeros_like(w),
                first=not had[n],
            )
            shares[n] = share
            rest[n] = r
        shares = self.plan.flatten(shares, lead=(self.N,))  # [N, P], plan layout
        local = self.plan.unflatten(shares.sum(0))
        total = self.dp.allreduce(local)
        pred = self.dp.allreduce({n: local[n] + rest[n].reshape(local[n].shape) for n in delta})
        self._check_update(pred, delta)
        # The part of the actual update that no example carries (weight decay, prior state),
        # counted on rank 0.
        if not self.dp.lead:
            return shares, {n: torch.zeros_like(delta[n]) for n in delta}
        return shares, {n: delta[n] - total[n] for n in delta}

    def _add_path_kernel(self, idx, state_t) -> None:
        if self.kernel == "full" and not self.dp.lead:  # every column at every step: rank 0's
            return
        lr = self.opt.lr()
        q = features(
            self.plan, self.spec, state_t, cast_inputs(self.Xq, self.dtype), CHUNK, "query"
        )
        cols = idx if self.kernel == "batch" else torch.arange(self.N)
        xt = tuple(x[cols] for x in self.X)
        tb = features(self.plan, self.spec, state_t, cast_inputs(xt, self.dtype), CHUNK, "train")
        C = 1 if self.spec.stacked else q.C
        K = torch.zeros(self.M, cols.numel(), C, C, dtype=torch.float64)
        _backend.accumulate(K, *to_terms(self.plan, q, tb, stacked=self.spec.stacked), alpha=lr)
        self.path_kernel[:, cols] += self.spec.finish(K)

    def _check_update(self, pred: Dict[str, torch.Tensor], delta: Dict[str, torch.Tensor]) -> None:
        num = sum(((pred[n] - delta[n]) ** 2).sum() for n in delta).sqrt().item()
        den = sum((delta[n] ** 2).sum() for n in delta).sqrt().item()
        err = num / max(den, 1e-300)
        self.step_errors.append(err)
        # w_{t+1} is w_t + update rounded to the parameters' precision, by each of the
        # optimizer's in-place operations (AdamW: two): at most eps |w_{t+1}| per entry, to
        # which the gradients' own rounding (relative to the update) adds
        rounding = math.sqrt(
            sum(
                (2 * torch.finfo(p.dtype).eps * p.detach().double().norm().item()) ** 2
                for p in self.plan.params.values()
            )
        )
        if num > self._tol() * den + rounding + 1e-300:
            self._fail(
                f"the optimizer's update differs from the one the recorded gradients explain by "
                f"{err:.2e} (relative). Gradient clipping, an unsupported optimizer option, a loss "
                "other than loss_fn, or a change to the weights outside the block would do this"
            )

    def _tol(self) -> float:
        md = next(iter(self.plan.params.values())).dtype
        return 1e-8 if md == torch.float64 else 1e-4

    def _state(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = model_state(self.plan, self.dtype)
        for n, v in params.items():
            state[n] = v.detach().to(self.dtype).requires_grad_(True)
        return state

    def _query_outputs(self, params: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        state = model_state(self.plan, self.dtype) if params is None else self._state(params)
        with torch.no_grad():
            out = self.plan.forward(state, cast_inputs(self.Xq, self.dtype))
        return self.full.rows(out).double()

    @with_autograd
    def kernel_machine(self) -> Optional[KernelMachine]:
        """The kernel machine of the steps recorded so far. With a DDP model this is a
        collective call: rank 0 gets the machine of the global run, the other ranks ``None``."""
        note = None
        if self.broken:
            note = f"recording stopped at step {self.steps}: {self.broken}"
        elif moved := self._moved_since_last_step():
            note = f"the weights changed after the last recorded step ({moved})"
        if note is not None:
            warnings.warn(
                f"PathRecorder: {note}; the kernel machine explains the {self.steps} recorded "
                "step(s), and model_output is the model at the weights the last of them left",
                stacklevel=3,
            )
        fT = self._query_outputs(self.w_last)
        if self.dp.active:
            contributions = self.dp.reduce_to_lead(self.contributions)
            moved = self.dp.reduce_to_lead(self.bias - self.f0)
            kernel = None if self.path_kernel is None else self.dp.reduce_to_lead(self.path_kernel)
            if not self.dp.lead:
                return None
            return KernelMachine(
                contributions,
                self.f0 + moved,
                kernel,
                f0=self.f0,
                fT=fT,
                steps=self.steps,
                quadrature=self.quadrature,
                step_errors=list(self.step_errors),
                note=note,
            )
        # with out= the machine shares the stores instead of copying them into RAM
        own = (lambda t: t) if self.out is not None else (lambda t: t.clone())
        return KernelMachine(
            own(self.contributions),
            self.bias.clone(),
            None if self.path_kernel is None else own(self.path_kernel),
            f0=self.f0,
            fT=fT,
            steps=self.steps,
            quadrature=self.quadrature,
            step_errors=list(self.step_errors),
            note=note,
        )
