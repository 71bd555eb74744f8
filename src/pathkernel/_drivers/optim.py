"""What an optimizer step does, written as a linear combination of per-example gradients.

``Δ_t = Σ_i share_i + rest``: each training example's share of the update and the part that
belongs to no example (weight decay, optimizer state from before recording). SGD without
momentum is step-local (``share_i = -lr g_i``) and stays factored; momentum and Adam(W) carry
per-example shares of their first-moment buffer from step to step, so they keep a dense
``[N, P]`` share matrix (exact given the optimizer's recorded second moment).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


class OptimizerModel:
    """Mirror of a torch optimizer's update rule on per-example shares."""

    def __init__(self, optimizer: torch.optim.Optimizer, names_of: Dict[int, str]):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.opt = optimizer
        self.kind = type(optimizer).__name__
        if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(
                f"optimizer: {self.kind} is not supported; use torch.optim.SGD, Adam or AdamW"
            )
        self.hyper: Dict[str, dict] = {}
        self.param_of: Dict[str, torch.Tensor] = {}
        for g in optimizer.param_groups:
            if g.get("maximize", False):
                raise ValueError("optimizer: maximize=True is not supported")
            for p in g["params"]:
                n = names_of.get(id(p))
                if n is None:
                    if p.requires_grad:
                        raise ValueError(
                            "optimizer: holds a parameter that is not a trainable "
                            "parameter of model"
                        )
                    continue
                self.hyper[n] = g
                self.param_of[n] = p
        missing = sorted(set(names_of.values()) - set(self.hyper))
        if missing:
            raise ValueError(
                f"optimizer: does not update the model's trainable parameters {missing}; "
                "freeze them (requires_grad=False) or give them to the optimizer"
            )
        lrs = {self._lr(g) for g in self.hyper.values()}
        wds = {float(g.get("weight_decay", 0.0)) for g in self.hyper.values()}
        self.sgd_plain = (
            self.kind == "SGD"
            and all(float(g["momentum"]) == 0 for g in self.hyper.values())
            and len(lrs) == 1
            and len(wds) == 1
        )

        self.snapshot()

    @staticmethod
    def _lr(g) -> float:
        lr = g["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)

    def snapshot(self) -> None:
        """Freeze the hyper-parameters the next step uses (called from the optimizer's step
        pre-hook, so a scheduler stepped inside the recorded block cannot confuse the step)."""
        self.current = {
            n: {
                k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
                for k, v in g.items()
                if k != "params"
            }
            for n, g in self.hyper.items()
        }

    def lr(self) -> float:
        """The step's learning rate (the first group's: ε_t of the path kernel)."""
        return self._lr(next(iter(self.current.values())))

    def weight_decay(self) -> float:
        return float(next(iter(self.current.values())).get("weight_decay", 0.0))

    # ---- dense shares (momentum, Adam, AdamW, per-group hyper-parameters) ---------------------
    def init_state(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Optimizer state present before recording: its first moment is the rest's share."""
        rest = {}
        for n in names:
            p = self._param(n)
            st = self.opt.state.get(p, {})
            buf = st.get("momentum_buffer") if self.kind == "SGD" else st.get("exp_avg")
            rest[n] = (
                torch.zeros(p.shape, dtype=torch.float64)
                if buf is None
                else buf.detach().double().clone()
            )
        return rest

    def _param(self, name):
        return self.param_of[name]

    def has_buffer(self, name: str) -> bool:
        st = self.opt.state.get(self._param(name), {})
        return (st.get("momentum_buffer") if self.kind == "SGD" else st.get("exp_avg")) is not None

    def step_dense(
        self,
        name: str,
        U: torch.Tensor,
        U_rest: torch.Tensor,
        idx: torch.Tensor,
        g: torch.Tensor,
        w: torch.Tensor,
        first: bool,
    ):
        """Advance one parameter's shares by one step and return (share matrix [N, p] of Δ,
        rest vector [p] of Δ). ``U [N, p]``, ``U_rest [p]`` are updated in place; ``g [B, p]``
        per-example gradients of the batch loss; ``w`` the weights before the step."""
        h = self.current[name]
        lr = self._lr(h)
        wd = float(h.get("weight_decay", 0.0))
        p = self._param(name)
        if self.kind == "SGD":
            mu, damp, nesterov = float(h["momentum"]), float(h["dampening"]), bool(h["nesterov"])
            if mu == 0:
                share = torch.zeros_like(U)
                share[idx] = -lr * g
                return share, -lr * wd * w
            if first:  # torch: the buffer starts as the first gradient, undamped
                U.zero_()
                U[idx] = g
                U_rest.copy_(wd * w)
            else:
                U.mul_(mu)
                U[idx] += (1 - damp) * g
                U_rest.mul_(mu).add_((1 - damp) * wd * w)
            if nesterov:
                share = -lr * mu * U
                share[idx] += -lr * g
                return share, -lr * (wd * w + mu * U_rest)
            return -lr * U, -lr * U_rest
        # Adam / AdamW: m = b1 m + (1 - b1) g; Δ = -lr / bc1 * m / (sqrt(v / bc2) + eps)
        b1, b2 = (float(b) for b in h["betas"])
        eps = float(h["eps"])
        st = self.opt.state[p]
        step = float(st["step"])
        v = st["max_exp_avg_sq"] if h.get("amsgrad") else st["exp_avg_sq"]
        v = v.detach().double().reshape(-1)
        denom = (v / (1 - b2**step)).sqrt() + eps
        precond = lr / (1 - b1**step) / denom
        decoupled = self.kind == "AdamW"
        U.mul_(b1)
        U[idx] += (1 - b1) * g
        U_rest.mul_(b1)
        if not decoupled:
            U_rest.add_((1 - b1) * wd * w)
        rest = -precond * U_rest
        if decoupled:
            rest = rest - lr * wd * w
        return -precond * U, rest


def quadrature(rule) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1]: an int n (Gauss-Legendre), 'left' or 'trapezoid'."""
    import numpy as np

    if rule == "left":
        return torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    if rule == "trapezoid":
        return (
            torch.tensor([0.0, 1.0], dtype=torch.float64),
            torch.tensor([0.5, 0.5], dtype=torch.float64),
        )
    if isinstance(rule, bool) or not isinstance(rule, int) or rule < 1:
        raise ValueError(
            f"quadrature: expected a positive int (Gauss-Legendre nodes), 'left' or "
            f"'trapezoid', got {rule!r}"
        )
    x, w = np.polynomial.legendre.leggauss(rule)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
