"""Would kernel fusion pay? The engine's epsilon stabilizer fused by inductor against the eager one, whole calls.

The stabilized division ``R / (z + eps * sign(z))`` of a ``z`` the rule does not own runs eagerly as three
elementwise passes (``copysign``, ``add_``, ``div``: eight tensor reads and writes) where one fused kernel needs three.
It is the engine's largest group of elementwise bytes on ConvNeXt (``bench_zoo.py --census``), so it is where fusion
would show first. This benchmark swaps ``lrp.stabilize.safe_divide`` (in every engine module that calls it) for a
``torch.compile``'d kernel over flattened contiguous inputs (eager for broadcasts and other layouts, so dynamo compiles
a handful of kernels, not one per layer shape), checks that the relevance is unchanged, and times the two in
interleaved rounds. The engine itself stays eager: this is an experiment, not a switch.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_fused_divide.py --models convnext_tiny --batch 8
    python benchmarks/bench_fused_divide.py --device cuda --batch 32     # Triton kernels on a GPU
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import contextmanager

import torch
import torchvision

import lrp
from lrp import attention, rules, stabilize, windows

EAGER = stabilize.safe_divide
_CALLERS = (stabilize, rules, attention, windows)


def _kernel(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    return numerator / (denominator + torch.copysign(epsilon, denominator))


class FusedDivide:
    """``safe_divide`` with one compiled kernel where both operands are contiguous and of one shape; counts both."""

    def __init__(self):
        self.kernel = torch.compile(_kernel, dynamic=True, fullgraph=True)
        self.epsilons: dict = {}  # one 0-dim tensor per (epsilon, dtype, device): no recompile per epsilon value
        self.fused = self.eager = 0

    def __call__(self, numerator, denominator, epsilon):
        if (epsilon > 0 and numerator.shape == denominator.shape and numerator.dtype == denominator.dtype
                and numerator.numel() > 1 and numerator.is_contiguous() and denominator.is_contiguous()):
            key = (epsilon, denominator.dtype, denominator.device)
            if key not in self.epsilons:
                self.epsilons[key] = torch.tensor(epsilon, dtype=denominator.dtype, device=denominator.device)
            self.fused += 1
            # detach(): a flat view without ``_base``, on which dynamo would guard (one recompile per layer layout)
            flat = (t.view(-1).detach() for t in (numerator, denominator))
            return self.kernel(*flat, self.epsilons[key]).view(numerator.shape)
        self.eager += 1
        return EAGER(numerator, denominator, epsilon)


@contextmanager
def divide_with(function):
    for module in _CALLERS:
        module.safe_divide = function
    try:
        yield
    finally:
        for module in _CALLERS:
            module.safe_divide = EAGER


def timed(explainer, x, target) -> tuple[float, torch.Tensor]:
    if x.is_cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    relevance = explainer(x, target).relevance
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began, relevance


def measure(name: str, x: torch.Tensor, repeats: int) -> tuple:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval().to(x.device)
    explainer = lrp.Explainer(model, "epsilon_plus")
    target = torch.randint(0, 1000, (len(x),), device=x.device)
    fused = FusedDivide()
    _, reference = timed(explainer, x, target)
    with divide_with(fused):
        first, relevance = timed(explainer, x, target)  # compiles
    fused_calls, eager_calls = fused.fused, fused.eager
    error = ((relevance - reference).norm() / reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)).item()
    times = {"eager": [], "fused": []}
    for _ in range(repeats):
        times["eager"].append(timed(explainer, x, target)[0])
        with divide_with(fused):
            times["fused"].append(timed(explainer, x, target)[0])
    eager, fast = (statistics.median(times[k]) for k in ("eager", "fused"))
    return (name, eager, fast, eager / fast, first, error, torch.equal(relevance, reference),
            f"{fused_calls} / {eager_calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "swin_t", "efficientnet_b0", "resnet50"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"threads {torch.get_num_threads()}, batch {batch}, {args.size}x{args.size}, float32, epsilon_plus, "
          f"median of {args.repeats} interleaved rounds after the compiling call")
    print("| model | eager (s) | fused divide (s) | eager / fused | first fused call (s) | rel. L2 | equal | "
          "divisions fused / eager per call |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for name in args.models:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        row = measure(name, x, args.repeats)
        print(f"| {row[0]} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f}x | {row[4]:.1f} | {row[5]:.1e} | {row[6]} | "
              f"{row[7]} |", flush=True)


if __name__ == "__main__":
    main()
