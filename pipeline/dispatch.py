"""Shards to a pool of Ray actors: the one dispatch loop behind ``lrp-audit explain`` and ``evaluate``.

Why plain actors rather than Ray Data: the unit of work must be one *shard* (whole-shard writes are what
makes concurrent Zarr writers safe, and the shard is the unit of resuming), the actor must write its
results itself (so the driver never holds pixels or relevance), and a retried unit must be retried *as a
unit*. With plain actors each of these is one method of :class:`ShardPool`; Ray Data would re-batch rows
across shard boundaries and hide retries inside the streaming executor. Backpressure is explicit: each actor
has at most ``IN_FLIGHT`` shard tasks queued, and the driver only holds shard descriptors (a slice of the
Arrow row table), never images.

What a shard *is* (a store block, a Parquet file) is the caller's: a :class:`ShardTask` submits one, says its
size and records one that cannot be done. Ray is imported inside the methods, so importing this module stays light.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .config import ConfigError, RunConfig

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # shard tasks queued per actor: one running, one ready to start
RECOVERIES = 20  # failed ready-pings of a restarting actor before it is dropped from the pool
UNAVAILABLE_TIMEOUT = 120.0  # seconds a restarting actor may answer "unavailable" before it is dropped (a lost node)
NODE_CHECK = 2.0  # seconds between looks at whether the node of an actor whose parts wait for it is dead
RECOVERY_TIMEOUT = 900.0  # seconds a restarting actor may stay unscheduled (a lost node, no room) before it is dropped


def identity(actor: Any) -> tuple[str, int]:
    """Run in an actor (``actor.__ray_call__``): the node and process that answer for it now. Its recovery
    pings use it to tell a new incarnation from the process whose task ended."""
    import ray

    return ray.get_runtime_context().get_node_id(), os.getpid()


def connect(address: str | None = None):
    """``ray``, connected to ``address``, else RAY_ADDRESS (set by ``ray job submit``), else a new local cluster."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(logging_level="WARNING", include_dashboard=False)
            from . import watchdog

            watchdog.start()  # a kill -9 of this driver leaves no Ray process of its cluster behind
    return ray


class Part(NamedTuple):
    """Rows ``[lo, hi)`` (offsets inside the shard) of one shard: the whole shard, or a piece of a bisected one."""

    shard: int
    lo: int
    hi: int
    whole: bool = True

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def halves(self) -> tuple[Part, Part]:
        middle = (self.lo + self.hi) // 2
        return Part(self.shard, self.lo, middle, False), Part(self.shard, middle, self.hi, False)


class ShardTask(Protocol):
    """What a kind of shard work tells the pool. ``bisect``: a part of a shard may be submitted on its own (a
    shard whose actor died is then split until the row that kills it is found); else a shard is always whole."""

    bisect: bool

    def submit(self, actor: Any, part: Part) -> Any:
        """Start one task on ``actor``: an ObjectRef of a report with ``rows``, ``failed`` and ``nonfinite``."""

    def size(self, shard: int) -> int:
        """Rows of the shard."""

    def fail(self, part: Part, reason: str) -> None:
        """Record a part that cannot be done (its rows that are not ok), with the reason."""

    # optional: ``fatal(error) -> str | None``, the message when a task's exception must end the whole run


class PoolAborted(RuntimeError):
    """A task failed in a way that ends the run (``ShardTask.fatal`` said so, e.g. the storage is full or
    read-only): nothing more is submitted, and the actors are ended."""


@dataclass
class DispatchResult:
    computed_rows: int  # rows the actors reported done (ok or not) this run
    retries: int  # shard tasks resubmitted after their actor died or their task raised
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the actors' reports say besides counts (``notes``)


class ShardPool:
    """A pool of ``actor_class(job)`` actors that runs every shard of a :class:`ShardTask` and waits for them all.

    Actors are ``config.actors_per_gpu`` per GPU (``use_gpu``: None asks the cluster; each actor is its own
    process, with its own GIL, sharing the GPU) or one per ``config.cpus_per_actor`` CPUs, unless
    ``config.num_actors`` says. A dead actor is restarted by Ray (``max_restarts=-1``) and its shard resubmitted
    here, up to ``config.max_attempts`` tries; a shard is only ever resubmitted once no process can still be
    writing it, and at most one part of a shard is in flight at any time.
    """

    def __init__(self, name: str, actor_class: type, job: Any, config: RunConfig, use_gpu: bool | None = None):
        self.name, self.actor_class, self.job, self.config, self.use_gpu = name, actor_class, job, config, use_gpu
        self.concurrency = 1  # shard tasks one actor runs at once: the actor class's ``concurrency(gpu)``, if any

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self, shards: Iterable[int], task: ShardTask) -> DispatchResult:
        """Every shard done or recorded failed; raises ConfigError when the actors cannot start."""
        from tqdm import tqdm

        shards = sorted(shards)
        self.task, self.ray = task, connect(self.config.address)
        self._start(len(shards))
        began = time.perf_counter()
        self.queue = deque(Part(shard, 0, task.size(shard)) for shard in shards)
        self.waiting: dict[int, deque] = {}  # shard -> its parts that wait for the part now in flight
        self.attempts: dict[Part, int] = {}
        self.in_flight: dict = {}  # task ref -> (actor index, part, the process it was submitted to)
        self.alone: set[Part] = set()  # parts that were running beside another when their actor ended: run alone
        self.computed = self.retries = self.failed_rows = 0
        self.notes: list[str] = []
        self.bar = tqdm(total=sum(part.size for part in self.queue), unit="img", desc=self.name,
                        disable=not self.config.progress, file=sys.stderr, smoothing=0.1)
        try:
            while self.queue or self.in_flight or any(self.pinned):
                self._fill()
                if not self.in_flight and not self.recovering and not self.later:  # every actor gone for good
                    self._abandon()
                    break
                self._step()
        finally:
            self.bar.close()
            for actor in self.actors:
                if actor is not None:
                    self.ray.kill(actor, no_restart=True)
        return DispatchResult(self.computed, self.retries, time.perf_counter() - began, self.notes)

    def _start(self, shards: int) -> None:
        from ray.exceptions import RayActorError

        ray, config = self.ray, self.config
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) if self.use_gpu is None else (1 if self.use_gpu else 0)
        self.concurrency = getattr(self.actor_class, "concurrency", lambda gpu: 1)(bool(gpus))
        if gpus:
            count = config.num_actors or max(1, int(resources.get("GPU", 1))) * config.actors_per_gpu
        else:
            count = config.num_actors or max(1, int(resources.get("CPU", 1)) // config.cpus_per_actor)
        remote = ray.remote(self.actor_class).options(num_gpus=1 / config.actors_per_gpu if gpus else 0,
                                                      num_cpus=config.cpus_per_actor,
                                                      max_concurrency=self.concurrency, max_restarts=-1,
                                                      max_task_retries=0)
        self.actors = [remote.remote(self.job) for _ in range(min(count, shards))]
        # parts whose actor may still be running them (Ray said "unavailable", not "died"): they wait for that
        # actor's next incarnation, which Ray starts only once the old process is gone, so no two writers overlap
        self.pinned: list[deque] = [deque() for _ in self.actors]
        self.load = [0] * len(self.actors)
        self.recovering: dict = {}  # ready-ping ref -> actor index, for actors Ray is restarting
        self.later: dict = {}  # actor index -> when to ping it again (a recovering actor between two pings)
        self.recovering_since: dict = {}  # actor index -> when its current recovery began
        self.recoveries = [0] * len(self.actors)
        self.ended: dict = {}  # actor index -> the process (node, pid) whose end its recovery waits out
        self.killed: set = set()  # processes the pool has asked Ray to end (never asked twice: see recovered)
        try:
            self.process = ray.get([actor.__ray_call__.remote(identity) for actor in self.actors])
        except RayActorError as error:
            raise ConfigError(f"the {self.name} actors could not start: {error}") from error

    def _fill(self) -> None:
        """Give every usable actor parts until it has ``IN_FLIGHT`` of them; a part in ``alone`` runs by itself."""
        for i, actor in enumerate(self.actors):
            if actor is None or self._recovering(i):
                continue
            while (self.pinned[i] or self.queue) and self.load[i] < IN_FLIGHT:
                source = self.pinned[i] or self.queue
                if self.load[i] and (source[0] in self.alone or self._running_alone(i)):
                    break
                part = source.popleft()
                self.attempts[part] = self.attempts.get(part, 0) + 1
                self.in_flight[self.task.submit(actor, part)] = (i, part, self.process[i])
                self.load[i] += 1

    def _running_alone(self, i: int) -> bool:
        return any(j == i and part in self.alone for j, part, _ in self.in_flight.values())

    def _recovering(self, i: int) -> bool:
        return i in self.later or i in self.recovering.values()

    def _step(self) -> None:
        """Wait for one task or ready-ping (or the time of a ping to send) and handle it by what happened."""
        now = time.monotonic()
        timeout = max(0.0, min([30.0, *(when - now for when in self.later.values())]))
        held = [i for i in set(self.recovering.values()) | set(self.later) if self.pinned[i]]
        if held:  # parts wait for a recovering actor: look at its node now and then, whatever its pings do
            timeout = min(timeout, NODE_CHECK)
        refs = list(self.in_flight) + list(self.recovering)
        if refs:
            done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)
            done = []
        for i in held:
            self._release_if_lost(i)
        for i, when in list(self.later.items()):
            if when <= time.monotonic():
                del self.later[i]
                self._ping(i)
        for ref, i in list(self.recovering.items()):
            if ref not in done and time.monotonic() - self.recovering_since[i] > RECOVERY_TIMEOUT:
                del self.recovering[ref]  # never rescheduled: do not wait for it forever
                self.drop(i)
        for ref in done:
            if ref in self.recovering:
                self.recovered(ref)
            elif ref in self.in_flight:  # else handled already, with the other tasks of its actor
                self._settle(self.in_flight[ref][0], ref)

    def _settle(self, i: int, ref: Any) -> None:
        """Handle a finished task of actor ``i`` by what happened to it."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            report = self.ray.get(ref)
        except RayActorError:
            self._ended(i, ref)
            return
        except RayTaskError as error:  # an exception in the task (the actor lives on)
            self.task_error(self._pop(ref), error)
        else:
            self._done(self._pop(ref), report)

    def _ended(self, i: int, ref: Any) -> None:
        """Actor ``i``'s process ended (or Ray lost it): all its queued tasks fail at once, and Ray may report any of
        them first. So they are gathered (a bounded wait) and handled in the order they were submitted: the first
        ``concurrency`` that failed may have been running, the others never ran (bystanders: resubmitted as they
        were, no attempt counted). Blaming whichever failure Ray reported first would bisect an innocent shard and
        let the culprit through uncounted.

        With one task running at a time the first is the suspect (an attempt counted, bisected). With two running
        (GPU explain actors) which one ended the process is unknown: neither is blamed, both go back as bystanders
        and run alone from then on (:attr:`alone`), so the next death is pinned on the right part and a row that
        kills its actor still fails only itself."""
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        process = self.in_flight[ref][2]
        if self.actors[i] is None or self.ended.get(i) == process or self.process[i] != process:
            self._late(i, ref)  # a dropped actor's, or an already-handled process's task: never blamed
            return
        order = {r: k for k, r in enumerate(self.in_flight)}  # dict order: submission order
        waited = time.monotonic()
        refs = sorted([ref, *self._queued_on(i, ref)], key=order.__getitem__)
        log.warning("%s actor %d ended; %d of its tasks gathered in %.1f s", self.name, i, len(refs),
                    time.monotonic() - waited)
        failed = []
        for ref in refs:
            part = self._pop(ref)
            try:
                report = self.ray.get(ref)
            except RayActorError as error:
                failed.append((part, error))
            except RayTaskError as error:
                self.task_error(part, error)
            else:  # done before the end, reported late
                self._done(part, report)
        if not failed:
            return
        running = failed[:self.concurrency]
        blame = len(running) == 1
        if not blame:
            self.alone.update(part for part, _ in running)
        gone = any(isinstance(error, ActorDiedError) for _, error in failed)
        (part, error), rest = failed[0], failed[1:]
        if isinstance(error, ActorDiedError):  # the process is gone (OOM, segfault, node lost)
            self.died(i, part, error, blame)
        else:  # unavailable: the task may still run there
            self.unavailable(i, part, error, blame)
        for part, _ in rest:
            self._bystander(i, part, gone)

    def _late(self, i: int, ref: Any) -> None:
        """A task of a process whose end was handled already, reported after the bounded wait of :meth:`_ended`: it
        was not counted then, so it is not blamed now (a bystander; with two tasks per actor it may have been
        running, so it runs alone from now on)."""
        from ray.exceptions import ActorDiedError

        part = self._pop(ref)
        log.warning("%s actor %d: shard %d rows [%d, %d) reported its end late; not blamed", self.name, i, *part[:3])
        if self.concurrency > 1:
            self.alone.add(part)
        try:
            self.ray.get(ref)
        except ActorDiedError:
            self._bystander(i, part, True)
        except Exception:  # unavailable: it waits for the next incarnation, as the others of that process do
            self._bystander(i, part, False)

    def _pop(self, ref: Any) -> Part:
        i, part, _ = self.in_flight.pop(ref)
        self.load[i] -= 1
        return part

    def _queued_on(self, i: int, seen: Any) -> list:
        """Actor ``i``'s other tasks, once they have finished with it (a bounded wait)."""
        refs = [ref for ref, (j, _, _) in self.in_flight.items() if j == i and ref != seen]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=60.0)
        ready = set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        return [ref for ref in refs if ref in ready]

    def _bystander(self, i: int, part: Part, gone: bool) -> None:
        """A part that was queued behind the one its actor ended on goes back unchanged (no attempt counted). When
        the process is ``gone`` (Ray said "died") it never ran and any actor may take it; else (only "unavailable")
        it waits for the actor's next incarnation, since no process can still be running it then."""
        self.attempts[part] -= 1
        (self.queue if gone or self.actors[i] is None else self.pinned[i]).appendleft(part)

    def _done(self, part: Part, report: dict) -> None:
        self.computed += report["rows"]
        self.failed_rows += report["failed"] + report["nonfinite"]
        self.notes += report.get("notes", [])
        self.bar.set_postfix(failed=self.failed_rows, refresh=False)
        self.bar.update(part.size)
        self._release(part.shard)

    def _release(self, shard: int) -> None:
        """The part of ``shard`` in flight has ended: the shard's next part may start."""
        waiting = self.waiting.get(shard)
        if waiting:
            self.queue.appendleft(waiting.popleft())

    # ---- one method per failure mode --------------------------------------------------------------------
    def died(self, i: int, part: Part, error: Exception, blame: bool = True) -> None:
        """The actor's process is gone: it restarts; the part is bisected (to find a row that kills it) or retried
        (not ``blame``: another task was running beside it, and the part goes back as a bystander)."""
        log.warning("%s actor %d died on shard %d rows [%d, %d)", self.name, i, *part[:3])
        self.recover(i)
        if blame:
            self._bisect_or_retry(part, "died", error, self.queue)
        else:
            self._bystander(i, part, True)

    def unavailable(self, i: int, part: Part, error: Exception, blame: bool = True) -> None:
        """Ray lost touch with the actor, whose task may still run: the part waits for the actor's next incarnation,
        which the recovery pings tell from the process that ran it (:meth:`recovered`), or for Ray to say that the
        node of that process is dead.

        No ``ray.kill`` here: by the time Ray reports a process that exited (a segfault) as "unavailable", it has
        usually restarted the actor already (measured with Ray 2.60: restart count 1 and a new pid before the error
        reached the driver), so a kill now ends the *new* incarnation, and when the next ping is answered before the
        kill lands, it ends the process under the next part, an innocent one, which was then blamed: this was the
        neighbour row failed "twice" in full-suite runs (issue 15)."""
        log.warning("%s actor %d became unavailable on shard %d rows [%d, %d)", self.name, i, *part[:3])
        self.recover(i)
        if blame:
            target = self.queue if self.actors[i] is None else self.pinned[i]
            self._bisect_or_retry(part, "became unavailable", error, target)
        else:
            self._bystander(i, part, False)

    def task_error(self, part: Part, error: Exception) -> None:
        """The task raised (a transient storage error, say) and the actor lives on: retried, then recorded failed."""
        cause = getattr(error, "cause", None)
        fatal = getattr(self.task, "fatal", None)
        message = fatal(cause if cause is not None else error) if fatal is not None else None
        if message:
            raise PoolAborted(message)
        self._retry(part, str(cause if cause is not None else error).strip().splitlines()[-1], self.queue)

    def recover(self, i: int) -> None:
        """Ping actor ``i`` until a process other than the one whose task ended answers for it; no work meanwhile."""
        if not self._recovering(i) and self.actors[i] is not None:
            self.ended.setdefault(i, self.process[i])
            self.recovering_since.setdefault(i, time.monotonic())
            self._ping(i)

    def _ping(self, i: int, delay: float = 0.0) -> None:
        if delay:
            self.later[i] = time.monotonic() + delay
        elif self.actors[i] is not None:
            self.recovering[self.actors[i].__ray_call__.remote(identity)] = i

    def recovered(self, ref: Any) -> None:
        """A ping came back: the actor is usable again, or is pinged again (after a pause) or dropped.

        Answered by the process whose task ended: Ray lost touch with it but it lives, and may still be running the
        task, so it is ended (once: a second kill could land on the next incarnation) and pinged again. "Unavailable"
        while Ray restarts the actor is not a failed ping (a restart took over 30 s on a loaded 2-core machine);
        that wait is bounded by ``UNAVAILABLE_TIMEOUT``, and when Ray says the node of the ended process is dead
        (:meth:`_unreachable`) the parts that waited for the actor go to the others at once."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        i = self.recovering.pop(ref)
        try:
            answer = tuple(self.ray.get(ref))
        except ActorUnavailableError:
            self._unreachable(i)
            return
        except RayActorError:
            self.recoveries[i] += 1
            if self.recoveries[i] > RECOVERIES:
                self.drop(i)
            else:
                self._ping(i, min(2.0, 0.1 * 2 ** self.recoveries[i]))
            return
        ended = self.ended.get(i)
        if answer == ended:
            if ended not in self.killed:
                log.warning("%s actor %d: its process %s lives on; ending it", self.name, i, ended[1])
                self.killed.add(ended)
                self.ray.kill(self.actors[i], no_restart=False)
            if time.monotonic() - self.recovering_since[i] > UNAVAILABLE_TIMEOUT:
                self.drop(i)  # it does not end: its parts go to the others
            else:
                self._ping(i, 0.5)
            return
        log.warning("%s actor %d is back after %.1f s", self.name, i, time.monotonic() - self.recovering_since[i])
        self.process[i] = answer
        self.ended.pop(i, None)
        self.recovering_since.pop(i, None)
        self.recoveries[i] = 0  # the count is of failed pings in a row, within one recovery

    def _unreachable(self, i: int) -> None:
        """Actor ``i`` answered "unavailable": its parts go to the others once its node is dead, and the actor leaves
        the pool after ``UNAVAILABLE_TIMEOUT`` (the fallback when Ray does not say so)."""
        self._release_if_lost(i)
        if time.monotonic() - self.recovering_since[i] > UNAVAILABLE_TIMEOUT:
            self.drop(i)
        else:
            self._ping(i, 1.0)

    def _release_if_lost(self, i: int) -> None:
        """When Ray says the node of actor ``i``'s ended process is dead, that process cannot write any more: the
        parts that wait for the actor's next incarnation go to the others at once (Ray may still restart the actor
        elsewhere, and it rejoins the pool then)."""
        node = self.ended.get(i, self.process[i])[0]
        if self.pinned[i] and not self._node_alive(node):
            log.warning("%s actor %d: its node %s is dead; %d parts waiting for it go to the others, %.1f s after its "
                        "end", self.name, i, node[:12], len(self.pinned[i]),
                        time.monotonic() - self.recovering_since[i])
            self.queue.extendleft(reversed(self.pinned[i]))
            self.pinned[i].clear()

    def _node_alive(self, node: str) -> bool:
        """Whether Ray's control store lists ``node`` as alive (``ray.nodes()``, read from the GCS; the state API,
        ``ray.util.state``, needs the dashboard, which the pool's own cluster runs without)."""
        try:
            nodes = self.ray.nodes()
        except Exception as error:  # the GCS is slow or restarting (likely while a node fails): ask again later
            log.warning("%s pool: ray.nodes() failed (%s); node %s taken as alive for now", self.name, error, node[:12])
            return True
        return any(entry["NodeID"] == node and entry["Alive"] for entry in nodes)

    def drop(self, i: int) -> None:
        """Actor ``i`` leaves the pool; the parts waiting for it go to the others."""
        log.warning("%s actor %d dropped from the pool (%d parts waiting for it go to the others)", self.name, i,
                    len(self.pinned[i]))
        self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = None
        self.queue.extendleft(reversed(self.pinned[i]))
        self.pinned[i].clear()
        self.recovering_since.pop(i, None)
        self.ended.pop(i, None)
        self.later.pop(i, None)

    # ---- retry or give up -------------------------------------------------------------------------------
    def _bisect_or_retry(self, part: Part, what: str, error: Exception, target: deque) -> None:
        """The actor's process ended on ``part``. A whole shard is first retried as it is (most deaths are
        transient: a lost node, memory pressure from elsewhere), so the rerun gives the same bits. When it ends the
        process again, a row in it may be what kills it (a decoder segfault, an out-of-memory image): with
        ``task.bisect`` the part is halved until that row runs alone (each half a new part, the second waiting for
        the first); a single row is retried up to ``max_attempts``, then failed."""
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        suspect = not part.whole or self.attempts[part] >= min(2, self.config.max_attempts)
        if self.task.bisect and part.size > 1 and suspect:
            first, second = part.halves()
            self.retries += 1
            self.waiting.setdefault(part.shard, deque()).appendleft(second)
            target.appendleft(first)
        else:
            unit = "row" if self.task.bisect and part.size == 1 else "shard"
            self._retry(part, f"the actor {what} on this {unit}: {first_line}", target)

    def _retry(self, part: Part, reason: str, target: deque) -> None:
        if self.attempts[part] < self.config.max_attempts:
            self.retries += 1
            target.appendleft(part)
        else:
            self._give_up(part, f"{reason} (tried {self.attempts[part]} times)")

    def _abandon(self) -> None:
        """No actor is left: every part not done is recorded failed (a waiting part is released as its turn comes)."""
        while self.queue or any(self.pinned):
            part = self.queue.popleft() if self.queue else next(p for p in self.pinned if p).popleft()
            self._give_up(part, f"no {self.name} actor could be kept alive (see the Ray worker logs)")

    def _give_up(self, part: Part, reason: str) -> None:
        self.task.fail(part, reason)
        self.bar.update(part.size)
        self._release(part.shard)
