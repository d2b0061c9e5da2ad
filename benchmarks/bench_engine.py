"""Speed of the LRP engine against forward, forward+backward and zennit, measured side by side in one run.

    .venv/bin/python benchmarks/bench_engine.py                      # vgg16 and resnet50, 224x224, batch 8
    .venv/bin/python benchmarks/bench_engine.py --models resnet50 --repeats 3 --profile epsilon_gamma_box

Every method gets the same input batch (float32, random-init torchvision model, eval mode) and is timed as the median
of ``--repeats`` rounds after one warm-up round; a round times every method once (interleaved, so that load from other
processes spreads over all methods). Explainers are built once, outside the timed loop (that is how a dataset is
explained: one explainer, many batches); zennit's composite context is entered around each timed call, untimed.
Ratios are to forward+backward (the input
gradient with frozen parameters, what one LRP backward pass costs at best; "/ full bwd": to ``.backward()`` with
trainable parameters, which also computes weight gradients); "vs zennit" is zennit's time divided by ours (throughput
ratio). The issue's targets are checked at the end.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lrp  # noqa: E402

COMPOSITES = ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
TARGETS = {"epsilon": 1.2, "epsilon_plus": 1.2, "epsilon_gamma_box": 1.2, "epsilon_alpha2_beta1": 1.8}
GAMMA_BOX_VS_ZENNIT = 3.0
BASE = "forward+backward (input grad, frozen params)"
FULL = "forward+backward (.backward(), weight grads too)"
LOW, HIGH = -2.1179, 2.6400  # ImageNet-normalized pixel range


def zennit_composite(name: str, model_name: str):
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution

    canonizers = [ResNetCanonizer()] if model_name.startswith("resnet") else [VGGCanonizer()]
    if name == "epsilon":
        rule = Epsilon()
        return LayerMapComposite(layer_map_base() + [(Convolution, rule), (torch.nn.Linear, rule)],
                                 canonizers=canonizers)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canonizers)
    return {"epsilon_plus": EpsilonPlus, "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}[name](canonizers=canonizers)


def synchronize(device: torch.device):
    """Wait for queued CUDA kernels, so wall time is the time of the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall times of several methods, measured in interleaved rounds so that load from other processes on a shared
    machine spreads evenly over all methods instead of spoiling one of them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.methods: dict[str, tuple] = {}
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, fn, context=None):
        """``fn()`` is timed; ``context()`` (e.g. zennit's composite context) is entered around it, untimed."""
        self.methods[name] = (fn, context)
        self.times[name] = []

    def run(self, repeats: int):
        for round_ in range(repeats + 1):  # round 0 is the warm-up
            for name, (fn, context) in self.methods.items():
                if context is None:
                    seconds = self._once(fn)
                else:
                    with context() as modified:
                        seconds = self._once(functools.partial(fn, modified))
                if round_ > 0:
                    self.times[name].append(seconds)

    def _once(self, fn) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - start

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def minimum(self, name: str) -> float:
        return min(self.times[name])


def input_gradient(model, x, target):
    x = x.detach().requires_grad_(True)
    out = model(x)
    (gradient,) = torch.autograd.grad(out[torch.arange(x.shape[0], device=x.device), target].sum(), x)
    return gradient


def full_backward(model, x, target):
    """``.backward()`` with trainable parameters: input and weight gradients, the cost of a training step's backward."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    out[torch.arange(x.shape[0], device=x.device), target].sum().backward()
    model.zero_grad(set_to_none=True)
    return x.grad


def zennit_attribution(modified, x, target):
    x = x.detach().requires_grad_(True)
    out = modified(x)
    rows = torch.arange(x.shape[0], device=x.device)
    seed = torch.zeros_like(out)
    seed[rows, target] = out[rows, target].detach()
    (relevance,) = torch.autograd.grad(out, x, seed)
    return relevance


def bench_model(name: str, args, device: torch.device) -> list[tuple[str, float, float, float | None]]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    model.requires_grad_(False)
    trainable = copy.deepcopy(model).requires_grad_(True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).clamp(LOW, HIGH)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    timer = Timer(device)

    def forward():
        with torch.no_grad():
            model(x)

    timer.add("forward (no_grad)", forward)
    timer.add(BASE, lambda: input_gradient(model, x, target))
    timer.add(FULL, lambda: full_backward(trainable, x, target))
    explainers = {}
    for composite in COMPOSITES:
        params = {"low": LOW, "high": HIGH} if composite == "epsilon_gamma_box" else {}
        explainer = explainers[composite] = lrp.Explainer(model, composite, tf32=args.tf32, **params)
        timer.add(f"ours {composite}", lambda explainer=explainer: explainer(x, target))
        if not args.no_zennit:
            timer.add(f"zennit {composite}", lambda modified: zennit_attribution(modified, x, target),
                      context=lambda composite=composite: zennit_composite(composite, name).context(model))
    timer.run(args.repeats)

    rows = []
    for method in timer.methods:
        zennit = f"zennit {method[5:]}" if method.startswith("ours ") else None
        rows.append((method, timer.median(method), timer.minimum(method),
                     timer.median(zennit) if zennit in timer.methods else None))
    print_table(name, rows, timer.median(BASE), timer.median(FULL))
    if args.profile:
        profile(explainers[args.profile], x, target)
    return rows


def profile(explainer, x, target):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        explainer(x, target)
    events = prof.key_averages()
    if x.is_cuda:  # GPU-bound if the kernels' time is close to the wall time of the call
        kernels = sum(e.self_device_time_total for e in events) / 1e6
        print(f"sum of kernel times {kernels:.4f} s")
    print(events.table(sort_by="self_device_time_total" if x.is_cuda else "self_cpu_time_total", row_limit=20))


def print_table(name: str, rows, base: float, full: float):
    print(f"\n{name}")
    print(f"| {'method':<52} | {'median (s)':>10} | {'min (s)':>8} | {'/ fwd+bwd':>9} | {'/ full bwd':>10} "
          f"| {'vs zennit':>9} |")
    print(f"|{'-' * 54}|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 12}|{'-' * 11}|")
    for method, seconds, fastest, zennit in rows:
        speedup = f"{zennit / seconds:.2f}x" if zennit is not None else ""
        print(f"| {method:<52} | {seconds:>10.3f} | {fastest:>8.3f} | {seconds / base:>8.2f}x "
              f"| {seconds / full:>9.2f}x "
              f"| {speedup:>9} |")
    sys.stdout.flush()


def check_targets(name: str, rows) -> list[str]:
    base = next(seconds for method, seconds, _, _ in rows if method == BASE)
    lines = []
    for method, seconds, _, zennit in rows:
        if not method.startswith("ours "):
            continue
        composite = method[5:]
        limit = TARGETS[composite]
        lines.append(f"{name} {composite}: {seconds / base:.2f}x forward+backward (target <= {limit}x): "
                     f"{'met' if seconds / base <= limit else 'NOT met'}")
        if composite == "epsilon_gamma_box" and zennit is not None:
            lines.append(f"{name} {composite}: {zennit / seconds:.2f}x zennit's throughput (target >= "
                         f"{GAMMA_BOX_VS_ZENNIT}x): {'met' if zennit / seconds >= GAMMA_BOX_VS_ZENNIT else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-zennit", action="store_true", help="time our engine only")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: TF32 convolutions for every method (default: full float32 for every method)")
    parser.add_argument("--profile", choices=COMPOSITES, help="print a torch.profiler table for this composite")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch = args.batch or (64 if device.type == "cuda" else 8)
    # the same arithmetic for every method: our explainer runs in full float32 unless tf32=True, so the baselines and
    # zennit get the same global setting
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.size}x{args.size}, float32{' (TF32 on)' if args.tf32 else ''}, "
          f"median of {args.repeats} after 1 warm-up")
    summary = []
    for name in args.models:
        summary += check_targets(name, bench_model(name, args, device))
    print("\nTargets")
    for line in summary:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
