"""The CUDA paths: the engine and the explain actor on a GPU, checked against zennit and against the CPU.

Skipped where no GPU is visible (CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lrp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
COMPOSITES = ["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1", "alpha_beta"]


@pytest.fixture(scope="module", params=["resnet18", "vgg16_bn", "googlenet"])
def case(request):
    """A float64 test case of the zennit comparison (random weights, batch of 2), moved to the GPU."""
    from helpers.zennit_cases import Case

    case = Case(request.param)
    for module in [*case.model.modules(), *case.twin.modules()]:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-12  # CUDA refuses the eps=0 of the CPU comparison (zennit quirk 1 in test_lrp_zennit)
    case.cpu_model, case.cpu_x = copy.deepcopy(case.model), case.x
    twin_is_model = case.twin is case.model
    case.model = case.model.to(CUDA)
    case.twin = case.model if twin_is_model else case.twin.to(CUDA)
    case.x, case.twin_x, case.target = case.x.to(CUDA), case.twin_x.to(CUDA), case.target.to(CUDA)
    return case


def _params(composite: str) -> dict:
    return {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("composite", COMPOSITES)
def test_cuda_float64_matches_zennit_on_cuda_and_ours_on_cpu(case, composite):
    ours = case.ours(composite, **_params(composite))
    assert ours.relevance.device.type == "cuda" and ours.relevance.dtype == torch.float64
    assert _relative_error(ours.relevance, case.zennit(composite, **_params(composite))) < 1e-6
    cpu = lrp.Explainer(case.cpu_model, composite, **_params(composite))(case.cpu_x, case.target.cpu())
    assert _relative_error(ours.relevance.cpu(), cpu.relevance) < 1e-9


def test_cuda_float32_is_full_float32_unless_tf32_is_asked_for(case):
    model = copy.deepcopy(case.model).float()
    double = case.ours("epsilon_gamma_box", low=-3.0, high=3.0).relevance
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch's conv default
        single = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0)(case.x.float(), case.target).relevance
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored after the call
        rough = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0, tf32=True)(
            case.x.float(), case.target).relevance
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert single.dtype == torch.float32
    assert _relative_error(single.double(), double) < 1e-4
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 hardware: the opt-in really changes the arithmetic
        assert _relative_error(rough.double(), double) > 10 * _relative_error(single.double(), double)


def test_exact_conservation_on_cuda_without_biases(case):
    result = case.ours("alpha_beta", include_bias=False)
    sums = result.relevance.flatten(1).sum(1)
    torch.testing.assert_close(sums, result.output, rtol=1e-8, atol=1e-10)


def test_repeated_cuda_calls_leave_model_and_memory_as_they_were(case):
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    explainer = lrp.Explainer(case.model, "epsilon_gamma_box", low=-3.0, high=3.0)
    first = explainer(case.x, case.target).relevance
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for _ in range(3):
        again = explainer(case.x, case.target).relevance
        assert _relative_error(again, first) < 1e-12  # cuDNN may pick non-deterministic kernels: equal up to rounding
        del again
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated  # caches are reused, nothing piles up across calls
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in case.model.parameters())


def test_explain_actor_runs_on_the_gpu_in_process(tmp_path):
    """The actor class the Ray pool pins to a GPU, driven in this process: same rows as the CPU engine."""
    from helpers.runs import engine_relevance, manifest, values

    from pipeline.actors import ExplainActor
    from pipeline.config import config_from_dict
    from pipeline.run import create_store, plan_run
    from pipeline.store import STATUS_OK, open_store

    config = config_from_dict(values(tmp_path, manifest(tmp_path, 7)))
    plan = plan_run(config)
    store = create_store(plan)
    actor = ExplainActor(plan.job)
    assert actor.ready()["device"].startswith("cuda")
    for shard in range(store.n_shards):
        start, stop = store.shard_rows(shard)
        report = actor.explain_shard(start, plan.rows.slice(start, stop - start), store.group_names)
        assert report["failed"] == report["nonfinite"] == 0

    stored = open_store(config.store)
    for name, setting in (("epsilon_epsilon=0.01", dict(composite="epsilon", epsilon=0.01)),
                          ("ab", dict(composite="alpha_beta", alpha=1, beta=0))):
        group = stored.group(name)
        rows = group.rows().to_pylist()
        assert [r["status"] for r in rows] == [STATUS_OK] * 7
        relevance = group.relevance.compute()
        for row in rows:
            expected, output = engine_relevance(tmp_path, row["path"], row["target"], **setting)
            np.testing.assert_allclose(relevance[row["row"]], expected, rtol=1e-4, atol=1e-5)
            assert row["output"] == pytest.approx(output, rel=1e-4)


def test_a_host_batch_is_stacked_into_pinned_memory_and_arrives_unchanged():
    from pipeline.batches import Batch, Sample

    samples = [Sample(torch.randn(3, 8, 8)) for _ in range(5)]
    x = Batch(np.arange(5), samples).inputs("cuda")
    torch.cuda.synchronize()
    assert x.device.type == "cuda" and torch.equal(x.cpu(), torch.stack([s.x for s in samples]))


def test_a_decode_workers_batch_is_normalised_on_the_gpu_as_on_the_host():
    """uint8 pixels copied to the GPU and normalised there equal the host's normalised inputs (pipeline.batches)."""
    from pipeline.batches import Batch, Sample
    from pipeline.preprocess import Preprocess, PreprocessSpec

    preprocess = Preprocess(PreprocessSpec(resize=[12, 10], mean=[0.1, 0.5, 0.9], std=[0.3, 0.2, 0.7]))
    pixels = torch.randint(0, 256, (4, 3, 12, 10), dtype=torch.uint8)
    batch = Batch(np.arange(4), [Sample(None)] * 4, pixels)
    x = batch.inputs("cuda", preprocess.normalize)
    torch.cuda.synchronize()
    assert x.device.type == "cuda" and x.dtype == torch.float32
    np.testing.assert_allclose(x.cpu().numpy(), preprocess.normalize(pixels).numpy(), rtol=0, atol=1e-6)
