"""Float64 oracles computed another way: full per-example Jacobians by torch.func, contracted."""
import torch
from torch.func import functional_call, jacrev, vmap


def jacobians(model, x, rows):
    """``[n, C, P]`` per-example Jacobians of ``rows(model(x))`` w.r.t. trainable params, float64."""
    x = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    params = {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach().double() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()})

    def single(p, *xs):
        out = functional_call(model, {**fixed, **p}, tuple(t.unsqueeze(0) for t in xs))
        return rows(out)[0]

    jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(x))(params, *x)
    n = x[0].shape[0]
    return torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], 2)


def rows_for(outputs):
    if outputs in ("trace", "full"):
        return lambda o: o.reshape(o.shape[0], -1)
    if isinstance(outputs, int):
        return lambda o: o.reshape(o.shape[0], -1)[:, outputs:outputs + 1]
    return lambda o: outputs(o).reshape(-1, 1)


def reference_ntk(model, x1, x2=None, outputs="trace"):
    J1 = jacobians(model, x1, rows_for(outputs))
    J2 = J1 if x2 is None else jacobians(model, x2, rows_for(outputs))
    K = torch.einsum("icp,jdp->ijcd", J1, J2)
    if outputs == "full":
        return K
    if outputs == "trace":
        return K.diagonal(dim1=2, dim2=3).sum(-1)
    return K[:, :, 0, 0]
