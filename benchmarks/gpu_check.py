"""Everything issues 13 and 15 could not measure without a GPU, in one run of under 9 minutes on a lent GPU machine.

No Ray needed (a lent machine may lack its wheel): the explain actor is driven in-process, as
``bench_pipeline.py --in-process`` does. Steps, each a subprocess with its own time limit, output printed as it comes:

0. decoding in worker processes (``decode_workers``, issue 15): one actor with 4 and 8 decode workers against the
   bare engine on VOC-size and 224 px JPEGs (``bench_pipeline.py --decode-workers``), and the decoding side alone
   (``bench_decode_workers.py``: images/s, the actor process's CPU per image, inputs normalised on the GPU against
   the host);
1. one actor (overlapped stages, then the sequential loop) against the bare engine with ``decode: auto`` (nvJPEG):
   resnet50, 224 px JPEGs, then VOC-size 500x375 JPEGs and 2 and 4 actor processes (step 0's tables hold the same
   rows with ``decode: cpu``);
2. nvJPEG against CPU decoding: the same JPEGs through the actor both ways, relative L2 of the relevance maps and
   max abs difference of the model inputs (resampling of the decoded image differs: docs/pipeline.md);
3. bfloat16 / float16 forward against float32: relevance error and speed on vgg16 and resnet50;
4. the zoo on CUDA (issue 13): ``bench_zoo.py`` over its families, against forward, the input gradient, zennit and
   lxt where they are installed (carried as wheels: a lent machine has neither);
5. would kernel fusion pay on CUDA: the epsilon stabilizer as one Triton kernel against the eager engine, whole calls
   (``bench_fused_divide.py``; on the 2-core CPU it gave 1.0-1.1x).

Steps run in the order of what is missing most (the decode workers, the zoo with recomputed activations, the
nvJPEG actors, the decode difference, autocast, fusion), so that running out of ``--budget`` skips the least needed.

    python benchmarks/gpu_check.py --budget 540   # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --quick    # a CPU smoke run of every step, tiny sizes (a minute or two)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


BUDGET = 470.0  # seconds for all steps (``--budget``): the machine's start-up and transfers come on top
STARTED = time.perf_counter()


def run_step(title: str, args: list[str], limit: float) -> None:
    """Run one step as a subprocess with ``limit`` seconds (the smaller of its own and what the budget has left)."""
    print(f"\n## {title}\n\n    {' '.join(args)}\n", flush=True)
    if limit < 10:
        print("(skipped: out of time)")
        return
    began = time.perf_counter()
    try:
        subprocess.run([sys.executable, *args], cwd=REPO, timeout=limit, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    except subprocess.TimeoutExpired:
        print(f"(stopped after {limit:.0f} s)")
    print(f"({time.perf_counter() - began:.0f} s)", flush=True)


def decode_difference(images: int, size: int, width: int, model: str, batch: int) -> None:
    """The same JPEGs explained by the actor with CPU and with GPU decoding: how far apart the maps are."""
    import torch

    from benchmarks.bench_pipeline import actor_in_process, make_images
    from pipeline.config import config_from_dict
    from pipeline.datasets import read_image
    from pipeline.gpu_decode import decode_batch
    from pipeline.preprocess import Preprocess
    from pipeline.store import open_store

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", images, size, 10, "jpg", width=width)
        stores = {}
        for decode in ("cpu", "auto"):
            values = {"dataset": str(root / "data"), "model": {"name": model, "kwargs": {"num_classes": 10}},
                      "preprocess": {"resize": 224, "pad_to_square": True}, "explanations": ["epsilon_plus"],
                      "batch_size": batch, "rows_per_shard": 4 * batch, "progress": False, "decode": decode,
                      "store": str(root / f"{decode}.zarr")}
            config = config_from_dict(values)
            actor_in_process(config)
            stores[decode] = open_store(values["store"]).group("epsilon_plus").relevance.compute()
        a, b = (stores[k].reshape(len(stores[k]), -1).astype(np.float64) for k in ("cpu", "auto"))
        error = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        paths = sorted(str(p) for p in (root / "data").rglob("*.jpg"))[:batch]
        preprocess = Preprocess(config.preprocess)
        cpu = torch.stack([preprocess(read_image(p))[0] for p in paths])
        gpu = decode_batch([Path(p).read_bytes() for p in paths], device, lambda i: read_image(paths[i]))
        on_device = torch.stack([preprocess(d.image)[0].cpu() for d in gpu])
        print(f"decode on {device}: {images} JPEGs {width}x{size} -> 224, {model}, epsilon_plus")
        print(f"relevance rel. L2, GPU vs CPU decoding: median {np.median(error):.2e}, max {error.max():.2e}")
        print(f"model inputs (normalized), max abs difference: {(on_device - cpu).abs().max().item():.3e}, "
              f"mean {(on_device - cpu).abs().mean().item():.3e}")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that every step runs (CPU)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all steps together")
    parser.add_argument("--decode-difference", nargs=5, metavar=("IMAGES", "H", "W", "MODEL", "BATCH"),
                        help=argparse.SUPPRESS)  # step 2, run as its own subprocess
    args = parser.parse_args()
    if args.decode_difference:
        images, height, width, model, batch = args.decode_difference
        return decode_difference(int(images), int(height), int(width), model, int(batch))
    cpus = str(os.cpu_count() or 1)
    if args.quick:
        images, model, batch, size, limit, procs = "32", "resnet18", "8", "64", 300, ["--processes", "2"]
        workers = ["--decode-workers", "1"]
        decoding = ["--images", "64", "--size", "64", "--batch-size", "8", "--threads", "2", "--workers", "1",
                    "--repeats", "1"]
        autocast = ["--models", "resnet18", "--batch", "2", "--size", "64", "--repeats", "1"]
        fusion = ["--models", "convnext_tiny", "--batch", "1", "--size", "64", "--repeats", "1"]
    else:
        images, model, batch, size, limit, procs = "1024", "resnet50", "64", "224", 70, ["--processes", "2", "4"]
        workers = ["--decode-workers", "4", "8"]
        decoding = ["--images", "1024", "--workers", "4", "8", "12", "--repeats", "2"]
        autocast = ["--device", "cuda", "--batch", "64", "--repeats", "5", "--composites", "epsilon_plus",
                    "epsilon_gamma_box"]
        fusion = ["--device", "cuda", "--batch", "32", "--repeats", "5", "--models", "convnext_tiny", "maxvit_t",
                  "swin_t", "resnext50_32x4d"]
    pipeline = ["benchmarks/bench_pipeline.py", "--in-process", "--images", images, "--size", size, "--model", model,
                "--format", "jpg", "--batch-size", batch, "--cpus-per-actor", cpus]
    zoo = (["--models", "resnext50_32x4d", "vit_b_16", "--batch", "1", "--repeats", "1", "--no-memory"]
           if args.quick else ["--device", "cuda", "--batch", "32", "--repeats", "3"])
    deadline = STARTED + args.budget

    def step(title: str, step_args: list[str], limit: float) -> None:
        run_step(title, step_args, min(limit, deadline - time.perf_counter()))

    print(f"# GPU check (issues 13, 15), {time.strftime('%Y-%m-%d %H:%M:%S')}, budget {args.budget:.0f} s")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], check=False)

    def cap(seconds: float) -> float:  # a step's own limit on the GPU; --quick gives every step the same one
        return limit if args.quick else seconds

    step("0. decode workers: one actor vs bare engine, 500x375 JPEGs (VOC size)",
         [*pipeline, "--image-size", "500", "375", "--decode", "cpu", *workers], cap(120))
    step("0. decode workers: the decoding side alone", ["benchmarks/bench_decode_workers.py", *decoding], cap(60))
    step("0. decode workers: one actor vs bare engine, 224 px JPEGs", [*pipeline, "--decode", "cpu", *workers],
         cap(100))
    step("1. actor vs bare engine, 224 px JPEGs, decode auto", [*pipeline, "--decode", "auto"], limit)
    step("4. the zoo: forward, input gradient, ours, zennit, lxt", ["benchmarks/bench_zoo.py", *zoo], cap(150))
    step("1. actor vs bare engine, 500x375 JPEGs (VOC size), decode auto",
         [*pipeline, "--image-size", "500", "375", "--decode", "auto", *procs], cap(100))
    step("2. nvJPEG vs CPU decode: relevance difference",
         ["benchmarks/gpu_check.py", "--decode-difference", "64" if args.quick else "512", "375", "500", model, batch],
         cap(60))
    step("3. reduced-precision forward: error and speed", ["benchmarks/bench_autocast.py", *autocast], cap(80))
    step("5. the epsilon stabilizer fused (Triton) against eager", ["benchmarks/bench_fused_divide.py", *fusion],
         cap(90))


if __name__ == "__main__":
    main()
