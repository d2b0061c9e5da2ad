"""``lrp-audit explain``: explain every image of a dataset into a Zarr relevance store on a Ray cluster.

Flags, a YAML ``--config`` file, or both (flags win). The same module runs on a laptop (a local Ray
cluster is started) and on a cluster (``--address`` / ``RAY_ADDRESS``, which ``ray job submit`` sets)::

    lrp-audit explain --dataset data/images --model resnet18 --weights DEFAULT --from-weights \\
        --composite epsilon:epsilon=0.01 --composite epsilon:epsilon=100 --store runs/r18.zarr
    ray job submit --working-dir . -- python -m jobs.explain --config run.yaml

The exit status is 0 when every row is ok, 1 when rows failed (listed in the summary), 2 on a config error.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import TARGET_MODES, ConfigError, config_from_dict, load_yaml


#: explain options that the evaluation parses (to reject them with a clear message) but hides
EXPLAIN_ONLY = ("per_channel", "retry_failed", "decode_workers")
TARGETS_HELP = ("auto (true label(s), default), label, prediction, classes (with --classes), "
                "labels (every label of a multi-label image)")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", help="ImageFolder root, manifest .parquet/.csv, or VOC root (path or fsspec URL)")
    data.add_argument("--dataset-kind", choices=["auto", "imagefolder", "manifest", "voc"])
    data.add_argument("--split", help="VOC split (ImageSets/Main/<split>.txt)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="torchvision model name, e.g. vgg16, resnet50")
    model.add_argument("--factory", help="custom model as package.module:function (instead of --model)")
    model.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1) or a state_dict file")
    model.add_argument("--model-kwargs", type=json.loads, help='JSON constructor kwargs, e.g. \'{"num_classes": 3}\'')
    model.add_argument("--class-names", help="file with one class name per line (or a JSON list)")


def add_preprocess_options(parser: argparse.ArgumentParser) -> None:
    pre = parser.add_argument_group("preprocessing")
    pre.add_argument("--from-weights", action="store_true", default=None,
                     help="use the torchvision weights' own resize/crop/normalize")
    pre.add_argument("--resize", type=int, nargs="+", help="shorter side, or height width")
    pre.add_argument("--center-crop", type=int, nargs="+", help="crop size, or height width")
    pre.add_argument("--pad-to-square", action="store_true", default=None,
                     help="edge-pad to a square instead of cropping (Binder et al. 2016, sec. 4)")
    pre.add_argument("--mean", type=float, nargs=3)
    pre.add_argument("--std", type=float, nargs=3)


def add_target_options(parser: argparse.ArgumentParser, *, composite_help: str | None = None,
                       targets_help: str = TARGETS_HELP, hide_explain_only: bool = False) -> None:
    """--composite, --targets, --classes, --per-channel; another job rewords what it means by them."""
    what = parser.add_argument_group("what to explain")
    what.add_argument("--composite", action="append", dest="explanations", metavar="NAME[:KEY=VALUE,...]",
                      help=composite_help or "composite and parameters, repeatable: each goes to its own store "
                                             "group, e.g. epsilon:epsilon=0.01 alpha_beta:alpha=1,beta=0")
    what.add_argument("--targets", choices=TARGET_MODES, help=targets_help)
    what.add_argument("--classes", help="comma-separated class indices or names for --targets classes")
    what.add_argument("--per-channel", action="store_true", default=None,
                      help=argparse.SUPPRESS if hide_explain_only else "also store (N,C,H,W) relevance")


def add_run_options(parser: argparse.ArgumentParser, *, store_help: str | None = None,
                    hide_explain_only: bool = False, rows_per_shard: int = 256) -> None:
    """Output store, cluster and actor options, as explain uses them (``rows_per_shard``: the job's default)."""
    run = parser.add_argument_group("run")
    run.add_argument("--store", help=store_help or "output Zarr store: path or fsspec URL (s3://...)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--num-actors", type=int, help="default: --actors-per-gpu per GPU, else CPUs / --cpus-per-actor")
    run.add_argument("--actors-per-gpu", type=int,
                     help="actor processes sharing each GPU (default 1; 2-4 keep a fast GPU busy, memory allowing)")
    run.add_argument("--cpus-per-actor", type=int)
    run.add_argument("--decode-workers", type=int,
                     help=argparse.SUPPRESS if hide_explain_only else "processes per actor that decode and preprocess "
                     "(default 0: threads in the actor), fewer than --cpus-per-actor; see docs/pipeline.md")
    run.add_argument("--rows-per-shard", type=int, help=f"rows per store shard = per task (default {rows_per_shard})")
    run.add_argument("--max-attempts", type=int, help="tries per shard when an actor dies (default 3)")
    run.add_argument("--retry-failed", action="store_true", default=None,
                     help=argparse.SUPPRESS if hide_explain_only else "also redo failed/nonfinite rows")
    run.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                     help="GPU actors even if no GPU is up yet (autoscaling clusters)")
    run.add_argument("--cpu", dest="use_gpu", action="store_false", help="CPU actors even on a GPU cluster")
    run.add_argument("--tf32", action="store_true", default=None,
                     help="GPU: TF32 convolutions, faster on Ampere and later (benchmarks/RESULTS.md) "
                          "but ~1e-3 relative error "
                          "(default: full float32)")
    run.add_argument("--autocast", choices=["bfloat16", "float16"],
                     help="forward pass in reduced precision (relevance still float32; error in benchmarks/RESULTS.md)")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A job's parser with --config and the dataset, model and preprocessing options every job reads alike."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (see docs/pipeline.md); flags override its keys")
    add_dataset_options(p)
    add_model_options(p)
    add_preprocess_options(p)
    return p


def parser() -> argparse.ArgumentParser:
    p = base_parser("lrp-audit explain", __doc__.split("\n\n")[0])
    add_target_options(p)
    add_run_options(p)
    return p


def config_values(args: argparse.Namespace) -> dict:
    """YAML values with the given flags layered on top."""
    values = load_yaml(args.config) if args.config else {}
    model = values.get("model") or {}
    model = {"name": model} if isinstance(model, str) else dict(model)
    if args.model or args.factory:
        model.pop("name", None), model.pop("factory", None)
    for key, flag in (("name", args.model), ("factory", args.factory), ("weights", args.weights),
                      ("kwargs", args.model_kwargs), ("class_names", args.class_names)):
        if flag is not None:
            model[key] = flag
    if model:
        values["model"] = model
    dataset = values.get("dataset") or {}
    dataset = {"source": dataset} if isinstance(dataset, str) else dict(dataset)
    for key, flag in (("source", args.dataset), ("kind", args.dataset_kind), ("split", args.split)):
        if flag is not None:
            dataset[key] = flag
    if dataset:
        values["dataset"] = dataset
    preprocess = dict(values.get("preprocess") or {})
    for key, flag in (("from_weights", args.from_weights), ("resize", args.resize), ("center_crop", args.center_crop),
                      ("pad_to_square", args.pad_to_square), ("mean", args.mean), ("std", args.std)):
        if flag is not None:
            preprocess[key] = flag
    if preprocess:
        values["preprocess"] = preprocess
    for key in ("explanations", "targets", "classes", "per_channel", "store", "address", "batch_size", "num_actors",
                "actors_per_gpu", "cpus_per_actor", "decode_workers", "rows_per_shard", "max_attempts", "retry_failed",
                "progress", "tf32", "autocast"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return values


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.run import run  # imports ray and torch: after --help

    try:
        config = config_from_dict(config_values(args))
        summary = run(config, use_gpu=args.use_gpu)
    except ConfigError as error:
        print(f"lrp-audit explain: configuration error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
