"""``lrp-audit evaluate``: region-perturbation evaluation (AOPC) of explanation methods on a Ray cluster.

Dataset, model, preprocessing, targets and cluster flags are those of ``lrp-audit explain`` (the same YAML
``--config`` works; an ``evaluation:`` mapping in it holds the keys below), plus::

    lrp-audit evaluate --dataset data/images --model resnet18 --weights DEFAULT --from-weights \\
        --method epsilon_plus --method gradient --region-size 9 --steps 100 --perturbation uniform \\
        --sample 500 --out runs/r18.evaluation
    ray job submit --working-dir . -- python -m jobs.evaluate --config run.yaml

Writes per-(image, method) curves and ``aopc.parquet`` / ``aopc_curves.parquet`` (docs/evaluate.md), and
prints the AOPC table. Exit status: 0 when every curve is ok, 1 when some failed or are missing, 2 on a
config error.
"""
from __future__ import annotations

import argparse
import sys

from jobs.explain import EXPLAIN_ONLY, add_run_options, add_target_options, base_parser, config_values
from pipeline.config import EVALUATION_ROWS_PER_SHARD, ConfigError


def _steps(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes a number of regions or 'all', not {text!r}") from None


def _level(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--level is a probability between 0 and 1 (e.g. 0.95), not {text}")
    return value


def _resamples(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--resamples must be at least 1, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = base_parser("lrp-audit evaluate", __doc__.split("\n\n")[0])
    add_target_options(p, composite_help="method to evaluate (same as --method)",
                       targets_help="prediction (default: the class the model chose), auto (true label(s)), label, "
                                    "classes (with --classes), labels (every label of a multi-label image)",
                       hide_explain_only=True)
    add_run_options(p, store_help="the explain run's store: the default --out is beside it (<store>.evaluation)",
                    hide_explain_only=True, rows_per_shard=EVALUATION_ROWS_PER_SHARD)
    e = p.add_argument_group("evaluation (region perturbation, AOPC)")
    e.add_argument("--out", help="output directory or URL for curves and AOPC tables")
    e.add_argument("--method", action="append", dest="explanations", metavar="NAME[:KEY=VALUE,...]",
                   help="repeatable: an LRP composite or a baseline (gradient, gradient_x_input, deconvnet); "
                        "'random' is always added. Default: epsilon_plus, epsilon_alpha2_beta1, epsilon_gamma_box, "
                        "gradient, gradient_x_input, deconvnet")
    e.add_argument("--region-size", type=int, help="side of the square regions in pixels (default 9)")
    e.add_argument("--steps", type=_steps, help="regions perturbed one after another, L (default 100; 'all')")
    e.add_argument("--perturbation", choices=["uniform", "blur", "mean", "constant"],
                   help="what replaces a region: uniform noise in the input range (default), a blurred copy, "
                        "the image mean, or --value")
    e.add_argument("--value", type=float, help="the constant of --perturbation constant")
    e.add_argument("--blur-sigma", type=float, help="Gaussian sigma of --perturbation blur (default region-size/2)")
    e.add_argument("--low", type=float, nargs="+", help="uniform noise range, per channel or one value "
                   "(default: the normalized range of [0, 1] pixels)")
    e.add_argument("--high", type=float, nargs="+")
    e.add_argument("--score", choices=["logit", "softmax"], help="f: the target's logit (default) or probability")
    e.add_argument("--sample", type=int, dest="sample_size", help="evaluate a random sample of this many rows")
    e.add_argument("--seed", type=int, help="seed of the sample, the noise and the random order (default 0)")
    e.add_argument("--forward-batch", type=int, help="perturbed images per model forward (default 256)")
    e.add_argument("--reduction", action="append", metavar="METHOD=REDUCTION",
                   help="how a method's channels become pixel scores: sum, max_abs, l2 (default: max_abs for "
                        "gradient and deconvnet, sum otherwise)")
    e.add_argument("--ci", choices=["bootstrap", "t"], default="bootstrap", help="confidence intervals of AOPC")
    e.add_argument("--level", type=_level, default=0.95, help="confidence level (default 0.95)")
    e.add_argument("--resamples", type=_resamples, default=2000, help="bootstrap resamples (default 2000)")
    return p


def evaluation_values(args: argparse.Namespace) -> dict:
    """explain's values (YAML + flags) with the ``evaluation`` mapping filled in from the flags."""
    given = [f"--{name.replace('_', '-')}" for name in EXPLAIN_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} is an explain option; lrp-audit evaluate does not use it")
    values = config_values(args)
    for name in EXPLAIN_ONLY:
        values.pop(name, None)
    section = dict(values.get("evaluation") or {})
    flags = dict(out=args.out, region_size=args.region_size, perturbation=args.perturbation, value=args.value,
                 blur_sigma=args.blur_sigma, low=args.low, high=args.high, score=args.score, seed=args.seed,
                 forward_batch=args.forward_batch, sample_size=args.sample_size)
    section.update({key: value for key, value in flags.items() if value is not None})
    if args.steps is not None:
        section["steps"] = None if args.steps == "all" else args.steps
    for item in args.reduction or []:
        method, sep, reduction = item.partition("=")
        if not sep:
            raise ConfigError(f"--reduction {item!r}: write METHOD=REDUCTION, e.g. gradient=l2")
        section.setdefault("reductions", {})[method.strip()] = reduction.strip()
    if not section.get("out"):
        if not values.get("store"):
            raise ConfigError("give --out (the output directory), or --store of the explain run to write beside it")
        from aggregations.aopc import default_evaluation_dir

        section["out"] = default_evaluation_dir(values["store"])
    values["evaluation"] = section
    return values


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from aggregations.aopc import aggregate_evaluation  # imports torch and matplotlib: after --help
    from pipeline.evaluation import config_from_values, evaluate

    try:
        config = config_from_values(evaluation_values(args))
        summary = evaluate(config, use_gpu=args.use_gpu)
    except ConfigError as error:
        print(f"lrp-audit evaluate: configuration error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    if summary.counts.get("ok"):
        result = aggregate_evaluation(config.out, ci=args.ci, level=args.level, resamples=args.resamples,
                                      seed=config.perturbation.seed, storage_options=config.run.storage_options)
        print(result.format())
        print(f"written: {config.out}/aopc.parquet, {config.out}/aopc_curves.parquet")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
