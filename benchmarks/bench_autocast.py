"""Reduced-precision forward (``Explainer(autocast=...)``) against full float32: relevance error and speed.

The relevance is computed in float32 from activations of a bfloat16 / float16 forward pass. Error: relative L2
distance of each row's map to the float32 map (median and max over the batch); speed: median seconds per call,
all precisions interleaved per round after a warm-up round. Random-init torchvision models (no weights here).

    .venv/bin/python benchmarks/bench_autocast.py --models vgg16 resnet50 --batch 4 --repeats 3
    python benchmarks/bench_autocast.py --device cuda --batch 64 --repeats 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

import lrp


def timed(explainer: lrp.Explainer, x: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    if x.is_cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    relevance = explainer(x, target).relevance
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began, relevance


def measure(name: str, composite: str, x: torch.Tensor, dtypes: list[str | None], repeats: int) -> list[tuple]:
    """(dtype, median s, min s, median rel. L2, max rel. L2) per autocast dtype (None: float32)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval().to(x.device)
    target = torch.randint(0, 1000, (len(x),), device=x.device)
    params = {"low": -3.0, "high": 3.0} if composite.endswith("_box") else {}  # z^B's pixel bounds (as bench_engine)
    explainers = {d: lrp.Explainer(model, composite, autocast=d, **params) for d in dtypes}
    times = {d: [] for d in dtypes}
    maps = {}
    for round_ in range(repeats + 1):
        for d, explainer in explainers.items():
            seconds, relevance = timed(explainer, x, target)
            if round_:
                times[d].append(seconds)
            maps[d] = relevance
    reference = maps[None].flatten(1).double()
    rows = []
    for d in dtypes:
        error = (maps[d].flatten(1).double() - reference).norm(dim=1) / reference.norm(dim=1)
        rows.append((d or "float32", statistics.median(times[d]), min(times[d]), error.median().item(),
                     error.max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--composites", nargs="+", default=["epsilon_plus", "epsilon_gamma_box"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.size}x{args.size}, random init, median of {args.repeats}")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for name in args.models:
        for composite in args.composites:
            print(f"\n{name} {composite}\n\n| forward | median s | min s | speed-up | rel. L2 median | rel. L2 max |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            rows = measure(name, composite, x, [None, *args.dtypes], args.repeats)
            base = rows[0][1]
            for dtype, median, fastest, err, worst in rows:
                print(f"| {dtype} | {median:.3f} | {fastest:.3f} | {base / median:.2f}x | {err:.2e} | {worst:.2e} |")


if __name__ == "__main__":
    main()
