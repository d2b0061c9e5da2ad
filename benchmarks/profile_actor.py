"""Where an explain actor's time goes: decoding, the engine and the store writes, each timed alone, then together.

Generates JPEGs, then prints images/s of (1) reading + preprocessing with 1..N threads, (2) the engine on decoded
inputs, (3) writing shards to the store, and (4) the actor doing all three, with a cProfile of the actor's thread.

    python benchmarks/profile_actor.py --images 1024 --size 224 --model resnet50 --batch-size 64 --threads 4 8 16
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import actor_in_process, bare_engine, make_images, run_values  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--composite", default="epsilon_plus")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tf32", action="store_true")
    args = parser.parse_args()

    from pipeline.config import config_from_dict
    from pipeline.datasets import load_index, read_image
    from pipeline.preprocess import Preprocess
    from pipeline.run import create_store, plan_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", args.images, args.size, 10, "jpg")
        values = run_values(args, root, cpus_per_actor=max(args.threads))
        config = config_from_dict({**values, "store": str(root / "a.zarr")})
        paths = load_index(config.dataset.source).samples["path"].to_pylist()
        preprocess = Preprocess(config.preprocess)
        rates = {}
        cores = torch.get_num_threads()
        for torch_threads in (cores, 1):  # torch's default, and one intra-op thread per decoder (a GPU actor's)
            torch.set_num_threads(torch_threads)
            for threads in args.threads:
                began = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda p: preprocess(read_image(p)), paths))
                rates[f"read + preprocess, {threads} x {torch_threads} torch thread(s)"] = \
                    len(paths) / (time.perf_counter() - began)
        torch.set_num_threads(cores)
        began = time.perf_counter()
        list(map(read_image, paths))
        rates["read (decode) only, 1 thread"] = len(paths) / (time.perf_counter() - began)

        seconds, count = bare_engine(config, args.batch_size, torch.get_num_threads())
        rates["engine, decoded inputs"] = count / seconds

        plan = plan_run(config_from_dict({**values, "store": str(root / "w.zarr")}))
        store = create_store(plan)
        group = store.group(store.group_names[0])
        began = time.perf_counter()
        for shard in range(store.n_shards):
            start, stop = store.shard_rows(shard)
            n = stop - start
            rows = plan.rows.slice(start, n).to_pydict()
            relevance = np.random.default_rng(shard).standard_normal((n, args.size, args.size), np.float32)
            group.write_block(start, relevance=relevance, status=np.zeros(n, np.int8), output=np.ones(n),
                              relevance_sum=np.ones(n), target=np.asarray(rows["target"]), label=rows["label"],
                              prediction=np.asarray(rows["target"]), sample_id=rows["sample_id"], path=rows["path"],
                              error=[""] * n)
        rates["store writes (random relevance)"] = plan.rows.num_rows / (time.perf_counter() - began)

        profiler = cProfile.Profile()
        profiler.enable()
        total, work, rows = actor_in_process(config)
        profiler.disable()
        rates["actor: decode + explain + write"] = rows / work

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}, "
          f"{args.images} jpg {args.size}x{args.size + args.size // 4}, {args.model}, {args.composite}, "
          f"batch {args.batch_size}")
    print(f"| {'stage':<52} | {'images/s':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|")
    for what, rate in rates.items():
        print(f"| {what:<52} | {rate:9.1f} |")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue())


if __name__ == "__main__":
    main()
