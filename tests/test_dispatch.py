"""The shared shard-dispatch loop on the real local Ray cluster: retries of failed tasks and when they end."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.dispatch import ShardPool


def flaky_actor_class() -> type:
    """A local class, so that Ray ships it by value (the tests folder is not on the workers' path)."""

    class FlakyActor:
        """Counts its attempts per shard in files (they outlive a task); shard 1 fails once, shard 2 always."""

        def __init__(self, folder: str):
            self.folder = Path(folder)

        def ready(self) -> dict:
            return {}

        def work(self, shard: int) -> dict:
            marker = self.folder / str(shard)
            tries = int(marker.read_text()) + 1 if marker.exists() else 1
            marker.write_text(str(tries))
            if shard == 1 and tries == 1:
                raise OSError("the object store hiccuped")
            if shard == 2:
                raise ValueError("this shard can never be done")
            return {"rows": 10, "failed": 0, "nonfinite": 0}

    return FlakyActor


class RecordingTask:
    """Shards of 10 rows, run by ``work``; the ones that cannot be done are recorded in ``failed``."""

    bisect = False

    def __init__(self, failed: dict):
        self.failed = failed

    def submit(self, actor, part):
        return actor.work.remote(part.shard)

    def size(self, shard):
        return 10

    def fail(self, part, reason):
        self.failed[part.shard] = reason


def test_a_failed_task_is_retried_and_a_hopeless_one_recorded_after_max_attempts(ray_cluster, tmp_path):
    config = config_from_dict({"dataset": {"source": str(tmp_path)}, "model": {"name": "resnet18"},
                               "store": str(tmp_path / "unused.zarr"), "num_actors": 1, "max_attempts": 3,
                               "progress": False})
    failed = {}
    result = ShardPool("test", flaky_actor_class(), str(tmp_path), config, use_gpu=False).run([0, 1, 2, 3],
                                                                                             RecordingTask(failed))
    tries = {shard: int((tmp_path / str(shard)).read_text()) for shard in range(4)}
    assert tries == {0: 1, 1: 2, 2: 3, 3: 1}
    assert list(failed) == [2] and "can never be done" in failed[2] and "tried 3 times" in failed[2]
    assert result.computed_rows == 30 and result.retries == 3


def killed_actor_class(tasks: int) -> type:
    """An actor that runs ``tasks`` parts at once (two as a GPU explain actor does); a part holding row 5 (shard 1,
    offset 1) ends the actor's process (while the other part runs beside it, with two). Each incarnation and each
    start of a culprit part leaves a line in a file, so a test can count the processes that ended."""

    class KilledActor:
        concurrency = staticmethod(lambda gpu: tasks)

        def __init__(self, folder: str):
            import os

            self.folder = Path(folder)
            with open(self.folder / "incarnations", "a") as log:
                log.write(f"{os.getpid()}\n")

        def ready(self) -> dict:
            return {}

        def work(self, shard: int, lo: int, hi: int) -> dict:
            import os
            import time

            if shard == 1 and lo <= 1 < hi:
                with open(self.folder / "culprit", "a") as log:
                    log.write(f"{lo}-{hi}\n")
                time.sleep(0.3)  # the other part is running by now
                os._exit(1)  # as a decoder segfault would
            time.sleep(1.0)
            (self.folder / f"{shard}-{lo}-{hi}").write_text("done")
            return {"rows": hi - lo, "failed": 0, "nonfinite": 0}

    return KilledActor


class BisectedTask(RecordingTask):
    bisect = True

    def submit(self, actor, part):
        return actor.work.remote(part.shard, part.lo, part.hi)

    def size(self, shard):
        return 4

    def fail(self, part, reason):
        self.failed[(part.shard, part.lo, part.hi)] = reason


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_row_that_kills_its_actor_fails_alone_and_no_other_process_is_ended(ray_cluster, tmp_path, tasks):
    """The task beside the culprit (queued behind it, or running beside it with two tasks per actor) dies with it
    each time; it is never blamed (never bisected or failed). And the pool ends no process itself: every incarnation
    but the last ended on a culprit part. Before, the pool's ``ray.kill`` after an "unavailable" report hit the
    incarnation Ray had already restarted, and ended the next, innocent, part (issue 15)."""
    config = config_from_dict({"dataset": {"source": str(tmp_path)}, "model": {"name": "resnet18"},
                               "store": str(tmp_path / "unused.zarr"), "num_actors": 1, "max_attempts": 2,
                               "progress": False})
    failed = {}
    pool = ShardPool("test", killed_actor_class(tasks), str(tmp_path), config, use_gpu=False)
    result = pool.run([0, 1, 2], BisectedTask(failed))
    assert pool.concurrency == tasks
    assert list(failed) == [(1, 1, 2)] and "on this row" in failed[(1, 1, 2)] and "tried 2 times" in failed[(1, 1, 2)]
    done = sorted(path.name for path in tmp_path.iterdir() if path.name[0].isdigit())
    assert "0-0-4" in done and "2-0-4" in done  # the whole shards beside it: done whole, never bisected
    rows = {(int(s), r) for s, lo, hi in (name.split("-") for name in done) for r in range(int(lo), int(hi))}
    assert rows == {(s, r) for s in range(3) for r in range(4)} - {(1, 1)}
    assert result.computed_rows == 11
    culprits = (tmp_path / "culprit").read_text().split()
    incarnations = (tmp_path / "incarnations").read_text().split()
    assert len(incarnations) == len(culprits) + 1, (culprits, incarnations)
