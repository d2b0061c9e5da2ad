"""``lrp-audit demo``: the whole audit on a generated dataset with a planted Clever-Hans cue.

Generate images where most of one class carry a small "(C)" stamp in a corner (like the copyright tag
on PASCAL horse images, Binder et al. 2016, Fig. 4); train a tiny CNN on them in-process (it learns the
shortcut: see its accuracy with and without the stamp); explain the held-out audit split through the
real Ray pipeline with several LRP settings; aggregate with Dask; render the HTML report. A second
model trained on stamp-free images is explained too, for the report's model comparison. Prints where
the report is and the headline finding::

    lrp-audit demo --out demo-out          # its timings: benchmarks/RESULTS.md
    lrp-audit demo --out /tmp/d --quick    # smaller and faster (used by the tests)

The demo replaces its own outputs in ``--out`` (data/, models/, *.zarr, *.aggregates, report.html) and
refuses a non-empty folder that is not its own (no ``.lrp-audit-demo`` marker). Exit status 0 when the
audit flags the tagged class for a cue at the stamp, 1 when it does not, 2 for a bad ``--out`` or config.

The demo's own pieces live here, off the production path: ``synthetic`` (the generated dataset) and
``tinycnn`` (the model and its training loop); ``main`` runs the steps below in order.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

SWEEP = [  # the primary setting first; then Figs. 4-5 of Binder et al. 2016 (eps 0.01 vs 100, beta 0 vs -1)
    {"name": "epsilon_plus", "composite": "epsilon_plus"},
    {"name": "epsilon_0.01", "composite": "epsilon", "epsilon": 0.01},
    {"name": "epsilon_100", "composite": "epsilon", "epsilon": 100.0},
    {"name": "alpha1_beta0", "composite": "alpha_beta", "alpha": 1.0, "beta": 0.0},
    {"name": "alpha2_beta1", "composite": "alpha_beta", "alpha": 2.0, "beta": 1.0},
]
MARKER = ".lrp-audit-demo"  # marks a folder as the demo's own, so that a rerun may replace its outputs
OUTPUTS = ("data", "models", "tagged.zarr", "tagged.aggregates", "clean.zarr", "clean.aggregates", "report.html",
           "demo.json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrp-audit demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    p.add_argument("--train-per-class", type=int, help="training images per class (default 250, --quick 150)")
    p.add_argument("--audit-per-class", type=int, help="audited images per class (default 60, --quick 30)")
    p.add_argument("--epochs", type=int, help="training epochs (default 10)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run: fewer images")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="explain with the primary LRP setting only (no epsilon / alpha-beta sweep)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the second model (trained without the stamp) and the model comparison")
    return p


def _accuracy_table(results: dict, class_names: list[str], tag_class: str) -> list[list[str]]:
    rows = []
    for model, splits in results.items():
        rows.append([f"{model}: all classes", *(f"{splits[s]['accuracy']:.0%}" for s in splits)])
        rows.append([f"{model}: class {tag_class}", *(f"{splits[s]['per_class'][tag_class]:.0%}" for s in splits)])
        rows.append([f"{model}: images predicted {tag_class}", *(f"{splits[s]['predicted_as'][tag_class]:.0%}"
                                                               for s in splits)])
    return rows


def tag_finding(aggregates_dir: str, group: str, tag_class: str, tag_box) -> dict:
    """Where the tag class's relevance lies: its share in the stamp box, and whether it is the top flagged class."""
    from aggregations.run import load

    aggregates = load(aggregates_dir)
    rows = sorted((r for r in aggregates.classes.to_pylist() if r["group"] == group), key=lambda r: r["bias_rank"])
    flagged = [r for r in rows if r["flagged"]]
    names = aggregates.summary["class_names"]
    positive = aggregates.heatmap(group, "target_positive", target=names.index(tag_class))
    x0, y0, x1, y1 = (int(v) for v in tag_box)
    share = float(positive[y0:y1, x0:x1].sum() / positive.sum()) if positive is not None and positive.sum() > 0 else 0.0
    area = (x1 - x0) * (y1 - y0) / positive.size if positive is not None else float("nan")
    top = flagged[0] if flagged else None
    return {"top_flagged": top["class_name"] if top else None, "flag": top["flag"] if top else "",
            "reason": top["reason"] if top else "", "flagged": [r["class_name"] for r in flagged],
            "tag_share": share, "tag_area": area,
            "spot_box": [top["spot_x0"], top["spot_y0"], top["spot_x1"], top["spot_y1"]] if top else None,
            "found": bool(top and top["class_name"] == tag_class and "cue" in top["flag"] and share > 0.25
                          and x0 - 1 <= top["spot_x0"] < top["spot_x1"] <= x1 + 1
                          and y0 - 1 <= top["spot_y0"] < top["spot_y1"] <= y1 + 1)}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.paths import path_problem

    problem = path_problem(args.out, "folder") or next(
        (f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
         for name in ("epochs", "train_per_class", "audit_per_class")
         if getattr(args, name) is not None and getattr(args, name) < 1), None)
    if problem is None and args.seed < 0:  # the data's random streams take non-negative seeds only
        problem = f"--seed must be >= 0, got {args.seed}"
    if problem:
        print(f"lrp-audit demo: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if not _claim_folder(out):
        return 2
    from jobs.demo import synthetic  # heavy imports after --help

    began = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - began:5.0f}s] {text}", flush=True)

    def given(value, default):
        return default if value is None else value

    spec = synthetic.SyntheticSpec(train_per_class=given(args.train_per_class, 150 if args.quick else 250),
                                   audit_per_class=given(args.audit_per_class, 30 if args.quick else 60),
                                   seed=args.seed)
    data = generate_data(out, spec, args.compare, step)
    models = {"tagged": "train"} | ({"clean": "train_clean"} if args.compare else {})
    accuracy = train_models(out, data, models, given(args.epochs, 10), args.seed, step)
    settings = SWEEP if args.sweep else SWEEP[:1]
    stores = {}
    for model_name in models:
        stores[model_name], status = explain_and_aggregate(out, data, model_name,
                                                           settings if model_name == "tagged" else settings[:1], step)
        if status:
            return status
    finding = tag_finding(str(out / "tagged.aggregates"), settings[0]["name"], spec.tag_class, data.tag_box)
    report = write_report(out, data, stores, finding, accuracy)
    (out / "demo.json").write_text(json.dumps({
        "report": report, "stores": stores, "tag_class": spec.tag_class, "tag_box": list(data.tag_box),
        "finding": finding, "accuracy": accuracy, "seconds": round(time.perf_counter() - began, 1),
    }, indent=2))
    step(f"report: {report}")
    return print_finding(finding, spec.tag_class, report)


def _claim_folder(out: Path) -> bool:
    """Make ``out`` the demo's folder and remove its old outputs; False (and a message) for a folder not its own."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        print(f"lrp-audit demo: {out} is not empty and not a demo folder (no {MARKER}); the demo replaces its "
              "data/ and models/ there: give a new or empty folder", file=sys.stderr)
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by lrp-audit demo: a rerun here replaces this folder's demo outputs\n")
    for name in OUTPUTS:  # start over: only the demo's own outputs are replaced
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return True


def generate_data(out: Path, spec, compare: bool, step: Callable[[str], None]):
    """Step 1: the images with the planted stamp (and the stamp-free training scenes for the comparison)."""
    from jobs.demo import synthetic

    splits = (*synthetic.DEFAULT_SPLITS, "train_clean") if compare else synthetic.DEFAULT_SPLITS
    step(f"generating {len(spec.classes)} classes, {spec.train_per_class} training and {spec.audit_per_class} audit "
         f"images per class; {spec.tag_rate:.0%} of class {spec.tag_class!r} carry the stamp at {spec.corner}")
    return synthetic.generate(out / "data", spec, splits=splits)


def train_models(out: Path, data, models: dict[str, str], epochs: int, seed: int,
                 step: Callable[[str], None]) -> dict:
    """Step 2: one tiny CNN per training split, saved to ``models/``; its accuracy with and without the stamp."""
    import torch

    from jobs.demo import tinycnn

    names, tag_class = data.class_names, data.spec.tag_class
    (out / "models").mkdir()
    accuracy = {}
    evaluation = {split: tinycnn.load_manifest(data.manifest(split), names) for split in ("audit", "clean", "swapped")}
    for model_name, split in models.items():
        step(f"training the tiny CNN '{model_name}' on {split} ({epochs} epochs, CPU)")
        images, labels = tinycnn.load_manifest(data.manifest(split), names)
        model = tinycnn.train(images, labels, len(names), epochs=epochs, seed=seed, device="cpu", log=None)
        torch.save(model.state_dict(), out / "models" / f"{model_name}.pt")
        accuracy[model_name] = {s: tinycnn.accuracy_report(tinycnn.predict(model, x), y, names)
                                for s, (x, y) in evaluation.items()}
        a = accuracy[model_name]
        step(f"  '{model_name}' accuracy: audit {a['audit']['accuracy']:.0%}, "
             f"stamp removed {a['clean']['accuracy']:.0%}, "
             f"stamp on the other classes {a['swapped']['accuracy']:.0%} "
             f"({a['swapped']['predicted_as'][tag_class]:.0%} of those predicted {tag_class!r})")
    return accuracy


def explain_and_aggregate(out: Path, data, model_name: str, explanations: list[dict],
                          step: Callable[[str], None]) -> tuple[str, int]:
    """Step 3: explain the audit split with one model on Ray, then aggregate with Dask: (store, exit status)."""
    from aggregations.run import aggregate
    from jobs.demo import tinycnn
    from pipeline.config import ConfigError, config_from_dict
    from pipeline.run import run

    names, spec = data.class_names, data.spec
    store = str(out / f"{model_name}.zarr")
    config = config_from_dict({
        "dataset": {"source": str(data.manifest("audit")), "kind": "manifest"},
        "model": {"factory": "jobs.demo.tinycnn:tiny_cnn", "weights": str(out / "models" / f"{model_name}.pt"),
                  "kwargs": {"num_classes": len(names)}, "class_names": names},
        "preprocess": {"resize": [spec.image_size, spec.image_size], "mean": list(tinycnn.MEAN),
                       "std": list(tinycnn.STD)},
        "explanations": explanations,
        "store": store, "targets": "label", "rows_per_shard": 64, "batch_size": 64,
        "progress": False,
    })
    step(f"explaining {len(names) * spec.audit_per_class} audit images with model '{model_name}' on Ray "
         f"({', '.join(s['name'] for s in explanations)})")
    try:
        summary = run(config)
    except ConfigError as error:
        print(f"lrp-audit demo: {error}", file=sys.stderr)
        return store, 2
    if not summary.complete:
        print(summary.format(), file=sys.stderr)
        return store, 1
    step(f"aggregating {store} with Dask")
    aggregate(store)
    return store, 0


def write_report(out: Path, data, stores: dict[str, str], finding: dict, accuracy: dict) -> str:
    """Step 4: the HTML report of the tagged model, with the shortcut table and the clean model beside it."""
    from aggregations.report import render_report

    spec, counts = data.spec, data.counts["audit"]
    notes = [{
        "title": "The planted cue and the model's dependence on it",
        "text": (f"{counts['tag_class_tagged']} of the {counts['tag_class_images']} audited "
                 f"'{spec.tag_class}' images (and {spec.tag_rate:.0%} of its training images) carry a '(C)' stamp at "
                 f"x {data.tag_box[0]}..{data.tag_box[2] - 1}, y {data.tag_box[1]}..{data.tag_box[3] - 1}; "
                 f"{finding['tag_share']:.0%} of the class's positive relevance lies on the stamp, which covers "
                 f"{finding['tag_area']:.0%} of the image. Accuracy on the same scenes with the stamp as in training, "
                 f"removed, and moved onto every other class:"),
        "header": ["model", "audit (as trained)", "stamp removed", "stamp on the other classes"],
        "rows": _accuracy_table(accuracy, data.class_names, spec.tag_class),
    }]
    return render_report(stores["tagged"], str(out / "report.html"), compare=stores.get("clean"),
                         title="lrp-audit demo: a planted Clever-Hans cue", notes=notes)


def print_finding(finding: dict, tag_class: str, report: str) -> int:
    """Step 5: the headline for the terminal; exit status 0 when the audit found the planted stamp."""
    if finding["top_flagged"]:
        print(f"Headline: class {finding['top_flagged']!r} is the top flagged class ({finding['flag']}): "
              f"{finding['reason']}")
    print(f"Planted cue: the '(C)' stamp on class {tag_class!r} holds {finding['tag_share']:.0%} of that class's "
          f"positive relevance while covering {finding['tag_area']:.0%} of the image.")
    if not finding["found"]:
        print(f"lrp-audit demo: the audit did not single out class {tag_class!r} at the stamp "
              f"(top flagged: {finding['top_flagged']}); see {report}", file=sys.stderr)
        return 1
    print(f"The audit found the planted shortcut. Open {report} in a browser.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
