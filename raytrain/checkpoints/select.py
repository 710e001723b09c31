"""Which checkpoint: opening one by name, ranking an experiment's, choosing where to resume.

Candidates are found and ranked from their commit records alone (step, stored val_mpjpe);
only the chosen ones are opened, and opening is the one SHA-256 of a checkpoint in a
command (a checkpoint in object storage is copied first, `remote.fetch_checkpoint`). A
chosen candidate that turns out incomplete (a write killed between its two files, a
state.pt changed since) is skipped for the next one of its trial, saying so.
"""
import heapq
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

from ..data.io import is_remote
from .format import (
    COMMIT_FILE,
    STATE_FILE,
    Checkpoint,
    IncompleteCheckpoint,
    read_commit,
    stored_val_mpjpe,
    verify_local,
)
from .remote import fetch_checkpoint, storage_errors, stored_commits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A checkpoint directory (local path or URL) known from its commit record only."""
    where: str
    step: int
    val_mpjpe: float             # inf when none was stored

    @property
    def trial(self) -> str:
        """The directory holding it: one trial of an experiment."""
        return posixpath.dirname(self.where.rstrip("/"))


def open_checkpoint(where: str | Path) -> Checkpoint:
    """The checkpoint directory `where` (local path, or URL copied into the cache first),
    verified once. `IncompleteCheckpoint` names what is wrong; for a directory that holds
    checkpoints below it, how to evaluate those."""
    where = str(where)
    if is_remote(where):
        with storage_errors(where):
            return fetch_checkpoint(where)
    try:
        return verify_local(where)
    except IncompleteCheckpoint as err:
        held = candidates(where) if Path(where).is_dir() and not (Path(where) / COMMIT_FILE).exists() else []
        if not held:
            raise
        latest = max(held, key=lambda c: c.step).where
        raise IncompleteCheckpoint(f"{where} is not a complete checkpoint directory ({STATE_FILE} + "
                                   f"{COMMIT_FILE}); it holds {len(held)} checkpoint(s), the latest {latest} "
                                   f"(raytrain eval: --experiment {where} [--best])") from err


def candidates(root: str | Path, skip: set[str] = frozenset()) -> list[Candidate]:
    """Every checkpoint with a valid commit record below `root` (local path or URL), oldest
    step first; directories named in `skip` (and everything below them) are left out."""
    root = str(root)
    with storage_errors(root):
        records = stored_commits(root)
    found = []
    for where, relative, commit in records:
        if skip & set(relative.split("/")):
            continue
        found.append(Candidate(where, commit["step"], stored_val_mpjpe(commit.get("metrics"))))
    return sorted(found, key=lambda c: (c.step, c.where))


def rank(found: list[Candidate], best: bool, top: int, opener=open_checkpoint) -> list[Checkpoint]:
    """The `top` trials' checkpoints (trial: the directory holding them), opened: per trial
    the one of lowest val_mpjpe (`best`) or the latest; trials ranked by that val_mpjpe.
    Candidates are opened in rank order until `top` are open, so a command hashes only
    what it uses; an incomplete one gives way to the next of its trial."""
    by_trial: dict[str, list[Candidate]] = {}
    for candidate in found:
        by_trial.setdefault(candidate.trial, []).append(candidate)
    for group in by_trial.values():
        group.sort(key=_by_val_mpjpe if best else lambda c: (-c.step, c.where))
    queue = [(_by_val_mpjpe(group[0]), trial) for trial, group in by_trial.items()]
    heapq.heapify(queue)
    chosen = []
    while queue and len(chosen) < top:
        _, trial = heapq.heappop(queue)
        candidate = by_trial[trial].pop(0)
        try:
            chosen.append((_by_val_mpjpe(candidate), opener(candidate.where)))
        except IncompleteCheckpoint as err:
            log.warning("[raytrain] skipping %s", err)
            if by_trial[trial]:
                heapq.heappush(queue, (_by_val_mpjpe(by_trial[trial][0]), trial))
    return [checkpoint for _, checkpoint in sorted(chosen, key=lambda pair: pair[0])]


def _by_val_mpjpe(candidate: Candidate) -> tuple[float, str]:
    return candidate.val_mpjpe, candidate.where


def latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The complete checkpoint of the highest step below local directory `root` (the last
    found of equal steps), or None. Ranked by the commit records and hashed newest first,
    so normally one state.pt is read, not every kept one."""
    if not Path(root).is_dir():
        return None
    for candidate in sorted(candidates(root), key=lambda c: (c.step, c.where), reverse=True):
        try:
            return verify_local(candidate.where)
        except IncompleteCheckpoint as err:
            log.info("[raytrain] not resuming from %s", err)
    return None


def choose_resume(registered: str | None, run_dir: str | None) -> tuple[Checkpoint | None, str]:
    """(checkpoint to resume from, a note for the user) given Ray's last registered
    checkpoint (restored to a local directory, or None) and the run directory.

    The newest *complete* checkpoint wins: Ray's, unless it is incomplete or the run
    directory (local) holds a complete one of a later step (a checkpoint written but
    not registered when the run was interrupted). Candidates are ranked by their commit
    records and hashed newest first, so normally one is hashed. The note says what was
    skipped."""
    mine = read_commit(registered) if registered is not None else None
    options = [(mine["step"], 1, registered, "Ray's last registered checkpoint")] if mine else []
    if run_dir and not is_remote(run_dir) and Path(run_dir).is_dir():
        options += [(c.step, 0, c.where, "the latest complete checkpoint on disk") for c in candidates(run_dir)]
    for step, _, where, origin in sorted(options, key=lambda option: option[:2], reverse=True):
        try:
            chosen = verify_local(where)
        except IncompleteCheckpoint as err:
            log.info("[raytrain] not resuming from %s", err)
            continue
        if registered is None:
            return chosen, f"resuming from {origin} {where} (step {step}): Ray registered none"
        if where != registered:
            why = f"is at step {mine['step']}" if mine and mine["step"] < step else "is incomplete"
            return chosen, f"resuming from {origin} {where} (step {step}): Ray's last registered checkpoint {why}"
        return chosen, ""
    note = (f"Ray's last checkpoint {registered} is incomplete and {run_dir} holds no complete "
            "one: starting from scratch") if registered is not None else ""
    return None, note
