"""End-to-end images/s of the explain job (local Ray, CPU) against the bare engine, side by side in one run.

The bare engine loops over the same images, already decoded and preprocessed, in this process with
all cores; the job reads and decodes the images itself, explains them in Ray actors and writes the Zarr
store. Both use the same model, composite and batch size. Target: job >= 85% of the bare engine.

    .venv/bin/python benchmarks/bench_pipeline.py --images 8192 --size 64 --engine-threads 1

``--in-process`` drives one explain actor (the class the Ray pool runs) in this process, without Ray, on the GPU when
there is one: it shows whether the actor's decoding and store writes keep a GPU busy.

    python benchmarks/bench_pipeline.py --in-process --images 4096 --size 224 --model resnet50 --format jpg \
        --batch-size 64 --cpus-per-actor 8

``--scaling`` starts a Ray cluster of one raylet per core on loopback (``ray start --head`` and ``ray start
--address``, one CPU each, their own ``--temp-dir``) and runs the job with 1, 2, ... actors, one CPU each: images/s
against the number of actors, beside the bare engine on one thread times the actors (perfect scaling). It shows
whether the driver (one process planning and dispatching for all actors) or the store bounds the job.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --scaling --images 768 --size 64 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, count: int, size: int, classes: int, suffix: str = "png",
                width: int | None = None) -> None:
    """``count`` images ``size`` high and ``width`` (default 1.25 ``size``) wide, in ``classes`` folders."""
    rng = np.random.default_rng(0)
    width = width or size + size // 4
    base = rng.integers(0, 256, (size // 8, width // 8, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth images with some noise: photo-like file sizes for JPEG (pure noise would be incompressible)
        image = Image.fromarray(np.roll(base, i, axis=1)).resize((width, size), Image.BILINEAR)
        pixels = np.asarray(image, np.int16) + rng.integers(-12, 13, (size, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.{suffix}", quality=90)


def bare_engine(config, batch_size: int, threads: int) -> tuple[float, int]:
    """The engine alone: decoded inputs in memory, one process, ``threads`` torch threads."""
    import lrp
    from pipeline.datasets import load_index, read_image
    from pipeline.models import best_device, build_model
    from pipeline.preprocess import Preprocess

    index = load_index(config.dataset.source)
    preprocess = Preprocess(config.preprocess)
    inputs = torch.stack([preprocess(read_image(p))[0] for p in index.samples["path"].to_pylist()])
    labels = torch.as_tensor(index.samples["label"].to_numpy().copy())
    device = best_device()
    model = build_model(config.model, device)
    setting = config.explanations[0]
    explainer = lrp.Explainer(model, setting.composite, tf32=config.tf32, autocast=config.autocast, **setting.params)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    explainer(inputs[:batch_size].to(device), labels[:batch_size].to(device))  # warm-up
    began = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].to(device)
        result = explainer(batch, labels[start:start + batch_size].to(device))
        result.relevance.sum(1).cpu().numpy()
    return time.perf_counter() - began, len(inputs)


def actor_in_process(config, part: int = 0, parts: int = 1, overlap: bool = True) -> tuple[float, float, int]:
    """(seconds with start-up, seconds of shard work, rows): the explain actor driven here, without Ray, over every
    ``parts``-th shard from ``part`` (one writer per shard, as with Ray); ``overlap=False``: the sequential loop."""
    from pipeline.actors import ExplainActor
    from pipeline.run import create_store, plan_run

    began = time.perf_counter()
    plan = plan_run(config)
    store = create_store(plan)
    actor = ExplainActor(plan.job)
    actor.overlap = overlap
    if actor.workers is not None:
        actor.workers.start(wait=True)  # started beside the model load; the shard work is timed without it
    work, rows = 0.0, 0
    for shard in range(part, store.n_shards, parts):
        start, stop = store.shard_rows(shard)
        report = actor.explain_shard(start, plan.rows.slice(start, stop - start), store.group_names)
        assert report["failed"] == report["nonfinite"] == 0, report
        work, rows = work + report["seconds"], rows + report["rows"]
    if actor.workers is not None:
        actor.workers.close()
    return time.perf_counter() - began, work, rows


def actors_in_processes(config, processes: int) -> tuple[float, float]:
    """(images/s wall clock with start-up, sum of the processes' shard-work rates): ``processes`` actors on one
    device, each its own process (its own GIL), as Ray runs ``actors_per_gpu`` actors."""
    import multiprocessing

    from pipeline.run import create_store, plan_run

    create_store(plan_run(config))  # before the workers, which reopen it
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(actor_in_process, [(config, part, processes) for part in range(processes)])
    wall = time.perf_counter() - began
    return sum(rows for _, _, rows in results) / wall, sum(rows / work for _, work, rows in results if work)


def run_values(args, root: Path, **extra) -> dict:
    """The run config of the benchmark, without its store."""
    return {
        "dataset": str(root / "data"),
        "model": {"name": args.model, "kwargs": {"num_classes": 10}},
        "preprocess": {"resize": args.size, "pad_to_square": True},
        "explanations": [args.composite], "tf32": args.tf32, "decode": args.decode, "autocast": args.autocast,
        "batch_size": args.batch_size, "rows_per_shard": 4 * args.batch_size, "progress": False,
        "targets": args.targets, **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="image height in pixels (model input size)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--composite", default="epsilon_plus")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="explain actors (CPUs split evenly)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate engine and job runs, keep the best of each")
    parser.add_argument("--engine-threads", type=int, nargs="+", help="torch threads of the bare engine "
                        "(default: 1 and all cores; the best is the baseline)")
    parser.add_argument("--format", choices=["png", "jpg"], default="png", help="image files to generate")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"),
                        help="generated images W x H, resized to --size (default: --size high, 1.25x wide); "
                             "500 375 is a Pascal VOC image")
    parser.add_argument("--in-process", action="store_true",
                        help="one explain actor in this process (GPU if any) instead of the Ray job")
    parser.add_argument("--cpus-per-actor", type=int, help="with --in-process: the actor's decoding threads (<= 4)")
    parser.add_argument("--targets", choices=["label", "prediction"], default="label",
                        help="what the job explains (the bare engine always explains the labels)")
    parser.add_argument("--tf32", action="store_true", help="GPU: TF32 convolutions for engine and actor")
    parser.add_argument("--decode", choices=["cpu", "auto"], default="cpu", help="the actors' decode option "
                        "(auto: nvJPEG on a GPU actor; the bare engine's inputs are always decoded on the CPU)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="reduced-precision forward, both sides")
    parser.add_argument("--processes", type=int, nargs="+", default=[],
                        help="with --in-process: also K actors in K processes sharing the device, for each K")
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[],
                        help="with --in-process: also the actor with K decoding processes (decode_workers), "
                             "for each K (below --cpus-per-actor)")
    parser.add_argument("--scaling", action="store_true", help="images/s against 1..--actors actors (default: the "
                        "cores), on a cluster of one single-CPU raylet per actor on loopback")
    args = parser.parse_args()

    from pipeline.config import config_from_dict
    from pipeline.run import run

    cpus = os.cpu_count() or 1
    if args.in_process:
        return main_in_process(args, cpus, config_from_dict)
    if args.scaling:
        return main_scaling(args, config_from_dict, run)
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", args.images, _image_size(args)[0], 10, args.format, width=_image_size(args)[1])
        values = run_values(args, root, num_actors=args.actors, cpus_per_actor=max(1, cpus // args.actors))
        engine, job, steady = {threads: [] for threads in args.engine_threads or [1, cpus]}, [], []
        for repeat in range(args.repeats):
            for threads in engine:  # the stronger of one thread and all cores is the baseline
                seconds, count = bare_engine(config_from_dict({**values, "store": str(root / "unused")}),
                                             args.batch_size, threads)
                engine[threads].append(count / seconds)
            config = config_from_dict({**values, "store": str(root / f"run{repeat}.zarr")})
            began = time.perf_counter()
            summary = run(config)
            total = time.perf_counter() - began
            assert summary.exit_code == 0, summary.format()
            job.append(summary.rows / total)
            steady.append(summary.computed_rows / summary.seconds)
    best = {threads: max(rates) for threads, rates in engine.items()}
    best_engine, best_job, best_steady = max(best.values()), max(job), max(steady)
    print(f"machine: {platform.processor() or platform.machine()}, {cpus} cores, torch {torch.__version__}")
    print(f"{args.images} images {args.size}x{args.size + args.size // 4} -> {args.size}x{args.size}, {args.model}, "
          f"{args.composite}, batch {args.batch_size}, {args.actors} actor(s) x {max(1, cpus // args.actors)} CPU")
    print(f"| {'what':<44} | {'images/s':>9} | {'vs engine':>9} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|")
    for threads, rate in best.items():
        label = f"bare engine, decoded inputs, {threads} thread(s)"
        print(f"| {label:<44} | {rate:9.1f} | {rate / best_engine:9.0%} |")
    print(f"| {'explain job, end to end (plan+actors+store)':<44} | {best_job:9.1f} | {best_job / best_engine:9.0%} |")
    print(f"| {'explain job, after actors are up':<44} | {best_steady:9.1f} | {best_steady / best_engine:9.0%} |")



def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(address: str, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until the head's GCS accepts connections (a loaded machine takes its time)."""
    host, port = address.rsplit(":", 1)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head ended: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the head did not listen on {address} within {timeout:.0f} s")


@contextmanager
def loopback_cluster(raylets: int, temp: Path):
    """A Ray cluster of ``raylets`` nodes of one CPU each on this machine; yields its address. Each ``ray start``
    runs with ``--block`` and is stopped by SIGTERM (``ray stop`` would stop every Ray process of the machine)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    address = f"127.0.0.1:{_free_port()}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--block"]
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback benchmark cluster: no token for the driver to find
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    nodes = []
    try:
        for k in range(raylets):
            where = ["--head", "--port", address.rsplit(":", 1)[1], "--include-dashboard", "false"] if k == 0 else \
                ["--address", address]
            folder = temp / f"n{k}"  # short: Ray's socket paths live under it
            with open(temp / f"n{k}.log", "w") as log:
                nodes.append(subprocess.Popen([ray_cli, "start", *where, *common, "--temp-dir", str(folder),
                                               "--dashboard-agent-listen-port", str(_free_port())], env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
            if k == 0:
                _wait_for_port(address, nodes[0], temp / "n0.log")
        yield address
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            node.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def main_scaling(args, config_from_dict, run) -> None:
    """The job with 1..``args.actors`` single-CPU actors, one raylet each, against the one-thread engine times k."""
    import ray

    counts = list(range(1, args.actors + 1))
    temp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    with tempfile.TemporaryDirectory() as tmp, loopback_cluster(args.actors, temp) as address:
        root = Path(tmp)
        make_images(root / "data", args.images, _image_size(args)[0], 10, args.format, width=_image_size(args)[1])
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        began = time.monotonic()
        while ray.cluster_resources().get("CPU", 0) < args.actors and time.monotonic() - began < 120:
            time.sleep(0.5)
        raylets = sum(1 for node in ray.nodes() if node["Alive"])
        values = run_values(args, root, address=address, cpus_per_actor=1)
        engine, job, driver = [], {k: [] for k in counts}, {k: [] for k in counts}
        for repeat in range(args.repeats):  # alternated, the best of each kept
            seconds, count = bare_engine(config_from_dict({**values, "store": str(root / "unused")}),
                                         args.batch_size, 1)
            engine.append(count / seconds)
            for k in counts:
                cpu, wall = time.process_time(), time.perf_counter()
                summary = run(config_from_dict({**values, "num_actors": k, "store": str(root / f"r{k}-{repeat}.zarr")}))
                assert summary.exit_code == 0, summary.format()
                job[k].append(summary.computed_rows / summary.seconds)
                driver[k].append((time.process_time() - cpu) / (time.perf_counter() - wall))
        ray.shutdown()
    best, rates = max(engine), {k: max(r) for k, r in job.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{raylets} raylets of 1 CPU on loopback")
    print(f"{args.images} images -> {args.size}x{args.size}, {args.model}, {args.composite}, batch {args.batch_size}, "
          f"shards of {4 * args.batch_size} rows; rates after the actors are up")
    print("| actors | images/s | per actor | vs 1 actor x k | vs 1-thread engine x k | driver CPU / wall |")
    print("|---|---|---|---|---|---|")
    for k, rate in rates.items():
        print(f"| {k} | {rate:.1f} | {rate / k:.1f} | {rate / (k * rates[1]):.0%} | {rate / (k * best):.0%} | "
              f"{min(driver[k]):.0%} |")
    print(f"| bare engine, 1 thread, decoded inputs | {best:.1f} | | | | |")


def _image_size(args) -> tuple[int, int]:
    """(height, width) of the generated images."""
    if args.image_size:
        return args.image_size[1], args.image_size[0]
    return args.size, args.size + args.size // 4


def main_in_process(args, cpus: int, config_from_dict) -> None:
    from pipeline.models import best_device

    device = best_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpus}-core CPU"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", args.images, _image_size(args)[0], 10, args.format, width=_image_size(args)[1])
        values = run_values(args, root, cpus_per_actor=args.cpus_per_actor or cpus)
        engine, total, work, sequential = [], [], [], []
        shared = {k: ([], []) for k in args.processes}
        workers = {k: [] for k in args.decode_workers}
        for repeat in range(args.repeats):
            seconds, count = bare_engine(config_from_dict({**values, "store": str(root / "unused")}),
                                         args.batch_size, cpus)
            engine.append(count / seconds)
            config = config_from_dict({**values, "store": str(root / f"r{repeat}.zarr")})
            all_in, shards, rows = actor_in_process(config)
            total.append(rows / all_in)
            work.append(rows / shards)
            _, shards, rows = actor_in_process(config_from_dict({**values, "store": str(root / f"s{repeat}.zarr")}),
                                               overlap=False)
            sequential.append(rows / shards)
            for k, rates in workers.items():
                _, shards, rows = actor_in_process(config_from_dict({**values, "decode_workers": k,
                                                                     "store": str(root / f"w{k}-{repeat}.zarr")}))
                rates.append(rows / shards)
            for k, (walls, sums) in shared.items():
                per_process = {**values, "cpus_per_actor": max(1, values["cpus_per_actor"] // k)}
                wall, summed = actors_in_processes(config_from_dict({**per_process,
                                                                     "store": str(root / f"p{k}-{repeat}.zarr")}), k)
                walls.append(wall), sums.append(summed)
    best = max(engine)
    print(f"device: {name}, torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}, decode {args.decode}, "
          f"autocast {args.autocast or 'off'}")
    height, width = _image_size(args)
    print(f"{args.images} {args.format} images {width}x{height} -> {args.size}x{args.size}, targets {args.targets}, "
          f"{args.model}, {args.composite}, batch {args.batch_size}, decoding threads "
          f"{min(4, max(2, values['cpus_per_actor']))}")
    print(f"| {'what':<52} | {'images/s':>9} | {'vs engine':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 11}|")
    rows = [("bare engine, decoded inputs in memory", best),
            ("actor in-process, plan + model load + shards", max(total)),
            ("actor in-process, shard work, overlapped stages", max(work)),
            ("actor in-process, shard work, sequential (before)", max(sequential))]
    rows += [(f"actor in-process, shard work, {k} decode worker(s)", max(rates)) for k, rates in workers.items()]
    for k, (walls, sums) in shared.items():
        rows += [(f"{k} actor processes, wall clock with start-up", max(walls)),
                 (f"{k} actor processes, sum of shard-work rates", max(sums))]
    for what, rate in rows:
        print(f"| {what:<52} | {rate:9.1f} | {rate / best:9.0%} |")


if __name__ == "__main__":
    main()
