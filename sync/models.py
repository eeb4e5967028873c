"""Model pull: newer bundles from the registry, verified, gated, switched in atomically.

Local layout under ``root`` (``<data root>/models`` by default)::

    staging/<id>/              a candidate being downloaded and checked
    bundles/<id>/              installed (verified, accepted) bundles
    current  -> bundles/<id>   symlink: the bundle in use (point the daemon's engine.bundle here)
    previous -> bundles/<id>   symlink: the one before, for ``rollback``
    refused/<id>.reason.txt    a refused candidate and why; it is never tried again
    switching.json             only while a switch is in flight: the pointers before it
    .lock                      held (flock) by the one process pulling, rolling back or adopting
    staging/.<id>.partial      a download in progress (``sync.registry``); cleared before each pass
    bundles/.<id>.replaced     only while a bundle is reinstalled under the same id: the old copy

``ModelPuller.pull_once`` takes the registry's bundles newer than the one in use (order:
``created``, then ``id``), newest first, and for each: download into ``staging/``; verify the
ed25519 signature over ``bundle.json``'s bytes when a public key is configured; verify
checksums and ONNX layouts (``load_bundle``); run the validation gate (``sync.gate``); then
move it to ``bundles/``, switch the pointers (``os.replace`` of a fresh symlink, so a reader
sees the old or the new target, never neither) and call ``reload_fn(path)`` (the agent passes
one that calls the daemon's ReloadModels RPC, which swaps engines without failing requests in
flight). A candidate failing any step is refused with its reason; the pointers and the
daemon are not touched. If the daemon refuses the reload, the pointers are switched back.

Only problems of the bundle itself refuse it: ``BundleContentError`` from the download, a bad
signature, ``BundleError`` from the checks or the daemon, a failed gate. Credentials rejected,
a missing bucket (``PermanentError``) or an outage (``RetryableError``) propagate and refuse
nothing, so the bundle is taken once they are fixed.

A switch survives kill -9: ``switching.json`` (the old pointers) is written durably before the
pointers move and removed once the daemon loaded the new bundle or the pointers were put back.
A pass that finds it left over (the process died between the switch and the end of the reload,
so the daemon may still run the old bundle while ``current`` names the new one) first asks the
daemon to load ``current`` again: done, the switch is complete; the daemon refuses it
(``BundleError``), the old pointers come back, the daemon is asked to load the old bundle and
the new one is refused; the daemon unreachable, ``RetryableError`` and the next pass retries.

A switch also survives a power loss: every file of a bundle, and its folder, is fsynced before
the bundle is renamed into ``bundles/`` (``install``), so ``current`` never names a bundle whose
files came back empty. Installing a bundle under an id already installed (``adopt`` run twice)
keeps the copy in place when it is the same bundle; a different one replaces it through a
rename aside, never a removal first, and a pass puts an old copy left aside back when the
process died before the new one was in place. A pulled bundle never replaces an installed one
under the same id with other contents: an id names one bundle (its records, its lineage), so
such a candidate is refused and the installed copy stays.

One writer at a time: ``pull_once``, ``rollback`` and ``adopt`` hold an exclusive ``flock`` on
``.lock`` (released by the kernel when the process dies, kill -9 included); a second process
(the agent's pass and an operator's ``annotator models pull`` at once) gets ``RetryableError``
and changes nothing, instead of pulling the first one's staged copy from under it. Holding it,
a pass first clears everything a killed process left under ``staging/`` (and the gate's work
folder), and a switch or rollback cut between its two pointer moves never leaves ``previous``
naming the bundle in use.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from service.bundle import Bundle, check_bundle_id, load_bundle
from service.durable import fsync_dir, fsync_tree, write_bytes_atomic, write_json_atomic
from service.errors import BundleError

from .errors import BundleContentError, RetryableError, SyncError
from .gate import GateResult, ValidationGate
from .registry import MANIFEST, SIGNATURE, BundleRegistry, RegistryEntry, remove_partials
from .signing import SignatureError, check_weights_vouched, load_public_key, verify_manifest

log = logging.getLogger(__name__)

ReloadFn = Callable[[str], Any]
CURRENT, PREVIOUS = "current", "previous"
SWITCHING = "switching.json"
LOCK = ".lock"
REPLACED = ".replaced"  # bundles/.<id>.replaced: the old copy while a bundle is reinstalled


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _point(link: Path, target: Path | None) -> None:
    """Make ``link`` a symlink to ``target`` (relative) atomically; None removes it."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _same_bundle(a: Path, b: Path) -> bool:
    """Whether the bundle folders ``a`` and ``b`` hold the same bundle: the same files, the same
    bundle.json and bundle.sig bytes, and ``b`` still matches its checksums (a copy damaged
    since is replaced, not kept)."""
    def files(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def read(path: Path) -> bytes | None:
        return path.read_bytes() if path.is_file() else None

    try:
        if files(a) != files(b) or any(read(a / n) != read(b / n) for n in (MANIFEST, SIGNATURE)):
            return False
        load_bundle(b)
    except (OSError, BundleError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return True


def _drop_unvouched_weights(staged: Path, bundle: Bundle) -> None:
    """Remove from an adopted copy the checkpoints under ``weights/`` that the signature does
    not vouch for: none named in ``lineage.weights`` with a matching sha256 (changed since it
    was signed, or never named). A pull installs only those (``sync.registry``); adopt copied
    the whole folder, and ``annotator train --init current`` unpickles ``weights/<role>.pt``."""
    from service.bundle import sha256_file

    weights = bundle.lineage.get("weights")
    named = {str(e.get("file")): e.get("sha256") for e in (weights.values() if isinstance(weights, dict) else ())
             if isinstance(e, dict)}
    folder = staged / "weights"
    for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
        rel = path.relative_to(staged).as_posix()
        if path.is_file() and not (rel in named and sha256_file(path) == named[rel]):
            path.unlink()
            log.warning("bundle %s: %s is %s; adopted without it", bundle.id, rel,
                        "not named in lineage.weights" if rel not in named else
                        "changed since it was signed (its sha256 in lineage.weights does not match)")


class ModelSlots:
    """The local folders and pointers (see module doc). Single writer: the sync agent or the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("staging", "bundles", "refused"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _target(self, name: str) -> Path | None:
        link = self.root / name
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    def current_path(self) -> Path | None:
        return self._target(CURRENT)

    def previous_path(self) -> Path | None:
        return self._target(PREVIOUS)

    def current(self, verify: bool = False) -> Bundle | None:
        path = self.current_path()
        return None if path is None else load_bundle(path, verify=verify)

    def installed(self) -> list[str]:
        return sorted(p.name for p in (self.root / "bundles").iterdir() if p.is_dir() and not p.name.startswith("."))

    def refused(self) -> dict[str, str]:
        """Refused bundle id -> reason text."""
        return {p.name[: -len(".reason.txt")]: p.read_text(encoding="utf-8").strip()
                for p in sorted((self.root / "refused").glob("*.reason.txt"))}

    def refuse(self, bundle_id: str, reason: str) -> None:
        check_bundle_id(bundle_id, "refuse")  # ".." removed staging/.., the models root itself
        path = self.root / "refused" / f"{bundle_id}.reason.txt"
        write_bytes_atomic(path, f"{_now()} {reason}\n".encode("utf-8"))
        shutil.rmtree(self.root / "staging" / bundle_id, ignore_errors=True)
        log.warning("bundle %s refused: %s", bundle_id, reason)

    def install(self, staged: Path, bundle_id: str) -> Path:
        """Move a checked bundle from staging into ``bundles/<id>``, its files on disk first
        (module doc: a power loss must not bring ``current``'s files back empty).

        ``bundles/<id>`` may be there already, and be what ``current`` names (``adopt`` run
        twice): the same bundle stays in place and the staged copy is dropped; another one
        takes its place through a rename aside, so that a kill -9 never leaves the id missing
        with ``current`` naming it (``tidy`` puts the old copy back after such a kill)."""
        bundles = self.root / "bundles"
        dest = bundles / bundle_id
        if dest.is_dir() and not dest.is_symlink() and _same_bundle(staged, dest):
            shutil.rmtree(staged)
            fsync_tree(dest)  # installed by an older version, maybe never synced
            log.info("bundle %s is installed already; the copy in place is kept", bundle_id)
            return dest
        fsync_tree(staged)
        aside = None
        if dest.exists() or dest.is_symlink():
            aside = bundles / f".{bundle_id}{REPLACED}"
            os.replace(dest, aside)
        os.replace(staged, dest)
        fsync_dir(bundles)
        fsync_dir(staged.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return dest

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Hold the models root for ``what`` (module doc): ``RetryableError`` at once when another
        process holds it. The kernel drops the lock when its holder dies."""
        from service.lockfile import Held, hold

        try:
            fd = hold(self.root / LOCK)
        except Held as exc:
            raise RetryableError(f"another process (pid {exc.pid}) is pulling, rolling back or adopting "
                                 f"bundles under {self.root}; {what} waits for its turn") from exc
        try:
            yield
        finally:
            os.close(fd)

    def tidy(self) -> None:
        """Clear what a killed process left under ``staging/``: interrupted downloads and candidates
        (``staging/<id>``) killed while checked, which a newer bundle taken since would leave for good;
        and old copies that ``install`` moved aside (back in place when the new copy never
        arrived, removed otherwise). Only under ``exclusive``: never while a pull or install runs."""
        staging = self.root / "staging"
        remove_partials(staging)
        left = [p for p in sorted(staging.iterdir())
                if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        if left:
            log.info("removed %d candidates a killed pass left under %s: %s", len(left), staging,
                     ", ".join(p.name for p in left))
        bundles = self.root / "bundles"
        for aside in sorted(bundles.glob(f".*{REPLACED}")):
            if not aside.is_dir() or aside.is_symlink() or len(aside.name) <= 1 + len(REPLACED):
                continue
            dest = bundles / aside.name[1:-len(REPLACED)]
            if dest.exists() or dest.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, dest)
                fsync_dir(bundles)
                log.warning("an interrupted install left bundle %s aside; put back in place", dest.name)

    def switch(self, path: Path) -> tuple[Path | None, Path | None]:
        """current -> ``path``, previous -> the old current; returns the old (current, previous)."""
        old = (self.current_path(), self.previous_path())
        if old[0] is not None and old[0] != Path(path).resolve():
            _point(self.root / PREVIOUS, old[0])
        _point(self.root / CURRENT, Path(path))
        return old

    def restore(self, old: tuple[Path | None, Path | None]) -> None:
        """Point ``current`` and ``previous`` back at ``old``, durably: an undone switch removes
        the bundle it had switched to right after, and a power cut between that removal and the
        pointers reaching the disk left ``current`` naming a deleted bundle (power-cut audit)."""
        _point(self.root / CURRENT, old[0])
        _point(self.root / PREVIOUS, old[1])
        fsync_dir(self.root)

    def begin_switch(self, refuse_after: str | None = None) -> tuple[Path | None, Path | None]:
        """Write ``switching.json`` (the pointers now, and a bundle to refuse once the daemon
        runs ``current``: a rollback's) durably, before the pointers move; returns the pointers."""
        old = (self.current_path(), self.previous_path())
        write_json_atomic(self.root / SWITCHING, {
            "current": str(old[0]) if old[0] is not None else None,
            "previous": str(old[1]) if old[1] is not None else None,
            "refuse_after": refuse_after}, sync_dir=True)
        return old

    def pending_switch(self) -> dict[str, Any] | None:
        """``switching.json`` left by a switch that did not finish, or None. An unreadable one
        (it is written atomically, so only a hand edit makes one) holds no old pointers."""
        path = self.root / SWITCHING
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is not valid JSON; treated as an interrupted switch without old pointers", path)
            return {}
        return dict(data) if isinstance(data, dict) else {}

    def end_switch(self) -> None:
        """The daemon runs what ``current`` names again: forget ``switching.json``."""
        (self.root / SWITCHING).unlink(missing_ok=True)
        fsync_dir(self.root)


@dataclass
class PullResult:
    """What ``pull_once`` did: the bundle switched to (None: none), refusals, gate results."""

    switched_to: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    gate: dict[str, GateResult] = field(default_factory=dict)
    newer: list[str] = field(default_factory=list)


class ModelPuller:
    """Pulls, checks and switches bundles. ``gate`` None: checksums (and signature) only.
    ``public_key``: path of the ed25519 key; when set, every candidate must carry a valid
    ``bundle.sig``. ``reload_fn(path)`` asks the daemon to
    load the bundle at ``path`` and raises when it cannot."""

    def __init__(self, slots: ModelSlots, registry: BundleRegistry, gate: ValidationGate | None,
                 reload_fn: ReloadFn, public_key: Path | None = None) -> None:
        self.slots = slots
        self.registry = registry
        self.gate = gate
        self.reload_fn = reload_fn
        self.public_key = load_public_key(public_key) if public_key is not None else None
        self._warned_created: set[str] = set()  # bundles in use said to be stamped ahead of the clock

    def candidates(self) -> list[RegistryEntry]:
        """Registry bundles newer than the one in use and never refused, newest first."""
        current = self.slots.current()
        refused = self.slots.refused()
        order = (current.created, current.id) if current is not None else None
        if current is not None:
            self._check_created(current)
        return [e for e in reversed(self.registry.entries())
                if e.bundle_id not in refused and (order is None or e.order > order)]

    def _check_created(self, current: Bundle) -> None:
        """Say (once per bundle) when the bundle in use was stamped ahead of this box's clock
        (trained on a machine whose clock was ahead): every bundle stamped before that time
        sorts as older and is never pulled, and nothing else would say why."""
        try:
            created = _dt.datetime.fromisoformat(str(current.created).replace("Z", "+00:00"))
        except ValueError:
            return
        if created.tzinfo is None:
            created = created.replace(tzinfo=_dt.timezone.utc)
        now = _dt.datetime.now(_dt.timezone.utc)
        if created - now > _dt.timedelta(days=1) and current.id not in self._warned_created:
            self._warned_created.add(current.id)
            log.warning("the bundle in use, %s, says it was created %s, %.1f days ahead of this box's clock "
                        "(%s): registry bundles stamped before that are taken as older and not pulled. Check the "
                        "clock of the machine that made it (and of this box); `annotator models adopt` installs "
                        "a chosen bundle", current.id, current.created, (created - now).total_seconds() / 86400,
                        now.isoformat(timespec="seconds"))

    def pull_once(self) -> PullResult:
        """One pass over the newer bundles (see module doc), after finishing a switch an earlier
        process left half done. Store outages (``RetryableError``) and credential or bucket
        errors (``PermanentError``) propagate and refuse nothing; the next pass tries again."""
        with self.slots.exclusive("this model pull"):
            return self._pull(PullResult())

    def _pull(self, result: PullResult) -> PullResult:
        self.slots.tidy()
        if self.gate is not None:
            self.gate.tidy()
        self._resume_switch(result)
        entries = self.candidates()
        result.newer = [e.bundle_id for e in entries]
        for entry in entries:
            try:
                check_bundle_id(entry.bundle_id, "registry")
            except BundleError as exc:  # a bucket key bundles/../bundle.json: no folder may be named so
                log.warning("%s; skipped (remove it from the registry)", exc)
                continue
            reason = self._try(entry, result)
            if reason is None:
                result.switched_to = entry.bundle_id
                break
            self.slots.refuse(entry.bundle_id, reason)
            result.refused[entry.bundle_id] = reason
        return result

    def _try(self, entry: RegistryEntry, result: PullResult) -> str | None:
        """Check and switch to one candidate; returns the refusal reason, or None on success."""
        bid = entry.bundle_id
        if entry.problem:
            return entry.problem
        try:
            staged = self.registry.download(bid, self.slots.root / "staging" / bid)
        except BundleContentError as exc:  # only the bundle's own problems refuse it (module doc)
            return str(exc)
        if self.public_key is not None:
            sig = staged / SIGNATURE
            try:
                verify_manifest((staged / MANIFEST).read_bytes(), sig.read_bytes() if sig.is_file() else None,
                                self.public_key)
            except SignatureError as exc:
                return f"signature: {exc}"
            try:
                check_weights_vouched(json.loads((staged / MANIFEST).read_bytes()))
            except SignatureError as exc:
                return f"signature: {exc}; then publish it under a new id"
            except ValueError:
                pass  # not JSON: load_bundle says so below
        try:
            candidate = load_bundle(staged)
        except (BundleError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # The loader reads only the staged copy; some malformed fields (``metrics``,
            # ``judgement`` that are not tables) reach it as ValueError or TypeError.
            return f"verification: {exc}"
        if candidate.id != bid:
            return f"bundle.json says id {candidate.id!r} but it is published as {bid!r}"
        reused = self._reused_id(staged, bid)
        if reused is not None:
            return reused
        current = self.slots.current()
        if current is not None and (candidate.created, candidate.id) <= (current.created, current.id):
            # The listing read bundle.json once, the download again: one that changed in between
            # (a registry someone else can write) put an old signed bundle in place of the newer
            # one listed, and the box went back to it although the signature was required.
            return (f"bundle.json as downloaded says created {candidate.created!r}, not after the bundle in use "
                    f"{current.id} ({current.created!r}; the listing said {entry.created!r}): an older "
                    "bundle is never pulled (it changed in the registry between the listing and the download)")
        gate = (self.gate.check(current, candidate) if self.gate is not None
                else GateResult(True, "no validation gate configured: checksums only", False, 0))
        result.gate[bid] = gate
        if not gate.passed:
            return f"validation gate: {gate.reason}"
        log.info("bundle %s passed the gate: %s", bid, gate.reason)
        path = self.slots.install(staged, bid)
        try:
            self._switch(path)
        except BundleError as exc:
            if path not in (self.slots.current_path(), self.slots.previous_path()):
                shutil.rmtree(path, ignore_errors=True)
            return f"the daemon refused to load it: {exc}"
        return None

    def _reused_id(self, staged: Path, bid: str) -> str | None:
        """The refusal reason when ``bundles/<bid>`` is installed with another bundle.json (module
        doc: an id names one bundle), else None."""
        installed = self.slots.root / "bundles" / bid / MANIFEST
        try:
            if not installed.is_file() or installed.read_bytes() == (staged / MANIFEST).read_bytes():
                return None
        except OSError:
            return None
        return (f"bundle id {bid} is installed already with other contents (bundle.json differs); "
                "a bundle id must name one bundle: publish it under a new id")

    def _switch(self, path: Path) -> None:
        """Point ``current`` at ``path`` and reload the daemon. When the reload fails the
        pointers are restored; ``BundleError`` (the daemon refuses this bundle) is re-raised,
        anything else (daemon unreachable) becomes ``RetryableError``. ``switching.json``
        covers the time between the pointer move and the end of the reload (module doc)."""
        self.slots.begin_switch()
        old = self.slots.switch(path)
        try:
            self.reload_fn(str(path))
        except BundleError:
            self.slots.restore(old)
            self.slots.end_switch()
            raise
        except Exception as exc:  # the reload callable may raise gRPC or OS errors
            self.slots.restore(old)
            self.slots.end_switch()
            log.error("reloading %s failed (%s); the previous bundle stays in use", path, exc)
            raise RetryableError(f"the daemon could not be asked to load {path}: {exc}") from exc
        self.slots.end_switch()
        log.info("switched to bundle %s (previous: %s)", path.name, old[0].name if old[0] else None)

    def _resume_switch(self, result: PullResult) -> None:
        """Finish a switch (or rollback) that a dead process left between moving the pointers
        and the end of the daemon's reload (module doc). Nothing to do without
        ``switching.json``."""
        pending = self.slots.pending_switch()
        if pending is None:
            return
        cur = self.slots.current_path()
        old_cur, old_prev = (Path(pending[k]) if pending.get(k) else None for k in ("current", "previous"))
        if cur is None:
            log.warning("an interrupted bundle switch left no current bundle; nothing to reload")
            self.slots.end_switch()
            return
        log.warning("a bundle switch was interrupted; asking the daemon to load %s (current) again", cur.name)
        try:
            self.reload_fn(str(cur))
        except BundleError as exc:
            self._undo_switch(cur, old_cur, old_prev, "current" in pending, exc, result)
            return
        except Exception as exc:  # gRPC or OS errors; switching.json stays for the next pass
            raise RetryableError(f"after an interrupted switch the daemon could not be asked to load "
                                 f"{cur.name}: {exc}") from exc
        refuse = pending.get("refuse_after")
        if refuse and refuse != cur.name:
            self.slots.refuse(str(refuse), "rolled back by the operator")
        self._unshadow_previous(cur, old_prev)
        self.slots.end_switch()
        if old_cur is None or old_cur.resolve() != cur:
            result.switched_to = cur.name
        log.info("interrupted switch completed: the daemon runs bundle %s", cur.name)

    def _unshadow_previous(self, cur: Path, old_prev: Path | None) -> None:
        """A switch killed between its two pointer moves leaves ``previous`` naming ``current``
        (``switch`` moves ``previous`` first, ``rollback`` clears it last): a later rollback would
        then "go back" to the bundle in use and refuse it. ``previous`` goes back to where it was
        before the switch, or away when that is the bundle in use too."""
        if self.slots.previous_path() != cur:
            return
        back = old_prev if old_prev is not None and old_prev.is_dir() and old_prev.resolve() != cur else None
        _point(self.slots.root / PREVIOUS, back)
        log.warning("an interrupted switch left previous naming the bundle in use %s; previous is now %s",
                    cur.name, back.name if back is not None else None)

    def _undo_switch(self, cur: Path, old_cur: Path | None, old_prev: Path | None, known: bool,
                     exc: BundleError, result: PullResult) -> None:
        """The daemon refuses ``current`` after an interrupted switch: put the old pointers
        back, refuse the bundle and have the daemon load the old one again."""
        if not known or (old_cur is not None and old_cur.resolve() == cur):
            # The pointers never moved (or were put back already), or where they stood is not
            # known: there is nothing to go back to. The daemon keeps the engine it runs.
            log.error("after an interrupted switch the daemon refuses the bundle in use %s: %s", cur.name, exc)
            self._unshadow_previous(cur, old_prev)
            self.slots.end_switch()
            return
        if old_cur is not None and not old_cur.is_dir():
            raise RetryableError(f"after an interrupted switch the daemon refuses {cur.name} ({exc}) and the "
                                 f"bundle before it, {old_cur}, is gone") from exc
        self.slots.restore((old_cur, old_prev if old_prev is not None and old_prev.is_dir() else None))
        reason = f"the daemon refused to load it: {exc}"
        self.slots.refuse(cur.name, reason)
        result.refused[cur.name] = reason
        shutil.rmtree(cur, ignore_errors=True)
        if old_cur is not None:
            # switching.json stays until this succeeds: the daemon may run either bundle now.
            try:
                self.reload_fn(str(old_cur))
            except Exception as exc2:  # gRPC, OS or bundle errors; the next pass tries again
                raise RetryableError(f"after refusing {cur.name} the daemon could not be asked to load "
                                     f"{old_cur.name} again: {exc2}") from exc2
        self.slots.end_switch()
        log.info("interrupted switch undone: back on bundle %s", old_cur.name if old_cur else None)

    def rollback(self) -> str:
        """Switch back to ``previous``; the bundle rolled back from is refused for good. Returns
        the id now in use. ``SyncError`` when there is no previous bundle (or only the one in use)."""
        with self.slots.exclusive("this rollback"):
            return self._rollback()

    def _rollback(self) -> str:
        cur, prev = self.slots.current_path(), self.slots.previous_path()
        if prev is None or prev == cur:
            raise SyncError(f"no previous bundle under {self.slots.root} to roll back to")
        old = self.slots.begin_switch(refuse_after=cur.name if cur is not None else None)
        _point(self.slots.root / CURRENT, prev)
        _point(self.slots.root / PREVIOUS, None)
        try:
            self.reload_fn(str(prev))
        except Exception as exc:  # the reload callable may raise gRPC or bundle errors
            self.slots.restore(old)
            self.slots.end_switch()
            raise SyncError(f"rollback: the daemon could not load {prev}: {exc}") from exc
        if cur is not None:
            self.slots.refuse(cur.name, "rolled back by the operator")
        self.slots.end_switch()
        log.info("rolled back from %s to %s", cur.name if cur else None, prev.name)
        return prev.name

    def adopt(self, bundle_dir: Path, unsigned: bool = False) -> str:
        """Install a local, verified bundle as ``current`` without reloading (first start).
        Running it again with the bundle in use keeps that bundle where it is (``install``).

        With a ``public_key`` the bundle must carry a valid signature, as a pulled one must:
        otherwise an unsigned folder would become the bundle in use on a box that accepts only
        signed ones. ``unsigned`` installs it anyway (the operator's explicit choice, logged)."""
        with self.slots.exclusive("this adopt"):
            return self._adopt(Path(bundle_dir), unsigned)

    def _adopt(self, bundle_dir: Path, unsigned: bool = False) -> str:
        bundle = load_bundle(bundle_dir)
        if self.public_key is not None:
            sig = bundle_dir / SIGNATURE
            try:
                verify_manifest((bundle_dir / MANIFEST).read_bytes(),
                                sig.read_bytes() if sig.is_file() else None, self.public_key)
            except SignatureError as exc:
                if not unsigned:
                    raise BundleError(
                        f"{bundle_dir}: signature: {exc}; a public key is set ([sync.models] public_key), so "
                        "an adopted bundle is checked as a pulled one is: sign it (annotator train "
                        "--publish ... --sign-key KEY.pem signs what it publishes) or pass --unsigned "
                        "to install it anyway") from exc
                log.warning("adopting %s without a valid signature (--unsigned): %s", bundle_dir, exc)
            else:
                try:
                    check_weights_vouched(json.loads((bundle_dir / MANIFEST).read_bytes()))
                except SignatureError as exc:
                    if not unsigned:
                        raise BundleError(f"{bundle_dir}: signature: {exc}; or pass --unsigned to install it "
                                          "anyway") from exc
                    log.warning("adopting %s with checkpoints no signature covers (--unsigned): %s", bundle_dir, exc)
        self.slots.tidy()  # as each pull pass does first
        staged = self.slots.root / "staging" / bundle.id
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(bundle_dir, staged)
        if self.public_key is not None and not unsigned:
            _drop_unvouched_weights(staged, bundle)
        self.slots.switch(self.slots.install(staged, bundle.id))
        fsync_dir(self.slots.root)  # the pointers too: the daemon starts from ``current``
        return bundle.id


class ModelPullTask:
    """A sync-agent task: ``run_once`` pulls once; True when the bundle in use changed. The agent
    runs it at most once per ``[sync.models] poll_interval`` (``sync.agent.Every``)."""

    name = "models"

    def __init__(self, puller: ModelPuller) -> None:
        self.puller = puller

    def run_once(self) -> bool:
        return self.puller.pull_once().switched_to is not None


def grpc_reload_fn(target: str, timeout: float = 120.0, **client_options: Any) -> ReloadFn:
    """A ``reload_fn`` that calls the daemon's ReloadModels RPC at ``target`` (host:port).

    FAILED_PRECONDITION (the daemon's answer to a bundle it cannot load) becomes
    ``BundleError``; any other failure ``RetryableError``."""
    def reload(path: str) -> Any:
        import grpc

        from service.client import AnnotatorClient

        try:
            with AnnotatorClient(target, **client_options) as client:
                return client.reload(path, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise BundleError(f"daemon at {target}: {detail}") from exc
            raise RetryableError(f"daemon at {target}: ReloadModels failed with {code}: {detail}") from exc

    return reload
