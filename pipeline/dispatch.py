"""Shards to a pool of Ray actors: the one dispatch loop behind ``lrp-audit explain`` and ``evaluate``.

Why plain actors rather than Ray Data: the unit of work must be one *shard* (whole-shard writes are what
makes concurrent Zarr writers safe, and the shard is the unit of resuming), the actor must write its
results itself (so the driver never holds pixels or relevance), and a retried unit must be retried *as a
unit*. With plain actors each of these is one line of the loop below; Ray Data would re-batch rows across
shard boundaries and hide retries inside the streaming executor. Backpressure is explicit: each actor has
at most ``IN_FLIGHT`` shard tasks queued, and the driver only holds shard descriptors (a slice of the
Arrow row table), never images.

Ray is imported inside the functions, so importing this module stays light.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .config import ConfigError, RunConfig

IN_FLIGHT = 2  # shard tasks queued per actor: one running, one ready to start
RECOVERIES = 20  # failed ready-pings of a restarting actor before it is dropped from the pool
RECOVERY_TIMEOUT = 900.0  # seconds a restarting actor may stay unscheduled (a lost node, no room) before it is dropped


def connect(address: str | None = None):
    """``ray``, connected to ``address``, else RAY_ADDRESS (set by ``ray job submit``), else a new local cluster."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(logging_level="WARNING", include_dashboard=False)
    return ray


@dataclass
class DispatchResult:
    computed_rows: int  # rows the actors reported done (ok or not) this run
    retries: int  # shard tasks resubmitted after their actor died
    seconds: float


def dispatch_shards(
    name: str,
    actor_class: type,
    job: Any,
    shards: Iterable[int],
    submit: Callable[[Any, int], Any],
    shard_size: Callable[[int], int],
    fail: Callable[[int, str], None],
    config: RunConfig,
    use_gpu: bool | None = None,
) -> DispatchResult:
    """Run every shard on a pool of ``actor_class(job)`` actors and wait for all of them.

    ``submit(actor, shard)`` starts one shard task (an ObjectRef of a report with ``rows``, ``failed`` and
    ``nonfinite`` counts); ``shard_size(shard)`` is its row count for the progress bar; ``fail(shard,
    reason)`` records a shard that cannot be done: its task raised or its actor died ``config.max_attempts``
    times, or no actor could be kept alive. Actors are
    ``config.actors_per_gpu`` per GPU (``use_gpu``: None asks the cluster; each actor is its own process, with
    its own GIL, sharing the GPU) or one per ``config.cpus_per_actor`` CPUs, unless
    ``config.num_actors`` says; a dead actor is restarted by Ray and its shard resubmitted by this loop. A
    shard is only ever resubmitted once no process can still be writing it.
    Raises ConfigError when the actors cannot start (e.g. the model does not load on a worker).
    """
    shards = list(shards)
    ray = connect(config.address)
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
    from tqdm import tqdm

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) if use_gpu is None else (1 if use_gpu else 0)
    if gpus:
        count = config.num_actors or max(1, int(resources.get("GPU", 1))) * config.actors_per_gpu
    else:
        count = config.num_actors or max(1, int(resources.get("CPU", 1)) // config.cpus_per_actor)
    remote = ray.remote(actor_class).options(num_gpus=1 / config.actors_per_gpu if gpus else 0,
                                             num_cpus=config.cpus_per_actor,
                                             max_restarts=-1, max_task_retries=0)
    actors = [remote.remote(job) for _ in range(min(count, len(shards)))]
    try:
        ray.get([actor.ready.remote() for actor in actors])
    except RayActorError as error:
        raise ConfigError(f"the {name} actors could not start: {error}") from error

    began = time.perf_counter()
    queue = deque(sorted(shards))
    # shards whose actor may still be running them (Ray said "unavailable", not "died"): they wait for that
    # actor's next incarnation, which Ray starts only once the old process is gone, so no two writers overlap
    pinned: list[deque] = [deque() for _ in actors]
    attempts = {shard: 0 for shard in shards}
    load = [0] * len(actors)
    in_flight: dict = {}  # task ref -> (actor index, shard)
    recovering: dict = {}  # ready-ping ref -> actor index, for actors Ray is restarting
    recoveries = [0] * len(actors)
    computed = retries = failed_rows = 0
    bar = tqdm(total=sum(shard_size(shard) for shard in shards), unit="img", desc=name,
               disable=not config.progress, file=sys.stderr, smoothing=0.1)

    def give_up(shard, reason):
        fail(shard, reason)
        bar.update(shard_size(shard))

    def retry_or_give_up(shard, reason, target: deque):
        nonlocal retries
        if attempts[shard] < config.max_attempts:
            retries += 1
            target.appendleft(shard)
        else:
            give_up(shard, f"{reason} (tried {attempts[shard]} times)")

    recovering_since: dict = {}  # actor index -> when its current recovery began

    def recover(i):
        if i not in recovering.values() and actors[i] is not None:
            recovering[actors[i].ready.remote()] = i
            recovering_since.setdefault(i, time.monotonic())

    def drop(i):
        """Actor ``i`` leaves the pool; the shards waiting for it go to the others."""
        ray.kill(actors[i], no_restart=True)
        actors[i] = None
        queue.extendleft(reversed(pinned[i]))
        pinned[i].clear()
        recovering_since.pop(i, None)

    try:
        while queue or in_flight or any(pinned):
            usable = [i for i in range(len(actors)) if actors[i] is not None and i not in recovering.values()]
            for i in usable:
                while (pinned[i] or queue) and load[i] < IN_FLIGHT:
                    shard = (pinned[i] or queue).popleft()
                    attempts[shard] += 1
                    in_flight[submit(actors[i], shard)] = (i, shard)
                    load[i] += 1
            if not in_flight and not recovering:  # every actor is gone for good
                for shard in [*queue, *(shard for waiting in pinned for shard in waiting)]:
                    give_up(shard, f"no {name} actor could be kept alive (see the Ray worker logs)")
                break
            done, _ = ray.wait(list(in_flight) + list(recovering), num_returns=1, timeout=30.0)
            for ref, i in list(recovering.items()):
                if ref not in done and time.monotonic() - recovering_since[i] > RECOVERY_TIMEOUT:
                    del recovering[ref]  # never rescheduled: do not wait for it forever
                    drop(i)
            for ref in done:
                if ref in recovering:
                    i = recovering.pop(ref)
                    try:
                        ray.get(ref)  # restarted: usable again
                        recovering_since.pop(i, None)
                    except RayActorError:
                        recoveries[i] += 1
                        if recoveries[i] > RECOVERIES:
                            drop(i)
                        else:
                            time.sleep(min(2.0, 0.1 * 2 ** recoveries[i]))
                            recover(i)
                    continue
                i, shard = in_flight.pop(ref)
                load[i] -= 1
                try:
                    report = ray.get(ref)
                except ActorDiedError as error:  # the process is gone (OOM, segfault, node lost): Ray restarts it
                    recover(i)
                    retry_or_give_up(shard, f"the actor died on this shard: {error}", queue)
                except RayActorError as error:  # unavailable: the task may still run there, so end that process
                    if actors[i] is not None:
                        ray.kill(actors[i], no_restart=False)
                        recover(i)
                    retry_or_give_up(shard, f"the actor became unavailable on this shard: {error}",
                                     queue if actors[i] is None else pinned[i])
                except RayTaskError as error:  # an exception in the task (the actor lives on): retried, then failed
                    cause = str(error.cause if error.cause is not None else error).strip().splitlines()[-1]
                    retry_or_give_up(shard, cause, queue)
                else:
                    computed += report["rows"]
                    failed_rows += report["failed"] + report["nonfinite"]
                    bar.set_postfix(failed=failed_rows, refresh=False)
                    bar.update(shard_size(shard))
    finally:
        bar.close()
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
    return DispatchResult(computed, retries, time.perf_counter() - began)
