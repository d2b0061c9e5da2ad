"""The report's evaluation section: AOPC per method as a figure and a table (aggregations/aopc.py computes it)."""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from aggregations.aopc import REFERENCE, AopcResult, aggregate_evaluation, load, read_settings  # noqa: E402
from aggregations.report.figures import plain_text  # noqa: E402


def figure(result: AopcResult):
    """Left: mean f(x^(k)) per method as regions are perturbed; right: AOPC with its interval, best on top."""
    methods = result.table["method"].to_pylist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        rows = result.curves.filter(pc.equal(result.curves["method"], m))
        if not rows.num_rows:
            continue
        step = rows["step"].to_numpy()
        f0 = rows["mean_f"].to_numpy() + rows["mean_decline"].to_numpy()  # mean f(x^(0)), the same at every k
        style = dict(color="0.45", linestyle="--") if m == REFERENCE else dict(color=colours[i % len(colours)])
        left.plot(step, rows["mean_f"].to_numpy(), label=plain_text(m), linewidth=1.6, **style)
        left.fill_between(step, f0 - rows["decline_high"].to_numpy(), f0 - rows["decline_low"].to_numpy(),
                          alpha=0.15, color=style["color"], linewidth=0)
    spec = result.settings.get("perturbation", {})
    size = spec.get("region_size", "?")
    left.set_xlabel(f"perturbation step k ({size}x{size} px regions, {spec.get('perturbation', '?')})")
    left.set_ylabel(f"mean f(x^(k)) ({spec.get('score', 'logit')})")
    left.set_title("Most relevant regions first")
    left.legend(fontsize=8, frameon=False)
    order = methods[::-1]
    values = [result.aopc(m) for m in order]
    records = {r["method"]: r for r in result.table.to_pylist()}
    errors = np.array([[v - records[m]["ci_low"], records[m]["ci_high"] - v] for m, v in zip(order, values)]).T
    right.barh([plain_text(m) for m in order], values, xerr=np.nan_to_num(errors), capsize=3,
               color=["0.7" if m == REFERENCE else "#4c72b0" for m in order])
    right.set_xlabel("AOPC (higher: the ordering finds what the model uses)")
    right.set_title(f"AOPC, {int(round(100 * records[order[0]]['level']))}% interval")
    fig.tight_layout()
    return fig


def figure_png(result: AopcResult) -> bytes:
    fig = figure(result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _interval(low: float, high: float) -> str:
    return "" if not (np.isfinite(low) and np.isfinite(high)) else f"[{low:.3g}, {high:.3g}]"


def report_section(out_dir: str | None, storage_options: dict | None = None,
                   store_config: dict | None = None) -> dict | None:
    """What the HTML report shows for an evaluation directory, or None when there is no evaluation there.

    Returns ``title``, ``summary`` (one sentence), ``figure_png`` (bytes), ``figure_uri`` (a data URI for an
    ``<img src>``), ``columns`` and ``rows`` (formatted strings, best method first), ``records`` (the raw
    numbers), ``settings`` and ``warning`` (an evaluation of another model or dataset than ``store_config``
    says, or one that cannot be read, which then has no figure or rows). When only the curves exist the summary
    is computed (bootstrap), not written:
    rendering a report never writes into the evaluation directory.
    """
    if not out_dir:
        return None
    title = "Explanation quality: region perturbation (AOPC)"
    try:
        result = load(out_dir, storage_options)
        if result is None:
            result = aggregate_evaluation(out_dir, storage_options=storage_options, write=False)
        identity = read_settings(out_dir, storage_options).get("config", {})
    except FileNotFoundError:
        return None
    except Exception as error:  # a broken evaluation folder must not take the rest of the report with it
        return {"title": title, "warning": f"The evaluation at {out_dir} could not be read "
                                           f"({type(error).__name__}: {error}); it is left out.", "rows": []}
    mismatched = [name.replace("_", " ") for name in ("weights_digest", "dataset_fingerprint")
                  if store_config and identity.get(name) is not None and store_config.get(name) is not None
                  and identity[name] != store_config[name]]
    records = result.table.to_pylist()
    png = figure_png(result)
    level = int(round(100 * records[0]["level"])) if records else 95
    rows = [[r["method"], f"{r['aopc']:.4g}", _interval(r["ci_low"], r["ci_high"]),
             "" if r["method"] == REFERENCE else f"{r['vs_random']:+.4g}",
             "" if r["method"] == REFERENCE else _interval(r["vs_random_low"], r["vs_random_high"]),
             str(r["n"]) + (f" ({r['excluded']} excluded)" if r["excluded"] else "")] for r in records]
    return {
        "title": title,
        "warning": (f"This evaluation ({out_dir}) was made with another {' and '.join(mismatched)} than the audited "
                    "store: its numbers describe that run, not this one.") if mismatched else "",
        "summary": _summary(records),
        "figure_png": png,
        "figure_uri": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        "columns": ["method", "AOPC", f"{level}% CI", "minus random", f"{level}% CI", "images"],
        "rows": rows,
        "records": records,
        "settings": result.settings,
    }


def _summary(records: Sequence[dict]) -> str:
    methods = [r for r in records if r["method"] != REFERENCE]
    if not methods:
        return "Only the random ordering was evaluated."
    best = methods[0]
    beaten = [r["method"] for r in methods if np.isfinite(r["vs_random_low"]) and r["vs_random_low"] > 0]
    not_beaten = [r["method"] for r in methods if r["method"] not in beaten]
    text = (f"Perturbing the regions that {best['method']} ranks most relevant lowers f(x) the most "
            f"(AOPC {best['aopc']:.3g}). ")
    if beaten:
        text += f"Better than a random order (interval of the paired difference above 0): {', '.join(beaten)}. "
    if not_beaten:
        text += f"Not distinguishable from, or worse than, a random order: {', '.join(not_beaten)}."
    return text.strip()
