"""The ViRelAy export: its HDF5 layout checked with h5py, and the project opened with ViRelAy's own loader."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from aggregations.spray import RunOptions, SpraySettings, spray
from jobs import cli
from tests.helpers.stores import make_store

SIZE, PER_CLASS = 32, 40
NAMES = ["plain", "stamped <b>&</b>"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Class 1: half the rows stamped top-left; real PNGs for all rows but the last (gone); row 3 failed."""
    root = tmp_path_factory.mktemp("virelay")
    rng = np.random.default_rng(3)
    n = 2 * PER_CLASS
    target = np.repeat([0, 1], PER_CLASS)
    stamped = (target == 1) & (np.arange(n) % 2 == 0)
    maps = rng.normal(0, 0.02, (n, SIZE, SIZE)).astype(np.float32)
    maps[~stamped, 12:20, 12:20] += 1.0
    maps[stamped, 1:5, 1:5] += 3.0
    paths = []
    for i in range(n):
        path = root / f"img{i}.png"
        if i < n - 1:
            Image.fromarray(np.full((SIZE, SIZE, 3), i * 3, np.uint8)).save(path)
        paths.append(str(path))
    status = np.ones(n, np.int8)
    status[3] = 2
    store = make_store(root / "s.zarr", maps, target=target, status=status, class_names=NAMES, rows_per_shard=20,
                       paths=paths)
    result = spray(store, str(root / "agg"), settings=SpraySettings(embedding="tsne"),
                   options=RunOptions(progress=False))
    out = root / "project"
    assert cli.main(["export-virelay", store, str(out), "--spray", str(root / "agg")]) == 0
    return {"store": store, "out": out, "spray": result, "spray_dir": str(root / "agg"), "stamped": stamped,
            "status": status, "n": n}


def test_hdf5_layout(exported):
    out, n = exported["out"], exported["n"]
    labels = json.loads((out / "label-map.json").read_text())
    assert labels == [{"index": 0, "word_net_id": "00000000", "name": NAMES[0]},
                      {"index": 1, "word_net_id": "00000001", "name": NAMES[1]}]
    with h5py.File(out / "dataset.h5") as f:
        assert f["data"].shape == (n, 3, SIZE, SIZE) and f["data"].dtype == np.uint8
        assert f["data"][5].max() == f["data"][5].min() == 15  # the PNG of row 5, as it was written
        assert f["data"][n - 1].max() == 0  # the image that is gone: black
        np.testing.assert_array_equal(f["label"][...], np.repeat([0, 1], PER_CLASS))
    with h5py.File(out / "lrp-attribution.h5") as f:
        index = f["index"][...]
        assert 3 not in index and len(index) == n - 1  # the failed row is not an attribution
        assert f["attribution"].shape == (n - 1, 2, SIZE, SIZE)  # the map and a zero channel: ViRelAy sums them
        from pipeline.store import open_store

        maps = open_store(exported["store"]).group("lrp").read("relevance")
        np.testing.assert_array_equal(f["attribution"][10].sum(axis=0), maps[index[10]])
        assert f["prediction"].shape == (n - 1, 2) and (f["prediction"][...].sum(axis=1) == 1).all()
    with h5py.File(out / "lrp-analysis.h5") as f:
        assert sorted(f) == ["00000000", "00000001"]
        node = f["00000001"]
        index = node["index"][...]
        k = exported["spray"].classes.to_pylist()[1]["n_clusters"]
        assert k == 2 and list(node["cluster"]) == ["kmeans-02"]
        clusters = node["cluster/kmeans-02"][...]
        assert len(index) == len(clusters) == PER_CLASS
        groups = [set(exported["stamped"][index[clusters == c]]) for c in (0, 1)]
        assert sorted(map(sorted, groups)) == [[False], [True]]  # each cluster is one side of the plant
        spectral = node["embedding/spectral"]
        assert spectral.shape == (PER_CLASS, 32) and len(spectral.attrs["eigenvalue"]) == 32
        np.testing.assert_allclose(np.linalg.norm(spectral[...], axis=1), 1, rtol=1e-5)
        assert node["embedding/tsne"].shape == (PER_CLASS, 2)
    project = yaml.safe_load((out / "lrp.yaml").read_text())["project"]
    assert project["dataset"]["path"] == "dataset.h5" and project["analyses"][0]["sources"] == ["lrp-analysis.h5"]


def test_virelay_opens_the_project(exported):
    """ViRelAy's own loading code (virelay.model, what its server calls) reads every part of the export."""
    model = pytest.importorskip("virelay.model")
    workspace = model.Workspace()
    workspace.add_project(str(exported["out"] / "lrp.yaml"))
    project = workspace.get_project("lrp-audit: lrp")
    assert project.get_analysis_methods() == ["spray"]
    assert [c.human_readable_name for c in project.get_analysis_categories("spray")] == NAMES
    analysis = project.get_analysis("spray", "00000001", "kmeans-02", "spectral")
    assert len(analysis.eigenvalues) == 32 and len(analysis.clustering) == PER_CLASS
    for entry in analysis.attribution_indices[:5]:
        attribution = project.get_attribution(int(entry))
        sample = project.get_sample(attribution.index)
        assert attribution.labels[0].name == sample.labels[0].name == NAMES[1]
        assert attribution.data.shape == (SIZE, SIZE, 2) and sample.data.shape == (SIZE, SIZE, 3)
        for colours in ("gray-red", "black-fire-red"):  # what its server renders, alone and over the image
            assert attribution.render_heatmap(colours).shape[:2] == (SIZE, SIZE)
            assert attribution.render_heatmap(colours, sample.data).shape[:2] == (SIZE, SIZE)
    tsne = project.get_analysis("spray", "00000001", "kmeans-02", "tsne")
    assert tsne.embedding.shape == (PER_CLASS, 2)
    workspace.close()


def test_refuses_without_spray_results(exported, tmp_path, capsys):
    assert cli.main(["export-virelay", exported["store"], str(tmp_path / "p"), "--spray", str(tmp_path)]) == 2
    assert "no SpRAy results" in capsys.readouterr().err


def test_per_channel_maps_are_exported_as_they_are(tmp_path):
    """A store that kept per-channel relevance: ViRelAy gets those channels (it sums them to the map)."""
    from pipeline.store import RelevanceStore, open_store

    rng = np.random.default_rng(4)
    n = 40
    channels = rng.normal(0, 0.02, (n, 3, SIZE, SIZE)).astype(np.float32)
    channels[: n // 2, :, 1:5, 1:5] += 1.0
    channels[n // 2:, :, 12:20, 12:20] += 1.0
    store = RelevanceStore.create(str(tmp_path / "c.zarr"), config={}, class_names=["only"], groups=["lrp"],
                                  n_rows=n, height=SIZE, width=SIZE, rows_per_shard=n, channels=3)
    store.group("lrp").write_block(0, relevance=channels.sum(axis=1), relevance_channels=channels,
                                   target=np.zeros(n, np.int64), label=np.zeros(n, np.int64),
                                   prediction=np.zeros(n, np.int64), sample_id=np.arange(n),
                                   path=np.array([str(tmp_path / "gone.png")] * n))
    spray(str(tmp_path / "c.zarr"), str(tmp_path / "agg"), settings=SpraySettings(embedding="none"),
          options=RunOptions(progress=False))
    assert cli.main(["export-virelay", str(tmp_path / "c.zarr"), str(tmp_path / "p"),
                     "--spray", str(tmp_path / "agg")]) == 0
    with h5py.File(tmp_path / "p" / "lrp-attribution.h5") as f:
        np.testing.assert_array_equal(f["attribution"][...], channels)
    with h5py.File(tmp_path / "p" / "lrp-analysis.h5") as f:
        assert list(f["00000000/embedding"]) == ["spectral"]  # no 2-D picture was computed
    assert open_store(str(tmp_path / "c.zarr")).n_rows == n


def test_only_the_chosen_classes(exported, tmp_path):
    out = tmp_path / "one"
    assert cli.main(["export-virelay", exported["store"], str(out), "--spray", exported["spray_dir"],
                     "--classes", "1"]) == 0
    with h5py.File(out / "dataset.h5") as f:
        np.testing.assert_array_equal(f["row"][...], np.arange(PER_CLASS, 2 * PER_CLASS))
    with h5py.File(out / "lrp-analysis.h5") as f:
        assert list(f) == ["00000001"] and sorted(f["00000001/index"][...]) == list(range(PER_CLASS))
