"""The sync agent: one long-running process that runs its tasks in turn until asked to stop.

A task is anything with ``name`` and ``run_once() -> bool`` (True: it did some work, so it is
asked again at once; False: nothing to do now). ``build_agent`` assembles them from the config,
in this order: ``upload`` (``sync.uploader``), ``review-submit`` (``sync.submit``: each finished
batch to the review backend, once), ``merge`` (collect finished reviews and merge them into the
dataset, every ``[sync.review] collect_interval``) and ``models`` (pull, verify, gate, switch,
reload; only with a ``[sync.models] registry``), preceded by ``training`` (a SageMaker training job
whose bundle is published to that registry; only with ``[sync.training]``, ``sync.training_job``). ``RetryableError`` from a task is logged and the agent
carries on (the work stays in the database for the next pass); ``PermanentError`` ends the run
so that the command can say what to fix.

Shutdown: SIGTERM / SIGINT only set the stop ``Event``; tasks check it between objects, so the
object in flight is finished, then the agent closes what it opened.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from .errors import (DiskFault, PermanentError, RetryableError, Stopped, SyncConfigError, describe_io_error,
                     free_space, io_fault_of, read_only_fs)

if TYPE_CHECKING:
    from service.metrics import MetricsRecorder

    from .config import SyncConfig

log = logging.getLogger(__name__)


class Task(Protocol):
    """One kind of sync work. ``run_once`` does a bounded step and says whether there was work."""

    name: str

    def run_once(self) -> bool: ...


class Every:
    """A task run at most once per ``interval`` seconds (the agent calls every task each pass;
    collecting reviews from a server at that pace would be wasteful). ``ran``: whether the last
    ``run_once`` ran the task (a pass where it was not due is no success of it: the agent's
    last-success metric read "now" 5 passes in 6 of a merge failing each time it ran)."""

    def __init__(self, task: Task, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.task, self.interval, self.clock = task, float(interval), clock
        self.name = task.name
        self._next = 0.0
        self.ran = False

    def run_once(self) -> bool:
        now = self.clock()
        self.ran = now >= self._next
        if not self.ran:
            return False
        self._next = now + self.interval
        return self.task.run_once()


@dataclass(frozen=True)
class _Fault:
    """A task's unexpected failures in a row: how many, when it may run again, and the error
    that ``last_error`` reports meanwhile."""

    count: int
    next_try: float
    error: RetryableError
    disk: str | None = None  # a disk fault: what the disk said (``Agent._disk_fault``)


@dataclass
class Agent:
    """Runs ``tasks`` round-robin; sleeps ``poll_interval`` seconds when none had work.

    ``heartbeat`` (``clock`` seconds) moves at every task call and at every ``beat()`` a task
    makes while it progresses; ``healthy()`` says whether it moved within ``stall_limit``
    seconds, for the systemd watchdog. ``on_pass(did_work)`` is called after each pass (e.g. to
    update the systemd status line). A task that raised an unexpected exception waits
    ``fault_base * 2**(n-1)`` seconds (at most ``fault_cap``) after its n-th fault in a row; a
    task the local disk failed (full, read-only, I/O errors: ``DiskFault`` or an error
    ``service.errors.is_io_fault`` names) waits ``disk_base * 2**(n-1)`` seconds (at most
    ``disk_cap``): the disk's fault is said once, with the path and the free space on
    ``disk_paths``, and the work resumes by itself within ``disk_cap`` of the disk answering.
    """

    tasks: Sequence[Task]
    poll_interval: float = 10.0
    stop: threading.Event = field(default_factory=threading.Event)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    last_error: RetryableError | None = None
    stall_limit: float = 900.0
    on_pass: Callable[[bool], None] | None = None
    clock: Callable[[], float] = time.monotonic
    fault_base: float = 30.0
    fault_cap: float = 900.0
    disk_base: float = 5.0
    disk_cap: float = 60.0
    disk_paths: list[Any] = field(default_factory=list)
    metrics: Any = None  # a ``service.metrics.MetricsRecorder``: each task's last success and errors
    heartbeat: float = field(init=False)
    _faults: dict[int, _Fault] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.heartbeat = self.clock()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set the stop event (main thread only)."""
        def handle(signum: int, frame: Any) -> None:
            log.info("signal %s: finishing the current object, then stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def beat(self) -> None:
        """A task made progress (an object sent, a file downloaded): the watchdog is fed.

        Only the heartbeat's time is written (one float, atomic for the watchdog's thread).
        """
        self.heartbeat = self.clock()

    def healthy(self) -> bool:
        """True while the loop is alive: a task was called or beat within ``stall_limit`` seconds."""
        return self.clock() - self.heartbeat < max(self.stall_limit, 3 * self.poll_interval)

    def run_pass(self) -> bool:
        """Each task once (those backing off after a fault are skipped); True when any had work.

        ``Stopped`` from a task ends the pass and sets ``stop``: the run ends cleanly.
        """
        did = False
        self.last_error = None
        for task in self.tasks:
            if self.stop.is_set():
                break
            fault = self._faults.get(id(task))
            if fault is not None and self.clock() < fault.next_try:
                self.last_error = fault.error  # its work is still left for later
                continue
            self.beat()
            ok = False
            try:
                did = task.run_once() or did
                ok = True
            except Stopped as exc:
                log.info("%s: %s; the work resumes on the next run", task.name, exc)
                self.stop.set()
                break
            except DiskFault as exc:
                self._disk_fault(task, exc)
                continue
            except RetryableError as exc:
                log.warning("%s: %s; the work waits for the next pass", task.name, exc)
                self.last_error = exc
            except (PermanentError, SyncConfigError):
                raise
            except Exception as exc:
                fault = io_fault_of(exc)
                if fault is not None:
                    self._disk_fault(task, fault)
                else:
                    self._fault(task, exc)
                continue
            finally:
                if self.metrics is not None and not self.stop.is_set() and getattr(task, "ran", True):
                    self.metrics.task_pass(task.name, ok)
            old = self._faults.pop(id(task), None)
            if old is not None and old.disk is not None:
                log.warning("%s: the disk works again; the work goes on", task.name)
        self.beat()
        if self.on_pass is not None:
            self.on_pass(did)
        return did

    def _fault(self, task: Task, exc: Exception) -> None:
        """Log an unexpected exception with its traceback; the task waits before its next call.

        The wait keeps a task that fails at once every pass from filling the journal with the
        same traceback while the other tasks run; it has no jitter, so that the next try is
        the one the log announced.
        """
        old = self._faults.get(id(task))
        count = 1 if old is None else old.count + 1
        delay = min(self.fault_cap, self.fault_base * 2.0 ** min(count - 1, 62))
        error = RetryableError(f"{task.name}: unexpected {type(exc).__name__}: {exc}")
        self._faults[id(task)] = _Fault(count, self.clock() + delay, error)
        self.last_error = error
        log.error("%s: unexpected %s (fault %d in a row); this task is tried again in %.0f s, "
                  "the others go on", task.name, type(exc).__name__, count, delay, exc_info=exc)

    def _disk_fault(self, task: Task, exc: BaseException) -> None:
        """The local disk failed ``task`` (full, read-only, I/O errors): nothing it did was marked
        done, so it is only tried again after a short wait, ``disk_base`` doubling up to
        ``disk_cap`` while the fault lasts (no spinning, and no wait of ``fault_cap`` once space
        is back). Logged once per distinct fault, without a traceback, with the path and the free
        space; ``last_error`` (the systemd STATUS line, ``--once``'s message) says it meanwhile."""
        if isinstance(exc, DiskFault):
            text = str(exc)
        else:
            where = getattr(exc, "filename", None)
            paths = [where] if where else list(self.disk_paths)
            text = describe_io_error(exc) + (f" ({', '.join(free_space(p) for p in paths)})" if paths else "")
        old = self._faults.get(id(task))
        count = 1 if old is None or old.disk is None else old.count + 1
        delay = min(self.disk_cap, self.disk_base * 2.0 ** min(count - 1, 62))
        error = DiskFault(f"{task.name}: disk fault: {text}; nothing was marked done, retried in {delay:.0f} s")
        key = text.split(" (", 1)[0]  # the free space in it changes from try to try
        self._faults[id(task)] = _Fault(count, self.clock() + delay, error, key)
        self.last_error = error
        first = old is None or old.disk != key
        (log.error if first else log.debug)("%s: disk fault (%d in a row): %s; its work waits, nothing is marked "
                                            "done, and it is tried again in %.0f s", task.name, count, text, delay)

    def run(self, once: bool = False) -> None:
        """Loop until stopped; with ``once``, until a pass finds no work (or a retryable failure)."""
        try:
            while not self.stop.is_set():
                if self.run_pass():
                    continue
                if once:
                    break
                self.stop.wait(self.poll_interval)
        finally:
            self.close()

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.closers.clear()


def validated_settings(cfg: SyncConfig, env: Mapping[str, str] = os.environ) -> tuple[Any, Any, Any]:
    """(review, pull, training) settings of ``cfg``: ``[sync.review]`` (the Label Studio token
    from ``env`` first), ``[sync.dataset]`` / ``[sync.models]`` with the daemon's token and TLS,
    and ``[sync.training]`` (None when absent), validated in that order before anything is
    opened. ``build_agent`` starts from them; ``annotator doctor`` runs them as its sync check."""
    from .pull_settings import check_public_key, settings_from
    from .review_settings import review_settings_from

    review = review_settings_from(cfg, env)
    pull = dataclasses.replace(settings_from(cfg.store_root, cfg.tables, cfg.base, source=cfg.source),
                               daemon_token=cfg.daemon_token, daemon_tls=cfg.daemon_tls)
    check_public_key(pull)
    return review, pull, _training_settings(cfg, pull)


def registry_warning(cfg: SyncConfig, pull: Any, training: Any) -> str | None:
    """A warning when ``[sync.models.registry]`` is a local folder that does not exist (and this
    agent does not publish into it, which makes it): it read as an empty registry, so a typo'd
    path meant "no newer bundle" for good, said nowhere. Not a refusal: a registry that the first
    training publication (on this box or another) makes later is a normal first set-up, and the
    uploads and reviews must not wait for it. Said at the agent's start and by ``annotator
    doctor`` (WARN), and by ``annotator models list`` / ``pull``."""
    from .config import at
    from .models_cli import registry_problem

    problem = registry_problem(pull.registry, publishing=training is not None)
    if problem is None:
        return None
    return (f"sync.models.registry: {problem}{at(cfg.source)}; the model pull finds no bundle until one is "
            "published there")


def bundle_warning(cfg: SyncConfig, pull: Any) -> str | None:
    """A warning when this agent pulls bundles (``[sync.models] registry``) into a models folder
    whose ``current`` the daemon does not load (``models_cli.bundle_elsewhere``). Said at the
    agent's start and by ``annotator doctor`` (WARN)."""
    from .models_cli import bundle_elsewhere

    if pull.registry is None:
        return None
    problem = bundle_elsewhere(cfg, pull.models_root)
    return None if problem is None else f"[sync.models]: {problem}"


def build_agent(cfg: SyncConfig, extra_tasks: Sequence[Task] = (), env: Mapping[str, str] = os.environ,
                metrics: MetricsRecorder | None = None) -> Agent:
    """The agent for a ``SyncConfig``: upload, review-submit, merge, models (see the module
    doc), then ``extra_tasks``. Every setting is validated before anything is opened."""
    from service.store import Store

    from .backoff import RetryPolicy
    from .config import open_target
    from .review_settings import open_review_backend
    from .uploader import Uploader, UploadSettings

    review, pull, training = validated_settings(cfg, env)
    warning = registry_warning(cfg, pull, training)
    if warning is not None:
        log.warning("%s", warning)
    elsewhere = bundle_warning(cfg, pull)
    if elsewhere is not None:
        log.warning("%s", elsewhere)
    if pull.daemon is None:
        pull = dataclasses.replace(pull, daemon=cfg.daemon_address)
    settings = UploadSettings(cfg.appliance_id, cfg.batch_size, cfg.max_side, cfg.jpeg_quality,
                              RetryPolicy(cfg.retry_base, cfg.retry_cap, cfg.retry_attempts))

    stop = threading.Event()
    agent = Agent([], cfg.poll_interval, stop, metrics=metrics)
    local = [cfg.target.root] if cfg.target.kind == "local" and getattr(cfg.target, "root", None) else []
    agent.disk_paths = list(dict.fromkeys(str(p) for p in (cfg.store_root, pull.dataset_root, pull.models_root, *local)))

    def open_tasks() -> list[Task]:
        """Open the store, journal, dataset and models folder and build the tasks; on any error
        what this call opened is closed again."""
        closers: list[Callable[[], Any]] = []
        try:
            store = Store(cfg.store_root)
            closers.append(store.close)
            closers.append(hold_store(cfg.store_root))  # one agent per store: before the journal opens
            target = open_target(cfg.target)
            uploader = Uploader(store, target, settings, stop=stop, metrics=metrics, progress=agent.beat)
            closers.append(uploader.close)
            tasks: list[Task] = [uploader]
            backend = open_review_backend(review, target, cfg, store)
            if backend is not None:
                tasks += [_submit_task(uploader, store, target, backend),
                          Every(_merge_task(store, pull, backend, metrics, closers), review.collect_interval)]
            if training is not None:  # before the model pull: a bundle published in a pass is pulled in it
                tasks.append(_training_task(training, store, pull, closers))
            if "models" in cfg.tables:
                tasks += _model_tasks(pull, cfg, agent, closers)
        except BaseException:
            for close in reversed(closers):
                try:
                    close()
                except Exception:  # the first error is the one to report
                    log.debug("closing after a failed start", exc_info=True)
            raise
        if metrics is not None:
            metrics.watch_store(store)
        agent.closers += closers
        return [*tasks, *extra_tasks]

    try:
        agent.tasks = open_tasks()
    except Exception as exc:
        if not _disk_fault_at_start(exc, agent.disk_paths):
            raise
        # A full or failing disk now is no reason to exit: systemd would restart the agent a few
        # times and then give up for good. It waits, says why, and starts its tasks once the
        # disk answers (``_Opening``).
        log.error("sync: cannot open the store, journal or dataset yet: %s (%s); the agent waits for the disk "
                  "and starts its tasks once it answers", getattr(exc, "strerror", None) or exc,
                  ", ".join(free_space(p) for p in agent.disk_paths))
        agent.tasks = [_Opening(agent, open_tasks)]
    except BaseException:
        agent.close()
        raise
    log.info("sync tasks: %s", ", ".join(t.name for t in agent.tasks))
    return agent


SYNC_LOCK = "sync.lock"


def hold_store(store_root: Any) -> Callable[[], None]:
    """Hold ``<store root>/sync.lock`` (``service.lockfile``) for as long as the agent runs;
    returns what releases it.

    One agent per store: two agents (the systemd unit and an ``annotator sync --once`` started by
    hand) both formed batches from one journal and sent the same objects, and the second failed
    with a traceback ("images are in a batch already"). The second is refused at once with a
    ``SyncConfigError`` naming the holder's pid; it changed nothing in the store or journal."""
    from pathlib import Path

    from service.lockfile import Held, Unopenable, hold

    path = Path(store_root) / SYNC_LOCK
    try:
        fd = hold(path)
    except Held as exc:
        raise SyncConfigError(f"another sync agent (pid {exc.pid}) is running on the store {store_root} "
                              f"(it holds {path}); one agent per store: stop it first (e.g. systemctl stop "
                              f"annotator-sync) or let it do the work") from None
    except Unopenable as exc:  # a lock file another user made unreadable (sudo with umask 077)
        raise SyncConfigError(f"the store {store_root}: {exc.advice('agent')}") from None
    except PermissionError as exc:  # no lock file, and a folder this user may not write
        raise SyncConfigError(f"the store {store_root}: this user may not create {path} ({exc.strerror}); run "
                              "the agent as the daemon's user, or give it write permission on the store") from exc
    return lambda: os.close(fd)


def _disk_fault_at_start(exc: BaseException, paths: Sequence[str]) -> bool:
    """Whether opening failed because the disk cannot take a write now (full, a file size limit,
    I/O errors, a read-only file system): ``is_io_fault``, except SQLite's "cannot open" and
    "read-only" unless a folder's file system is read-only (a disk remounted after errors),
    which otherwise mean a file this user may not write: a setting to fix, said at once."""
    fault = io_fault_of(exc)
    if fault is None:
        return False
    exc = fault
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in (
            sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
        return any(read_only_fs(p) for p in paths)
    return True


class _Opening:
    """The agent's only task while the disk refused to open its databases at start: each call
    tries again (a ``DiskFault`` meanwhile, so that the agent waits ``disk_base``..``disk_cap``)
    and, once everything opened, puts the real tasks in its place."""

    name = "open"

    def __init__(self, agent: Agent, open_tasks: Callable[[], list[Task]]) -> None:
        self.agent, self.open_tasks = agent, open_tasks

    def run_once(self) -> bool:
        from .errors import disk_fault

        try:
            tasks = self.open_tasks()
        except Exception as exc:
            if not _disk_fault_at_start(exc, self.agent.disk_paths):
                raise
            raise disk_fault("opening the store, journal or dataset", exc, self.agent.disk_paths[0]) from exc
        self.agent.tasks = tasks
        log.info("sync: the disk answers again; sync tasks: %s", ", ".join(t.name for t in tasks))
        return True


def _submit_task(uploader: Any, store: Any, target: Any, backend: Any) -> Task:
    from .submit import ReviewSubmitTask

    return ReviewSubmitTask(uploader.journal, store, target, backend)


def _merge_task(store: Any, pull: Any, backend: Any, metrics: MetricsRecorder | None,
                closers: list[Callable[[], Any]]) -> Task:
    from .dataset import Dataset
    from .merge import Merger, MergeTask

    dataset = Dataset(pull.dataset_root, holdout_fraction=pull.holdout_fraction)
    closers.append(dataset.close)
    merged = getattr(backend, "merged", None)  # Label Studio removes the shown copies of merged reviews

    def on_report(report: Any) -> None:
        if merged is not None:
            merged(report)
        if metrics is not None:  # refused by the backend's parser (``rejected``) or by the merge
            metrics.reviews_refused(len(getattr(backend, "rejected", {})) + len(report.refused))

    return MergeTask(Merger(store, dataset), backend.collect, metrics.review_merged if metrics is not None else None,
                     on_report)


def _training_settings(cfg: SyncConfig, pull: Any) -> Any:
    """``[sync.training]`` validated (None when absent); it publishes to ``[sync.models.registry]``."""
    if "training" not in cfg.tables:
        return None
    from .config import at
    from .errors import SyncConfigError
    from .training_settings import training_settings_from

    settings = training_settings_from(cfg.tables["training"], cfg.appliance_id, cfg.base, cfg.source)
    if pull.registry is None:
        raise SyncConfigError(f"sync.training: needs [sync.models.registry] to publish the bundles it trains"
                              f"{at(cfg.source)}")
    return settings


def _training_task(settings: Any, store: Any, pull: Any, closers: list[Callable[[], Any]]) -> Task:
    """The cloud training-job task (``sync.training_job``)."""
    from .config import open_target
    from .dataset import Dataset
    from .models import ModelSlots
    from .training_job import build_training_task, dataset_exporter

    dataset = Dataset(pull.dataset_root, holdout_fraction=pull.holdout_fraction)
    closers.append(dataset.close)
    slots = ModelSlots(pull.models_root)
    return build_training_task(settings, open_target(pull.registry, "sync.models.registry"), pull.store_root,
                               dataset_exporter(store, dataset, settings.propagate), current_bundle=slots.current_path)


def _model_tasks(pull: Any, cfg: SyncConfig, agent: Agent, closers: list[Callable[[], Any]]) -> list[Task]:
    """The model-pull task, when ``[sync.models]`` names a registry; reloads via the daemon's gRPC."""
    from .models import ModelPullTask
    from .models_cli import build_puller

    if pull.registry is None:
        log.info("[sync.models] has no registry table: no model pull")
        return []
    puller, closing = build_puller(pull)
    closers += [c.close for c in closing]
    puller.registry.progress = agent.beat  # a long download feeds the watchdog per file
    if pull.daemon:  # build_puller's reload_fn carries the daemon's token and TLS (pull's)
        log.info("model pull from %s every %.0f s; reload via the daemon at %s", pull.registry.kind,
                 pull.poll_interval, pull.daemon)
    return [Every(ModelPullTask(puller), pull.poll_interval)]
