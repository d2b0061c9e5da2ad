"""The shared shard-dispatch loop on the real local Ray cluster: retries of failed tasks and when they end."""
from __future__ import annotations

from pathlib import Path

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
