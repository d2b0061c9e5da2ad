"""The explainer's per-call check that the model is as traced (lrp/graph.py ``Network.check_unchanged``) against
the two ``named_modules()`` walks it replaced (``refuse_hooks`` and ``replaced_modules``), side by side, best of 5.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_model_check.py
"""
import timeit

import torchvision

import lrp
from lrp.graph import refuse_hooks


def walks(model, network) -> None:
    refuse_hooks(model)
    network.replaced_modules()


def main() -> None:
    print("| model | modules | refuse_hooks + replaced_modules (us) | check_unchanged (us) |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("resnet50", "vit_b_16", "densenet121"):
        model = getattr(torchvision.models, name)().eval()
        network = lrp.Explainer(model, "epsilon_plus").network
        old = min(timeit.repeat(lambda: walks(model, network), number=500, repeat=5)) / 500 * 1e6  # noqa: B023
        new = min(timeit.repeat(network.check_unchanged, number=500, repeat=5)) / 500 * 1e6
        print(f"| {name} | {len(list(model.modules()))} | {old:.0f} | {new:.0f} |")


if __name__ == "__main__":
    main()
