"""First against second call on ResNet-18 (CIFAR), float32, one output, for ``tangent_kernel``
and for the torch.func recipe (chunked ``vmap(grad)``, one GEMM), each in a fresh process: a
first call pays what the process has not done yet (oneDNN primitives for each new batch size,
vmap's tracing), and ours also the probe (the per-example check of the factors).

    python bench/first_call.py [N]

A third line, "unchecked", is pathkernel with the per-example check of the factors replaced by
a no-op (an experiment: what the first call costs without it).
"""

import subprocess
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 64


def _one(who: str) -> None:
    import torch

    import pathkernel as pk
    from pathkernel.bench.architectures import randomize_norm_stats, resnet18_cifar
    from pathkernel.bench.workloads import torch_func_grad_ntk

    if who == "unchecked":
        from pathkernel._capture import probe

        probe._verify = lambda *a, **k: None
    torch.manual_seed(0)
    model = randomize_norm_stats(resnet18_cifar(10)).eval()
    x = torch.randn(N, 3, 32, 32)
    call = {
        "pathkernel": lambda: pk.tangent_kernel(model, x, outputs=0),
        "unchecked": lambda: pk.tangent_kernel(model, x, outputs=0),
        "torch.func": lambda: torch_func_grad_ntk(model, x, lambda o: o[:, 0]),
    }[who]
    times = []
    for _ in range(3):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    first, second = times[0], min(times[1:])
    ratio = first / second
    print(f"{who:>10}  N={N}: first {first:.2f} s, second {second:.2f} s, ratio {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        _one(sys.argv[2])
    else:
        for who in ("pathkernel", "torch.func", "unchecked"):
            subprocess.run([sys.executable, __file__, str(N), who], check=True)
