"""Region perturbation throughput: large batched forwards vs. one forward per perturbation step.

The naive loop re-evaluates the batch once per step (L forwards of B images per method); RegionPerturbation
builds the B x M x L perturbed images chunk by chunk and evaluates ``forward_batch`` of them at once. Both
give the same curves (checked). Prints images/s (an image = all its methods and steps) side by side.

    .venv/bin/python benchmarks/bench_evaluate.py [--quick]
"""
from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

from pipeline.perturbation import PerturbationSpec, RegionPerturbation
from jobs.demo.tinycnn import tiny_cnn


def naive_curves(perturb: RegionPerturbation, model, x, target, orders, sample_ids):
    """The textbook loop: for each method and step, perturb the batch and run one forward."""
    spec = perturb.spec
    b, _, h, w = x.shape
    from pipeline.perturbation import region_index

    regions = region_index(h, w, spec.region_size)
    z = perturb.replacement(x, sample_ids)
    rows = torch.arange(b)
    out = {}
    with torch.no_grad():
        for name, order in orders.items():
            values = [model(x)[rows, target].double()]
            current = x.clone()
            for k in range(spec.num_steps(h, w)):
                inside = (regions[None] == order[:, k, None, None]).unsqueeze(1)
                current = torch.where(inside, z, current)
                values.append(model(current)[rows, target].double())
            out[name] = torch.stack(values, 1)
    return out


def measure(fn, repeats: int) -> float:
    fn()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    cases = [("tiny_cnn 48x48, 5 methods, L=64, regions 4x4", tiny_cnn(5).eval(), 48, 4, 64, 5)]
    if not args.quick:
        import torchvision

        cases.append(("resnet18 64x64, 3 methods, L=32, regions 8x8",
                      torchvision.models.resnet18(num_classes=10).eval(), 64, 8, 32, 3))
    batch = 8
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {batch}")
    print("| case | naive loop (img/s) | batched, forward_batch 256 (img/s) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for label, model, size, region, steps, methods in cases:
        x = torch.randn(batch, 3, size, size)
        target = torch.zeros(batch, dtype=torch.long)
        ids = list(range(batch))
        perturb = RegionPerturbation(PerturbationSpec(region_size=region, steps=steps, low=-2.0, high=2.0))
        scores = {f"m{i}": torch.randn(batch, size, size) for i in range(methods - 1)} | {"random": None}
        orders = perturb.orders(scores, ids, size, size)
        batched = perturb.curves(model, x, target, orders, ids)
        naive = naive_curves(perturb, model, x, target, orders, ids)
        for name in orders:
            torch.testing.assert_close(batched[name], naive[name], rtol=1e-4, atol=1e-4)
        repeats = 1
        t_naive = measure(functools.partial(naive_curves, perturb, model, x, target, orders, ids), repeats)
        t_batched = measure(functools.partial(perturb.curves, model, x, target, orders, ids), repeats)
        print(f"| {label} | {batch / t_naive:.1f} | {batch / t_batched:.1f} | {t_naive / t_batched:.2f}x |")


if __name__ == "__main__":
    main()
