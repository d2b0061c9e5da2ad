"""Decoding in worker processes beside the explain actor (``decode_workers``, pipeline/decode_workers.py).

The workers must store what the actor's own decoding threads store (the same pixels, boxes, masks, failures and
relevance), keep their memory bounded, survive the death of a worker without losing a row, and run inside a Ray
actor (spawned from a Ray worker process).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.runs import REPO, fifo_dataset, manifest, values
from test_faults import Killer
from pipeline.actors import ExplainActor
from pipeline.batches import ShardReader, load_sample
from pipeline.config import ConfigError, config_from_dict
from pipeline.datasets import read_image
from pipeline.decode_workers import DIED, DecodeWorkers, WorkerReader, submit
from pipeline.preprocess import Preprocess, PreprocessSpec
from pipeline.run import create_store, plan_run, run
from pipeline.store import STATUS_FAILED, STATUS_OK, open_store

SPEC = PreprocessSpec(resize=16, pad_to_square=True)


@pytest.fixture(scope="module")
def workers():
    pool = DecodeWorkers(2, SPEC)
    pool.start()
    yield pool
    pool.close()


def _dataset(tmp_path: Path, bad: bool = True) -> str:
    """Eight images with boxes, a mask on one, several rows of one image, and (``bad``) a corrupt and a missing file."""
    source = manifest(tmp_path, 8)
    mask = np.zeros((20, 28), np.uint8)
    mask[4:12, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    lines = Path(source).read_text().splitlines()
    lines = ["path,label,box,mask_path"] + [line + ("," + str(tmp_path / "mask.png") if i == 2 else ",")
                                           for i, line in enumerate(lines[1:])]
    if bad:
        (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        lines[4:4] = [f"{tmp_path / 'corrupt.png'},1,,", f"{tmp_path / 'gone.png'},2,,"]
    Path(source).write_text("\n".join(lines) + "\n")
    return source


def test_a_batch_normalised_at_once_equals_its_images_normalised_one_by_one(tmp_path):
    preprocess = Preprocess(PreprocessSpec(resize=[12, 10], mean=[0.1, 0.5, 0.9], std=[0.3, 0.2, 0.7]))
    images = [torch.randint(0, 256, (3, 17 + i, 23), dtype=torch.uint8) for i in range(3)]
    one_by_one = torch.stack([preprocess(image)[0] for image in images])
    pixels = torch.stack([preprocess(image, normalize=False)[0] for image in images])
    assert pixels.dtype == torch.uint8
    assert torch.equal(preprocess.normalize(pixels), one_by_one)


def test_the_workers_read_the_rows_the_actors_threads_read(tmp_path, workers):
    records = plan_run(config_from_dict(values(tmp_path, _dataset(tmp_path)))).rows.to_pylist()
    preprocess = Preprocess(SPEC)
    threads = ShardReader(records, lambda row: load_sample(row, preprocess), 3, 2)
    processes = WorkerReader(records, workers, 3, lambda row: load_sample(row, preprocess), 2)
    ours, theirs = list(processes), list(threads)
    assert processes.failures == threads.failures and sorted(processes.failures) == [3, 4]
    assert "cannot decode image" in processes.failures[3] and "missing file" in processes.failures[4]
    assert processes.notes == []
    assert [b.rows.tolist() for b in ours] == [[0, 1, 2], [5], [6, 7, 8], [9]]  # fixed row ranges: 3-4 failed
    assert np.concatenate([b.rows for b in ours]).tolist() == np.concatenate([b.rows for b in theirs]).tolist()
    x = torch.cat([b.inputs("cpu", preprocess.normalize) for b in ours])
    assert torch.equal(x, torch.cat([b.inputs("cpu") for b in theirs]))
    samples = [s for b in ours for s in b.samples]
    expected = [s for b in theirs for s in b.samples]
    assert all(s.x is None for s in samples)
    for got, want in zip(samples, expected):
        np.testing.assert_array_equal(got.boxes, want.boxes)
        assert (got.mask is None) == (want.mask is None) and (got.mask is None or torch.equal(got.mask, want.mask))
    assert sum(s.mask is not None for s in samples) == 1


def test_rows_of_one_image_decode_once_per_batch_and_a_part_reads_only_its_rows(tmp_path, workers):
    path = str(tmp_path / "one.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 13, 3), np.uint8)).save(path)
    record = dict(path=path, mask_path="", boxes=[], box_classes=[])
    records = [dict(record, sample_id=i // 3) for i in range(7)]  # images of 3, 3 and 1 rows
    reader = WorkerReader(records, workers, 4, None, 1, rows=(1, 6))
    batches = list(reader)
    assert [b.rows.tolist() for b in batches] == [[1, 2, 3, 4], [5]] and not reader.failures
    expected = Preprocess(SPEC)(read_image(path), normalize=False)[0]
    assert all(torch.equal(image, expected) for b in batches for image in b.pixels)


def test_a_killed_worker_loses_no_row_its_rows_are_decoded_again_and_the_pool_starts_again(tmp_path):
    records = plan_run(config_from_dict(values(tmp_path, _dataset(tmp_path)))).rows.to_pylist()
    preprocess = Preprocess(SPEC)
    load = lambda row: load_sample(row, preprocess)  # noqa: E731
    expected = ShardReader(records, load, 2, 1)
    expected_x = torch.cat([b.inputs("cpu") for b in expected])
    pool = DecodeWorkers(1, SPEC)
    try:
        reader = WorkerReader(records, pool, 2, load, 1)
        batches = iter(reader)
        first = next(batches)
        for child in multiprocessing.active_children():  # the fault: the worker process is killed mid-shard
            os.kill(child.pid, signal.SIGKILL)
        rest = list(batches)
        (note,) = reader.notes
        assert "the decode pool broke" in note and "none failed" in note
        assert all(b.pixels is not None for b in [first, *rest])  # all from worker processes, none from the actor
        assert reader.failures == expected.failures  # the two bad files, and nothing blamed for the kill
        assert np.concatenate([b.rows for b in [first, *rest]]).tolist() == \
            [i for i in range(len(records)) if i not in expected.failures]
        assert torch.equal(torch.cat([b.inputs("cpu", preprocess.normalize) for b in [first, *rest]]), expected_x)
        again = WorkerReader(records, pool, 2, load, 1)  # the next shard: fresh workers
        assert all(b.pixels is not None for b in again) and again.notes == []
    finally:
        pool.close()


def test_a_submit_to_a_pool_that_broke_under_it_says_broken(tmp_path):
    """The race of CI (stop 28): a submit that spawns a worker while the broken pool's pipes close raised OSError
    ("handle is closed") instead of BrokenProcessPool, and the shard failed; a pool the other task shut down raises
    RuntimeError. Both now read as a broken pool, which the reader recovers from."""
    pool = DecodeWorkers(1, SPEC).pool()
    pool.shutdown()
    with pytest.raises(BrokenProcessPool, match="during a submit"):
        submit(pool, time.sleep, 0)
    pool = DecodeWorkers(1, SPEC).pool()
    pool._call_queue._writer.close()  # the pipe the pool's manager closes when it finds a worker dead
    with pytest.raises(BrokenProcessPool, match="handle is closed"):
        submit(pool, time.sleep, 0)
    pool.shutdown(wait=False, cancel_futures=True)


def test_an_image_that_kills_every_process_reading_it_fails_alone_and_the_actor_never_reads_it(tmp_path):
    """A row whose image kills its reader (as a decoder segfault would): a FIFO, and a thread that SIGKILLs every
    other process holding it open. Only that row fails; this process (the actor) never opens it."""
    source, fifo = fifo_dataset(tmp_path, 7, blocked_row=3)
    records = plan_run(config_from_dict(values(tmp_path, source))).rows.to_pylist()
    preprocess = Preprocess(SPEC)
    load = lambda row: load_sample(row, preprocess)  # noqa: E731
    writer = os.open(fifo, os.O_RDWR)  # the FIFO opens without blocking; reading it waits for data that never comes
    unblock = threading.Timer(60, lambda: os.write(writer, b"not an image"))  # had this process read it: no hang
    unblock.start()
    pool = DecodeWorkers(2, SPEC)
    try:
        with Killer(fifo) as killer:
            reader = WorkerReader(records, pool, 3, load, 1)
            batches = list(reader)
        assert killer.kills >= 2  # the batch's worker, then the row's own process
        assert reader.failures == {3: DIED}
        assert np.concatenate([b.rows for b in batches]).tolist() == [0, 1, 2, 4, 5, 6]
        assert all(b.pixels is not None for b in batches)
        assert len(reader.notes) == 1 and "died on 1 of the" in reader.notes[0]
    finally:
        unblock.cancel()
        os.close(writer)
        pool.close()


def test_workers_that_cannot_start_leave_the_shard_to_the_actor(tmp_path):
    """A script without the ``__main__`` guard cannot start spawned workers (each would run the script again): the
    reader says so and the actor's threads decode every row."""
    records = plan_run(config_from_dict(values(tmp_path, _dataset(tmp_path)))).rows.to_pylist()
    (tmp_path / "records.json").write_text(json.dumps(records))
    script = tmp_path / "unguarded.py"
    script.write_text(f"""
import json
from pipeline.batches import load_sample
from pipeline.decode_workers import DecodeWorkers, WorkerReader
from pipeline.preprocess import Preprocess, PreprocessSpec
spec = PreprocessSpec(resize=16, pad_to_square=True)
records = json.loads(open({str(tmp_path / "records.json")!r}).read())
workers = DecodeWorkers(1, spec)
reader = WorkerReader(records, workers, 3, lambda row: load_sample(row, Preprocess(spec)), 1)
batches = list(reader)
second = WorkerReader(records, workers, 3, lambda row: load_sample(row, Preprocess(spec)), 1, rows=(5, 10))
again = list(second)  # the next shard: no new attempt to start a worker
print(json.dumps(dict(rows=[int(i) for b in batches for i in b.rows], workers=[b.pixels is not None for b in batches],
                      failures=sorted(reader.failures), notes=reader.notes, unavailable=workers.unavailable,
                      second=[int(i) for b in again for i in b.rows], second_notes=second.notes,
                      live=workers._pool is not None)))
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == [0, 1, 2, 5, 6, 7, 8, 9] and result["failures"] == [3, 4]
    assert not any(result["workers"])
    assert len(result["notes"]) == 1 and "could not be started" in result["notes"][0]
    assert result["unavailable"] and not result["live"]
    assert result["second"] == [5, 6, 7, 8, 9]
    assert len(result["second_notes"]) == 1 and "for an earlier shard" in result["second_notes"][0]


def test_two_shards_on_one_pool_a_row_of_one_kills_a_worker_the_other_loses_nothing(tmp_path):
    """A GPU actor's two shard tasks share its pool: a row of shard A that kills its worker breaks the pool for both.
    A fails that row only; B loses nothing and, if its rows were in flight, its note blames no image of its own."""
    source, fifo = fifo_dataset(tmp_path / "a", 12, blocked_row=5)
    shard_a = plan_run(config_from_dict(values(tmp_path / "a", source))).rows.to_pylist()
    shard_b = plan_run(config_from_dict(values(tmp_path / "b", _dataset(tmp_path / "b", bad=False)))).rows.to_pylist()
    preprocess = Preprocess(SPEC)
    load = lambda row: load_sample(row, preprocess)  # noqa: E731
    writer = os.open(fifo, os.O_RDWR)
    unblock = threading.Timer(60, lambda: os.write(writer, b"not an image"))
    unblock.start()
    pool = DecodeWorkers(2, SPEC)
    pool.start(wait=True)
    found = {}

    def read(name, records):
        reader = WorkerReader(records, pool, 2, load, 1)
        found[name] = (np.concatenate([b.rows for b in reader]).tolist(), reader.failures, reader.notes)

    try:
        with Killer(fifo):
            tasks = [threading.Thread(target=read, args=task) for task in (("a", shard_a), ("b", shard_b))]
            for task in tasks:
                task.start()
            for task in tasks:
                task.join(120)
        rows_a, failures_a, _ = found["a"]
        rows_b, failures_b, notes_b = found["b"]
        assert failures_a == {5: DIED} and rows_a == [i for i in range(12) if i != 5]
        assert failures_b == {} and rows_b == list(range(len(shard_b)))
        assert all(note.startswith("the decode pool broke") for note in notes_b)
    finally:
        unblock.cancel()
        os.close(writer)
        pool.close()


def test_the_actor_with_decode_workers_stores_what_it_stores_without(tmp_path):
    source = _dataset(tmp_path, bad=False)
    stores = {}
    for workers in (0, 2):
        config = config_from_dict(values(tmp_path, source, store=str(tmp_path / f"w{workers}.zarr"),
                                         decode_workers=workers, cpus_per_actor=3, rows_per_shard=4, batch_size=2))
        plan = plan_run(config)
        store = create_store(plan)
        actor = ExplainActor(plan.job)
        assert (actor.workers is not None) == bool(workers)
        for shard in range(store.n_shards):
            start, stop = store.shard_rows(shard)
            report = actor.explain_shard(start, plan.rows.slice(start, stop - start), store.group_names)
            assert report["notes"] == [] and report["failed"] == 0
        if actor.workers is not None:
            actor.workers.close()
        stores[workers] = open_store(config.store)
    for name in stores[0].group_names:
        a, b = stores[0].group(name), stores[2].group(name)
        assert (b.status == STATUS_OK).all()
        np.testing.assert_array_equal(b.relevance.compute(), a.relevance.compute())
        np.testing.assert_array_equal(np.asarray(b.boxes), np.asarray(a.boxes))
        np.testing.assert_array_equal(np.asarray(b.mask), np.asarray(a.mask))
        assert np.asarray(b.mask).any()
        assert b.rows().drop_columns(["error"]).equals(a.rows().drop_columns(["error"]))


def test_decode_workers_is_a_checked_key_that_changes_no_stored_value(tmp_path):
    source = manifest(tmp_path, 2)
    base = config_from_dict(values(tmp_path, source))
    assert base.decode_workers == 0
    with_workers = config_from_dict(values(tmp_path, source, decode_workers=3, cpus_per_actor=4))
    assert with_workers.identity() == base.identity()  # a speed setting: the store's content is the same
    with pytest.raises(ConfigError, match="raise cpus_per_actor"):
        config_from_dict(values(tmp_path, source, decode_workers=1))
    with pytest.raises(ConfigError, match="decode: cpu"):
        config_from_dict(values(tmp_path, source, decode_workers=1, cpus_per_actor=2, decode="auto"))
    with pytest.raises(ConfigError, match="decode_workers must be 0"):
        config_from_dict(values(tmp_path, source, decode_workers=-1))


def test_a_ray_actor_decodes_in_its_worker_processes(ray_cluster, tmp_path):
    """The workers are spawned from a Ray worker process; the run records the bad rows as without them."""
    source = _dataset(tmp_path)
    summary = run(config_from_dict(values(tmp_path, source, decode_workers=1, cpus_per_actor=2, num_actors=1)))
    assert summary.exit_code == 1 and summary.computed_rows == 10
    assert not any("notes" in line for line in summary.messages)  # no fallback: the workers decoded
    reasons = dict(summary.failures)
    assert "cannot decode image" in reasons[str(tmp_path / "corrupt.png")]
    assert "missing file" in reasons[str(tmp_path / "gone.png")]
    group = open_store(str(tmp_path / "run.zarr")).group("ab")
    assert group.status.tolist() == [STATUS_OK] * 3 + [STATUS_FAILED] * 2 + [STATUS_OK] * 5


@pytest.mark.slow
def test_a_row_that_kills_its_decode_worker_fails_alone_with_no_actor_restart(ray_cluster, tmp_path):
    """The FIFO fault of tests/test_faults.py through Ray with decode workers: where the threads' actor dies and is
    bisected over several restarts, here only the worker dies, and the run needs no retry."""
    source, fifo = fifo_dataset(tmp_path, 7, blocked_row=4)
    writer = os.open(fifo, os.O_RDWR)
    began = time.perf_counter()
    try:
        with Killer(fifo) as killer:
            summary = run(config_from_dict(values(tmp_path, source, decode_workers=1, cpus_per_actor=2)))
    finally:
        os.close(writer)
    print(f"\nFAULT a row that kills its decode worker: the whole run {time.perf_counter() - began:.1f} s, "
          f"{killer.kills} kills, {summary.retries} retries")
    assert killer.kills >= 2 and summary.retries == 0
    assert summary.groups["ab"] == {"ok": 6, "failed": 1, "nonfinite": 0, "pending": 0}
    assert dict(summary.failures)[str(fifo)] == DIED
    assert any("a decode worker died" in line for line in summary.messages)
