"""GPU decoding's decisions and per-image fallback, exercised on the CPU (decode_jpeg on device "cpu" takes the same
batched-then-per-image path), and the overlapped explain actor in-process against the sequential one."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.actors import ExplainActor
from pipeline.batches import Batch
from pipeline.config import ConfigError, config_from_dict
from pipeline.datasets import read_image
from pipeline.gpu_decode import Encoded, decode_batch, decode_encoded_batch, decode_on_device, is_jpeg
from pipeline.preprocess import Preprocess, PreprocessSpec
from pipeline.run import create_store, plan_run
from pipeline.store import STATUS_FAILED, STATUS_OK, open_store
from tests.helpers.runs import values

# torchvision 0.29 deprecates decode_jpeg for TorchCodec; pytest resets the module's own filter per test
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def save(path: Path, seed: int, fmt: str, size=(20, 28)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(smooth).resize(size[::-1], Image.BILINEAR).save(path, fmt, **options)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Two JPEGs, a PNG, and a JPEG cut in half (a JPEG header no decoder can finish)."""
    good = [save(tmp_path / f"{i}.jpg", i, "JPEG") for i in range(2)]
    png = save(tmp_path / "p.png", 7, "PNG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(Path(good[0]).read_bytes()[:200])
    return good + [png, str(cut)]


def test_the_gpu_path_is_taken_only_with_decode_auto_on_a_cuda_device():
    assert decode_on_device("auto", torch.device("cuda"))
    assert decode_on_device("auto", "cuda:1")
    assert not decode_on_device("auto", torch.device("cpu"))
    assert not decode_on_device("cpu", torch.device("cuda"))


def test_decode_is_a_checked_config_key_recorded_in_the_identity_only_when_not_the_default(tmp_path):
    base = values(tmp_path, str(tmp_path))
    assert "decode" not in config_from_dict(base).identity()  # stores made before the key still resume
    assert config_from_dict({**base, "decode": "auto"}).identity()["decode"] == "auto"
    with pytest.raises(ConfigError, match="decode 'gpu' unknown"):
        config_from_dict({**base, "decode": "gpu"})


def test_one_bad_file_falls_back_per_image_and_only_undecodable_files_fail(files):
    datas = [Path(path).read_bytes() for path in files]
    assert [is_jpeg(data) for data in datas] == [True, True, False, True]
    results = decode_batch(datas, "cpu", lambda i: read_image(files[i]))
    assert [r.note for r in results[:2]] == ["", ""]  # the decoder of the device read them (after the batch refused)
    for path, result in zip(files[:2], results[:2]):
        assert result.image.dtype == torch.uint8 and result.image.shape == (3, 20, 28)
        difference = (result.image.int() - read_image(path).int()).abs()  # libjpeg-turbo in both, IDCT may differ
        assert difference.max() <= 2
    assert results[2].note == "not a JPEG" and torch.equal(results[2].image, read_image(files[2]))
    assert results[3].image is None and "cannot decode image" in results[3].note


def test_a_clean_batch_decodes_in_one_call_with_no_fallback(files):
    results = decode_batch([Path(p).read_bytes() for p in files[:2]], "cpu", lambda i: pytest.fail("no fallback"))
    assert [r.note for r in results] == ["", ""] and all(r.image is not None for r in results)


def test_an_encoded_batch_keeps_its_rows_shares_one_decode_per_image_and_records_fallbacks(files):
    def encoded(path):
        return Encoded(Path(path).read_bytes(), path, [[2, 2, 10, 9]], np.array([-1]), None)

    samples = [encoded(files[0]), encoded(files[2]), encoded(files[3])]
    rows = np.array([0, 1, 2, 3, 4])  # rows 1 and 2 are two targets of one image
    batch = Batch(rows, [samples[0], samples[1], samples[1], samples[2], samples[0]])
    preprocess = Preprocess(PreprocessSpec(resize=16, pad_to_square=True))
    out = decode_encoded_batch(batch, preprocess, "cpu", read_image)
    assert out.batch.rows.tolist() == [0, 1, 2, 4]
    assert out.batch.samples[1] is out.batch.samples[2] and out.batch.samples[0] is out.batch.samples[3]
    assert list(out.failures) == [3] and "cannot decode image" in out.failures[3]
    assert out.fallbacks == [(files[2], "not a JPEG")]
    expected = preprocess(read_image(files[2]), [[2, 2, 10, 9]])
    assert torch.equal(out.batch.samples[1].x, expected[0]) and np.allclose(out.batch.samples[1].boxes, expected[1])
    assert out.batch.inputs("cpu").shape == (4, 3, 16, 16)


class SequentialActor(ExplainActor):
    overlap = False


class OverlappedActor(ExplainActor):  # on a CPU the actor does not overlap by default: forced here
    overlap = True


def _shards(config, actor_class, threads: int = 1):
    """Every shard of the store explained by one in-process actor, from ``threads`` threads at once (as Ray's
    threaded actor runs them); returns the actor's reports."""
    plan = plan_run(config)
    store = create_store(plan)
    actor = actor_class(plan.job)
    parts = [store.shard_rows(shard) for shard in range(store.n_shards)]
    reports = [None] * len(parts)

    def work(k):
        for i in range(k, len(parts), threads):
            start, stop = parts[i]
            reports[i] = actor.explain_shard(start, plan.rows.slice(start, stop - start), store.group_names)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return reports


def _manifest(tmp_path: Path, files: list[str]) -> str:
    lines = ["path,label,box"] + [f'{p},{i % 3},"2,2,10,9"' for i, p in enumerate(files)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "m.csv")


def test_the_overlapped_actor_stores_what_the_sequential_one_does(tmp_path, files):
    images = [save(tmp_path / "more" / f"{i}.jpg", 10 + i, "JPEG") for i in range(7)]
    dataset = _manifest(tmp_path, images[:3] + files + images[3:])  # the cut JPEG is row 6
    sequential = config_from_dict(values(tmp_path, dataset, store=str(tmp_path / "seq.zarr")))
    overlapped = config_from_dict(values(tmp_path, dataset, store=str(tmp_path / "ovl.zarr"), decode="auto"))
    _shards(sequential, SequentialActor)
    reports = _shards(overlapped, OverlappedActor, threads=2)
    assert sum(r["rows"] for r in reports) == 11 and all(r["notes"] == [] for r in reports)  # CPU: no GPU path
    a, b = open_store(sequential.store), open_store(overlapped.store)
    for name in a.group_names:
        rows_a, rows_b = a.group(name).rows(), b.group(name).rows()
        status = rows_b["status"].to_numpy()
        assert status.tolist() == rows_a["status"].to_numpy().tolist()
        assert (status == STATUS_FAILED).tolist() == [i == 6 for i in range(11)] and (status == STATUS_OK).sum() == 10
        np.testing.assert_array_equal(b.group(name).relevance.compute(), a.group(name).relevance.compute())


def test_a_failing_write_surfaces_before_the_task_returns(tmp_path, files):
    config = config_from_dict(values(tmp_path, _manifest(tmp_path, files[:2])))
    plan = plan_run(config)
    create_store(plan)
    actor = ExplainActor(plan.job)
    actor.store = open_store(config.store, mode="r")  # the write, in the writer thread, is refused
    with pytest.raises(Exception, match="read-only|read only|mode"):
        actor.explain_shard(0, plan.rows.slice(0, 2), actor.store.group_names)
    assert (open_store(config.store).group(actor.store.group_names[0]).status == 0).all()  # nothing marked done


def test_the_stages_overlap_by_default_only_on_a_gpu_that_decodes_on_the_cpu():
    """The measured choice (RESULTS.md, stop 22 on an H200): nvJPEG actors and CPU actors run sequentially."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ExplainActor.overlaps(cuda, gpu_decode=False)
    assert not ExplainActor.overlaps(cuda, gpu_decode=True)
    assert not ExplainActor.overlaps(cpu, gpu_decode=False)
    assert ExplainActor.overlap is None  # the class leaves the choice to overlaps()
