"""Registers, spills and stack of every CUDA kernel, per architecture, from ptxas (no GPU).

    python scripts/cuda_resources.py [--arch 80 90a]

Compiles cuda/gram_cuda.cu as the package build does (one translation unit) with
``--resource-usage`` and prints one line per kernel instantiation: a kernel at 255 registers
with spill stores is register-bound (one block of 8 warps per SM at most).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demangle(names):
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return out


def short(name: str) -> str:
    name = re.sub(r"pathkernel::cuda::\(anonymous namespace\)::(fm::)?", "", name)
    name = re.sub(r"pathkernel::cuda::\(anonymous namespace\)::", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    return re.sub(r"\(.*\)$", "", name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="*", default=["80", "90a"])
    args = ap.parse_args()
    gencode = []
    for a in args.arch:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            "nvcc",
            "-std=c++17",
            "-O3",
            "--expt-relaxed-constexpr",
            "-I" + os.path.join(ROOT, "include"),
            "-I" + os.path.join(ROOT, "cuda"),
            *gencode,
            "--resource-usage",
            "-c",
            os.path.join(ROOT, "cuda", "gram_cuda.cu"),
            "-o",
            os.path.join(d, "gram_cuda.o"),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        return r.returncode
    rows, cur = [], None
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
    names = demangle([row["name"] for row in rows])
    print(f"{'arch':7} {'regs':>4} {'spill st/ld (B)':>16} {'stack':>5}  kernel")
    for row, name in sorted(zip(rows, names), key=lambda t: (t[0]["arch"], short(t[1]))):
        spill = f"{row.get('st', 0)}/{row.get('ld', 0)}"
        print(
            f"{row['arch']:7} {row.get('regs', 0):4d} {spill:>16} {row.get('stack', 0):5d}  "
            f"{short(name)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
