"""The engine over the torchvision zoo: speed and peak memory against forward, the input gradient, zennit and lxt.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_engine.py --zoo                 # the default families
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_zoo.py --models vit_b_16 --batch 4 --repeats 3

Per model (random init, 1000 classes, eval mode, float32, one batch of ``--batch`` images of ``--size``): forward
(no_grad), forward + input gradient (frozen parameters), ours with epsilon_plus, zennit's EpsilonPlus where zennit can
give the same map (the twins of ``tests/helpers/zoo_twins.py``: residual sums as zennit ``Sum``, gates as constant
scales, checked equal to ours in tests/test_lrp_zoo_zennit.py), and on ViT ours against lxt with the same relevance
(tests/test_lrp_vit_lxt.py: the ``z`` composite with the position embedding as a bias, CP-LRP or AttnLRP attention);
where lxt is not installed, against its rules rebuilt in tests/helpers/lxt_recipe.py ("lxt-recipe": the same patched
torch model, so the same arithmetic; checked equal to ours in that test). Where the graph knows some layer inputs to
be signed, "sign checked per batch" is ours as it was before it knew (an ``amin`` check per such layer, a host
synchronisation each on CUDA), side by side with the engine as it is.
Times are medians of ``--repeats`` interleaved rounds after a warm-up (``bench_engine.Timer``), in this process with
the allocator as every user has it. Memory is the peak resident set size above the resident size before one call
(Linux ``/proc/self/clear_refs``), measured in a child process (``--memory-only``) whose glibc mmap threshold is fixed
at 64 KiB so that freed tensors leave the resident set; that setting turns every large allocation into an mmap and
its page faults (it made every method 2-3x slower, allocation-heavy ones most), so no time is taken under it. On
CUDA the peak allocated memory of one call, in this process.

``--census`` times nothing: it counts what one call dispatches (ATen operators other than views, each at least one
kernel launch on a GPU) and the bytes those operators read and write (their tensor arguments and results), a
device-free account of launch count and memory traffic, the two things that set a GPU's time on the elementwise
parts of an explanation, and the host synchronisations among them (a tensor read as a Python number, or a result
whose shape depends on the values: each drains a GPU's launch queue). Deterministic, so it can be compared across
commits on any machine.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import lrp  # noqa: E402
from bench_engine import BASE, Timer, input_gradient, zennit_attribution  # noqa: E402
from lrp.kinds import Kind  # noqa: E402
from lrp.rules import Attention, Norm  # noqa: E402

FAMILIES = ["resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
            "shufflenet_v2_x1_0", "regnet_y_800mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]
ZENNIT = {"resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "shufflenet_v2_x1_0"}


def peak_memory(fn, device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above what was in use before it, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def lxt_equivalent(cp: bool) -> lrp.Composite:
    """Our composite giving lxt's relevance on ViT (see tests/test_lrp_vit_lxt.py)."""
    z = lrp.make_composite("z", stabilizer=0.0)
    return dataclasses.replace(z, by_kind={**z.by_kind, Kind.SHIFT: Norm(0.0), Kind.ATTENTION: Attention(0.0, cp=cp)})


def methods(name: str, model, x, target, device) -> dict:
    """name -> (fn, context) of every method timed on this model."""
    def forward():
        with torch.no_grad():
            model(x)

    found = {"forward (no_grad)": (forward, None), BASE: (lambda: input_gradient(model, x, target), None)}
    ours = lrp.Explainer(model, "epsilon_plus")
    found["ours epsilon_plus"] = (lambda: ours(x, target), None)
    keeping = lrp.Explainer(model, "epsilon_plus", recompute=False)
    found["ours epsilon_plus, recompute=False"] = (lambda: keeping(x, target), None)
    checking = lrp.Explainer(model, "epsilon_plus")
    signed = [s for s in checking.network.steps if s.layer is not None and s.inputs_signed]
    if signed:  # the engine before the graph knew signed values: a per-batch amin (a sync on CUDA) per such layer
        for step in signed:
            step.inputs_signed = False
        found["ours epsilon_plus, sign checked per batch"] = (lambda: checking(x, target), None)
    if name in ZENNIT:
        from helpers.zennit_reference import zennit_composite
        from helpers.zoo_twins import module_pools, with_twin_rules, zennit_twin

        twin = zennit_twin(copy.deepcopy(module_pools(copy.deepcopy(model))))
        composite = with_twin_rules(twin, zennit_composite("epsilon_plus"))
        found["zennit epsilon_plus (twin)"] = (lambda modified: zennit_attribution(modified, x, target),
                                               lambda: composite.context(twin))
    if name.startswith("vit"):
        if importlib.util.find_spec("lxt") is not None:  # lxt is optional
            from helpers.lxt_reference import lxt_model as patch
            baseline = "lxt"
        else:  # its rules rebuilt (tests/helpers/lxt_recipe.py), the same arithmetic
            from helpers.lxt_recipe import recipe_model as patch
            baseline = "lxt-recipe"
        for cp, label in ((True, "CP-LRP"), (False, "AttnLRP")):
            explainer = lrp.Explainer(model, lxt_equivalent(cp))
            patched = patch(model, cp)
            found[f"ours {label} (lxt's map)"] = (lambda e=explainer: e(x, target), None)
            found[f"{baseline} {label}"] = (lambda p=patched: _gradient_x_input(p, x, target), None)
    return found


def _gradient_x_input(model, x, target):
    return input_gradient(model, x, target) * x


def _model_and_batch(name: str, args, device: torch.device):
    torch.manual_seed(0)
    kwargs = {"image_size": args.size} if name.startswith("vit") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval().to(device)
    model.requires_grad_(False)
    with torch.no_grad():  # zero-initialised heads (ViT) would explain a constant 0
        for parameter in model.parameters():
            if parameter.numel() > 1 and not parameter.abs().gt(0).any():
                parameter.normal_(0, 0.01)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    return model, x, target


def bench(name: str, args, device: torch.device) -> list[tuple]:
    model, x, target = _model_and_batch(name, args, device)
    found = methods(name, model, x, target, device)
    if args.memory_only:
        for fn, context in found.values():  # warm, as after the timed rounds (cached weights, lazy imports)
            _measure(fn, context, None)
        return [(method, None, _measure(fn, context, device)) for method, (fn, context) in found.items()]
    timer = Timer(device)
    for method, (fn, context) in found.items():
        timer.add(method, fn, context)
    timer.run(args.repeats)
    if device.type == "cuda":
        memory = {method: _measure(fn, context, device) for method, (fn, context) in found.items()}
    else:
        memory = _child_memory(name, args)
    return [(method, timer.median(method), memory.get(method)) for method in found]


def _measure(fn, context, device: torch.device | None):
    """Peak memory of one call of ``fn`` (inside ``context()``, zennit's composite, when there is one); with no device,
    just the call."""
    def call(*modified):
        return fn(*modified) if device is None else peak_memory(functools.partial(fn, *modified), device)

    if context is None:
        return call()
    with context() as modified:
        return call(modified)


def _child_memory(name: str, args) -> dict:
    """Peak MiB per method, measured in a child process with glibc's mmap threshold fixed (see the docstring)."""
    if args.no_memory or not sys.platform.startswith("linux"):
        return {}
    command = [sys.executable, __file__, "--memory-only", "--models", name, "--batch", str(args.batch),
               "--size", str(args.size), "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(result.stdout.strip().splitlines()[-1])


_VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
          "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "_reshape_alias", "lift_fresh",
          "_local_scalar_dense"}
# operators whose result the host must wait for on a GPU: a tensor read as a Python number, or an output whose shape
# depends on the values (each one a device synchronisation that drains the launch queue)
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class _Census(TorchDispatchMode):
    """Counts the non-view operators dispatched inside it, the bytes of their tensor arguments and results, and the
    host synchronisations (``_SYNCS``) among them."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.syncs = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.syncs += name in _SYNCS
        if name not in _VIEWS:
            self.ops += 1
            # new_full, zeros_like and the like read only their argument's shape
            touched = (out if name.startswith("new_") or name.endswith("_like") else (args, kwargs, out))
            self.bytes += sum(_nbytes(t) for t in tree_flatten(touched)[0] if isinstance(t, torch.Tensor))
        return out


def _nbytes(t: torch.Tensor) -> int:
    """The bytes a kernel reads or writes for ``t``: a broadcast (stride 0) axis counts once."""
    return t.element_size() * math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)


def census(name: str, args, device: torch.device) -> list[tuple]:
    """(method, operators, GB moved) of one call of each method, after a warm-up call."""
    model, x, target = _model_and_batch(name, args, device)
    rows = []
    for method, (fn, context) in methods(name, model, x, target, device).items():
        _measure(fn, context, None)
        with _Census() as counted:
            _measure(fn, context, None)
        rows.append((method, counted.ops, counted.bytes / 1e9, counted.syncs))
    return rows


def print_census(name: str, rows):
    base = next(row for row in rows if row[0] == BASE)
    print(f"\n{name}")
    print(f"| {'method':<46} | {'operators':>9} | {'/ fwd+grad':>10} | {'GB moved':>8} | {'/ fwd+grad':>10} "
          f"| {'host syncs':>10} |")
    print(f"|{'-' * 48}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 12}|")
    for method, ops, moved, syncs in rows:
        print(f"| {method:<46} | {ops:>9} | {ops / base[1]:>9.2f}x | {moved:>8.3f} | {moved / base[2]:>9.2f}x "
              f"| {syncs:>10} |")
    sys.stdout.flush()


def print_table(name: str, rows, batch: int):
    base = next(seconds for method, seconds, _ in rows if method == BASE)
    ours = next(seconds for method, seconds, _ in rows if method == "ours epsilon_plus")
    print(f"\n{name}")
    print(f"| {'method':<46} | {'median (s)':>10} | {'images/s':>8} | {'/ fwd+grad':>10} | {'vs ours':>8} "
          f"| {'peak MiB':>8} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 10}|")
    for method, seconds, memory in rows:
        reference = ours
        if "(lxt's map)" in method or method.startswith("lxt"):
            reference = next(s for m, s, _ in rows if m == f"ours {method.split()[1]} (lxt's map)")
        ratio = f"{seconds / reference:.2f}x" if method.startswith(("zennit", "lxt")) else ""
        mib = "" if memory is None else f"{memory:.0f}"
        print(f"| {method:<46} | {seconds:>10.3f} | {batch / seconds:>8.1f} | {seconds / base:>9.2f}x "
              f"| {ratio:>8} | {mib:>8} |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="times only (no child process for peak memory)")
    parser.add_argument("--census", action="store_true",
                        help="count the operators and bytes of one call instead of timing (see the docstring)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the child of _child_memory
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch = args.batch or (32 if device.type == "cuda" else 4)
    if args.memory_only:
        (name,) = args.models
        print(json.dumps({method: memory for method, _, memory in bench(name, args, device)}))
        return 0
    how = ("operators and bytes of one call after a warm-up" if args.census else
           f"median of {args.repeats} after 1 warm-up; 'vs ours': their time / ours")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.size}x{args.size}, float32, {how}")
    for name in args.models:
        if args.census:
            print_census(name, census(name, args, device))
        else:
            print_table(name, bench(name, args, device), args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
