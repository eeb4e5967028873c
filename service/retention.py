"""Retention: what the appliance deletes on its own, and when (``[retention]``).

Without it the box fills: at one image a second of 100 KB the store grows about 9 GB a day, and
in ``drop.processed_mode = "move"`` the drop folder's ``processed/`` keeps a second copy of every
image. Ingest pauses at ``store.min_free_mb`` (nothing is lost), and nothing gave the space back.

Three rules, each off until set (``None``: kept for ever):

- ``processed_days``: a file under ``<drop>/processed/`` goes once both it (its mtime) and the
  store's row for its bytes (``received_at``) are older than this. Only files whose bytes the
  store has a row for (hashed, not trusted by name): a file put there by hand, or one the store
  never took, stays. The record, and the store's own copy, stay.
- ``auto_image_days``: the store's bytes of an image auto-accepted more than this long ago
  (``Store.prune_auto_images``). The row, its record and history stay (``annotator status``,
  ``annotator show`` lists it), the sync agent's merge takes its auto label out of the training
  set, and the store exports leave it out (no pixels to train on). Reviewed images, the human
  work training needs, and every image still in work are never pruned. The same bytes coming
  in again (a drop, a gRPC call) are kept again (``Store.ingest``), not annotated again.
- ``quarantine_days``: a file in ``quarantine/`` (the drop folder's, else the store root's: files
  that could not be used, and copies of images that failed) goes with its ``<name>.reason.txt``
  once the reason (written when it was quarantined; the file itself keeps its own mtime) is
  older than this. A file with no reason beside it (put there by hand) stays. The store's row
  of a failed image, with its error and history, stays; its quarantine copy is then gone.
  The file goes before its reason, so a kill between the two leaves an old reason alone, which
  the next pass removes.

A ``processed/`` copy of an image whose store bytes were pruned is then its only copy: it stays
(counted in the table); set ``processed_days`` at most ``auto_image_days`` for both to go.

The daemon runs a pass every ``interval_minutes`` (the first one a minute after its start) on a
thread of its own; ``annotator prune`` runs one by hand, ``--dry-run`` only counts. A pass is
safe to kill at any point: rows are marked before their files go (``Store``), a half-done walk
of ``processed/`` is redone by the next pass, and the pass's start is kept so that the next one
removes what a kill left (``Store.sweep_pruned``).

Clock steps. Ages are by the wall clock (mtimes, the store's times). The daemon's thread does
not believe a wall clock that moved forward more than ``CLOCK_JUMP_SLACK`` beyond the monotonic
time since its last pass: it logs the step and goes on by the monotonic time (so a clock set a
year ahead removes nothing early), until the daemon restarts (then the wall clock is believed:
a step taken while the daemon was down cannot be told from days it was off) or ``annotator
prune`` is run by hand. A step from before ``PLAUSIBLE_EPOCH`` (a box that booted without an
RTC) is the clock being set and is believed. A step back removes less, until the clock catches
up. A processed/ file with an mtime more than a day in the future goes by its store row's age.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import stat
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .bundle import sha256_file
from .dropfolder import PROCESSED, REASON_SUFFIX, is_temporary, quarantine_dir
from .errors import ConfigError
from .store import Store, open_existing

if TYPE_CHECKING:
    from .config import Config, RetentionConfig

log = logging.getLogger(__name__)

DAY = 86400.0
# The store counter holding the (integer) start of the last pass that pruned images, written
# before it removes anything: the next pass sweeps files of images pruned since a little before
# it (``SWEEP_MARGIN``: clock steps, slow commits).
LAST_PASS = "retention_last_pass"
SWEEP_MARGIN = 3600.0
# The daemon's passes read the wall clock against the monotonic one (``RetentionTask``): a wall
# clock that moved this much further than the monotonic one between two passes stepped forward
# (NTP, an operator's ``date``), and the pass goes on by the monotonic time instead (module doc).
CLOCK_JUMP_SLACK = 3600.0
# Before this (2024-01-01 UTC) the wall clock was not set (a box without an RTC battery boots in
# 1970 or 2000): a step forward from such a time is the clock being set, and is believed.
PLAUSIBLE_EPOCH = 1_704_067_200.0
# A processed/ file whose mtime is this far ahead of the clock (a camera with a wrong clock,
# ``cp -p`` from such a box) has an age nobody knows: its store row's received_at decides alone.
FUTURE_MTIME_SLACK = DAY


def _boot_clock() -> float:
    """Seconds of a clock that never steps and counts suspended time (CLOCK_BOOTTIME on Linux)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@dataclass
class Removed:
    """What one rule removed (or, in a dry run, would remove)."""

    files: int = 0
    bytes: int = 0
    kept_unknown: int = 0  # processed/: old files whose bytes the store has no row for
    kept_only_copy: int = 0  # processed/: old files whose store bytes retention removed
    kept_no_reason: int = 0  # quarantine/: old files with no reason file beside them
    errors: list[str] = field(default_factory=list)

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


@dataclass
class PassReport:
    processed: Removed | None  # None: the rule is off (or no drop folder)
    auto_images: Removed | None
    quarantine: Removed | None = None
    swept: int = 0  # files of earlier pruned images a kill had left

    def rules(self) -> tuple[tuple[str, str, Removed | None], ...]:
        """(metrics label, name in tables, what it removed) per rule."""
        return (("processed", "processed/ copies", self.processed), ("auto_images", "auto-accepted images", self.auto_images),
                ("quarantine", "quarantined files", self.quarantine))

    def summary(self) -> str:
        parts = [f"{r.files} {name} ({r.bytes / 1e6:.1f} MB)" for _, name, r in self.rules() if r is not None]
        return ", ".join(parts) or "nothing (no rule set)"


def _old_files(root: Path, before: float, include: Callable[[str], bool] | None = None,
               future: float = float("inf")) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files (not links) under ``root`` with an mtime before ``before`` (or after
    ``future``): those whose name ``include`` takes, else those whose path is not a temporary
    one (``is_temporary``)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not include(name) if include is not None else is_temporary(path.relative_to(root)):
                continue
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if (st.st_mtime < before or st.st_mtime > future) and stat.S_ISREG(st.st_mode):
                yield path, st


def _remove_empty_folders(root: Path, before: float) -> None:
    """Remove the empty folders under ``root`` (not ``root``) last changed before ``before``.

    Removing files left their folders (``processed/<camera>/<session>/``, the same under
    ``quarantine/``): one empty folder more per recording for ever, each an inotify watch of the
    drop folder's recursive watcher when ``processed/`` lies inside it. A folder's mtime is when
    an entry was last made or removed in it, so one the drop folder moves files into now is not
    this old; ``rmdir`` never removes a folder that is not empty."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        folder = Path(dirpath)
        if folder == root or filenames:
            continue
        try:
            if folder.lstat().st_mtime < before:
                folder.rmdir()
        except OSError:  # not empty, gone meanwhile, not ours to remove
            pass


def prune_processed(store: Store, processed: Path, before: float, dry_run: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    stop: threading.Event | None = None, future: float = float("inf")) -> Removed:
    """Remove the files under ``processed`` older than ``before`` (or with an mtime after
    ``future``: a wrong clock wrote it, its age is unknown) whose bytes the store has a row
    for that arrived before ``before`` too (module doc). Each candidate is hashed: the name says
    nothing about the bytes (a capture tool reuses names; a person may put files there)."""
    out = Removed()
    if not processed.is_dir():
        return out
    candidates = list(_old_files(processed, before, future=future))
    for n, (path, st) in enumerate(candidates, start=1):
        if stop is not None and stop.is_set():
            break  # the daemon is stopping; the next pass goes on from here
        try:
            row = store.get(sha256_file(path))
            if row is None or row.received_at >= before or row.pruned_at is not None:
                out.kept_unknown += row is None
                out.kept_only_copy += row is not None and row.pruned_at is not None
            else:
                if not dry_run:
                    path.unlink()
                out.add(st.st_size)
        except FileNotFoundError:
            pass  # gone meanwhile (a person, another pass)
        except OSError as exc:
            out.errors.append(f"{path}: {exc.strerror or exc}")
        if progress is not None:
            progress(n, len(candidates))
    if not dry_run and not (stop is not None and stop.is_set()):
        _remove_empty_folders(processed, before)
    return out


def prune_quarantine(qdir: Path, before: float, dry_run: bool = False,
                     stop: threading.Event | None = None) -> Removed:
    """Remove each quarantined file whose reason file is older than ``before``, then the reason
    (module doc); a reason left alone (its file gone by hand, or a kill between the two) goes too.
    Sizes count both. Old files with no reason beside them stay (``kept_no_reason``)."""
    out = Removed()
    if not qdir.is_dir():
        return out
    for path, st in _old_files(qdir, before, include=lambda name: name.endswith(REASON_SUFFIX)):
        if stop is not None and stop.is_set():
            return out  # the daemon is stopping; the next pass goes on from here
        image = path.with_name(path.name[: -len(REASON_SUFFIX)])
        try:
            size = 0
            try:
                ist = image.lstat()
                if stat.S_ISREG(ist.st_mode):
                    size = ist.st_size
                    if not dry_run:
                        image.unlink()
            except FileNotFoundError:
                pass
            if not dry_run:
                path.unlink()
            out.add(size + st.st_size)
        except FileNotFoundError:
            pass
        except OSError as exc:
            out.errors.append(f"{path}: {exc.strerror or exc}")
    for path, _ in _old_files(qdir, before):  # what is left (in a dry run, what would be)
        out.kept_no_reason += not path.with_name(path.name + REASON_SUFFIX).exists()
    if not dry_run:
        _remove_empty_folders(qdir, before)
    return out


def prune_auto_images(store: Store, before: float, dry_run: bool = False, page: int = 500) -> Removed:
    """The store's bytes of images auto-accepted before ``before`` (``Store.prune_auto_images``)."""
    out = Removed()
    if dry_run:
        out.files, out.bytes = store.pruned_bytes(before)
        return out
    while True:
        ids, size = store.prune_auto_images(before, limit=page)
        out.files += len(ids)
        out.bytes += size
        if len(ids) < page:
            return out


def run_pass(store: Store, settings: "RetentionConfig", drop_folder: Path | None, now: float | None = None,
             dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
             stop: threading.Event | None = None) -> PassReport:
    """One retention pass over both rules (module doc); ``now`` defaults to the store's clock."""
    now = store.clock() if now is None else now
    report = PassReport(None, None)
    # processed/ first: it needs no database write, and on a disk so full that SQLite cannot
    # commit it is what gives space back (the rest fails until then, and is retried next pass).
    if settings.processed_days is not None and drop_folder is not None:
        report.processed = prune_processed(store, Path(drop_folder) / PROCESSED, now - settings.processed_days * DAY,
                                           dry_run, progress, stop, future=now + FUTURE_MTIME_SLACK)
    if settings.quarantine_days is not None:  # no database write either
        report.quarantine = prune_quarantine(quarantine_dir(drop_folder, store.root),
                                             now - settings.quarantine_days * DAY, dry_run, stop)
    if settings.auto_image_days is None:
        return report
    if not dry_run:
        # The start of the last pass that pruned, kept before this one removes anything: a
        # pass killed half-way (the first one too) is swept by the next.
        last = store.counter(LAST_PASS)
        if last:
            report.swept = store.sweep_pruned(last - SWEEP_MARGIN)
        store.set_counter(LAST_PASS, int(now))
    report.auto_images = prune_auto_images(store, now - settings.auto_image_days * DAY, dry_run)
    return report


def enabled(settings: "RetentionConfig") -> bool:
    return any(d is not None for d in (settings.processed_days, settings.auto_image_days, settings.quarantine_days))


class RetentionTask:
    """The daemon's thread: a pass ``first_delay`` seconds after ``start`` (not at once: a start
    has the backlog of the drop folder to take first), then every ``interval_minutes``."""

    def __init__(self, store: Store, settings: "RetentionConfig", drop_folder: Path | None,
                 first_delay: float = 60.0, metrics: Any = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        """``metrics``: a ``service.metrics.MetricsRecorder`` (its ``retention_removed``), or None."""
        self.store = store
        # Boot time, not plain monotonic time: it goes on while the box sleeps, so a night in
        # suspend is not taken for a forward step of the clock.
        self.monotonic = monotonic or _boot_clock
        self._last: tuple[float, float] | None = None  # (wall, monotonic) clock of the last pass
        self._behind = 0.0  # seconds of forward wall-clock steps not believed (module doc)
        self.metrics = metrics
        self.settings = settings
        self.drop_folder = drop_folder
        self.first_delay = first_delay
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        def days(d: float | None) -> str:
            return "kept (off)" if d is None else f"after {d:g} days"

        log.info("retention: processed/ copies %s, auto-accepted images' bytes %s, quarantined files %s, "
                 "checked every %g min", days(self.settings.processed_days), days(self.settings.auto_image_days),
                 days(self.settings.quarantine_days), self.settings.interval_minutes)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def pass_time(self) -> float:
        """The time a pass ages files by: the wall clock, less the forward steps it took since
        the daemon started beyond what the monotonic clock saw (module doc), logged when seen."""
        wall, mono = self.store.clock(), self.monotonic()
        if self._last is not None:
            last_wall, last_mono = self._last
            step = (wall - last_wall) - (mono - last_mono)
            if step > CLOCK_JUMP_SLACK and last_wall - self._behind >= PLAUSIBLE_EPOCH:
                self._behind += step
                log.warning("retention: the wall clock stepped %.1f h forward since the last pass (monotonic time "
                            "moved %.0f s); removing by the clock from before the step (%.1f h behind it) so that "
                            "nothing goes early. If the new time is right, restart the daemon or run "
                            "`annotator prune` to remove by it", step / 3600, mono - last_mono, self._behind / 3600)
            elif step < -CLOCK_JUMP_SLACK:
                undone = min(self._behind, -step)  # a step forward not believed, taken back
                self._behind -= undone
                if -step - undone > CLOCK_JUMP_SLACK:
                    log.warning("retention: the wall clock stepped %.1f h back since the last pass; files are "
                                "removed that much later", (-step - undone) / 3600)
        self._last = (wall, mono)
        return wall - self._behind

    def _run(self) -> None:
        wait = self.first_delay
        while not self._stop.wait(wait):
            try:
                report = run_pass(self.store, self.settings, self.drop_folder, now=self.pass_time(), stop=self._stop)
                self.passes += 1
                for rule, _, r in report.rules():
                    if r is not None and self.metrics is not None:
                        self.metrics.retention_removed(rule, r.files, r.bytes)
                log.info("retention pass: removed %s", report.summary())
                for _, _, r in report.rules():
                    for error in (r.errors if r is not None else ())[:10]:
                        log.warning("retention: could not remove %s", error)
            except Exception:  # a pass that fails (a full disk, a store closing) tries again next time
                if self._stop.is_set():
                    return
                log.exception("retention pass failed; trying again in %g min", self.settings.interval_minutes)
            wait = float(self.settings.interval_minutes) * 60.0


def format_report(report: PassReport, settings: "RetentionConfig", dry_run: bool) -> str:
    """The pass as a terminal table."""
    head = "would remove" if dry_run else "removed"
    rows = [("rule", "older than", f"files {head}", "MB")]
    days_of = {"processed": settings.processed_days, "auto_images": settings.auto_image_days,
               "quarantine": settings.quarantine_days}
    for rule, name, r in report.rules():
        days = days_of[rule]
        if r is None:
            rows.append((name, "off", "-", "-"))
        else:
            rows.append((name, f"{days:g} days", str(r.files), f"{r.bytes / 1e6:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    notes = []
    if report.processed is not None and report.processed.kept_unknown:
        notes.append(f"{report.processed.kept_unknown} old files in processed/ kept: the store has no row for "
                     "their bytes (put there by hand, or never taken)")
    if report.processed is not None and report.processed.kept_only_copy:
        notes.append(f"{report.processed.kept_only_copy} old files in processed/ kept: the store's copy went by "
                     "auto_image_days, so each is the only one (set processed_days <= auto_image_days)")
    if report.quarantine is not None and report.quarantine.kept_no_reason:
        notes.append(f"{report.quarantine.kept_no_reason} old files in quarantine/ kept: no reason file beside them "
                     "(not put there by the appliance)")
    for _, _, r in report.rules():
        notes += [f"could not remove {e}" for e in (r.errors if r is not None else ())]
    if report.swept:
        notes.append(f"{report.swept} files of images pruned by an interrupted pass removed")
    return "\n".join(lines + notes)


def cmd_prune(args: argparse.Namespace, config: "Config") -> int:
    """``annotator prune``: one retention pass now, with the config's rules or the flags'."""
    settings = config.retention
    for key, value in (("processed_days", args.processed_days), ("auto_image_days", args.auto_image_days),
                       ("quarantine_days", args.quarantine_days)):
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')}: give a number of days > 0, got {value:g}")
            settings = dataclasses.replace(settings, **{key: value})
    if not enabled(settings):
        raise ConfigError("prune: no rule set; give --processed-days / --auto-image-days / --quarantine-days, or set "
                          "[retention] processed_days / auto_image_days / quarantine_days in the config")
    drop = config.drop.folder
    if settings.processed_days is not None and drop is None:
        print("prune: no drop.folder in the config, so there is no processed/ to prune", file=sys.stderr)
    elif settings.processed_days is not None and config.drop.processed_mode != "move":
        print(f"prune: drop.processed_mode is {config.drop.processed_mode!r}: taken files are not moved to "
              "processed/, so processed_days removes nothing (the originals in the drop folder are yours)",
              file=sys.stderr)
    store = open_existing(Path(config.store.root), "prune", float(config.store.lease_seconds))
    try:
        from .cli import _progress

        report = run_pass(store, settings, Path(drop) if drop else None, dry_run=args.dry_run,
                          progress=_progress("processed/") if sys.stderr.isatty() else None)
    finally:
        store.close()
    print(format_report(report, settings, args.dry_run))
    return 0

