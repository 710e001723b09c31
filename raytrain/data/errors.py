"""Errors of the data that retrying cannot fix: they stop a run with one line for the user.

A ``DataError`` is deterministic (the same shards fail the same way on every attempt), so
a training run stops on it without Ray retrying it (``train/fatal.py``). Every one pickles
and unpickles with its details (Ray sends worker errors to the driver), and survives
torch's DataLoader, which rebuilds a worker's error from its message alone.
"""

from __future__ import annotations


class DataError(Exception):
    """A deterministic problem with the data; ``str()`` is one line naming what and where.

    Keyword details (shard, counts, ...) become attributes."""

    def __init__(self, summary: str, **details):
        super().__init__(summary)
        self.summary, self.details = summary, dict(details)
        for name, value in details.items():
            setattr(self, name, value)

    def __reduce__(self):
        return _rebuild, (type(self), self.summary, self.details)

    def user_line(self) -> str:
        """The one line for the user (also when torch wrapped a worker's traceback)."""
        return user_line(self)


def _rebuild(cls, summary: str, details: dict):
    return cls(summary, **details)


def user_line(error: BaseException) -> str:
    """The last meaningful line of an error's message, without a traceback or class name.

    torch's DataLoader re-raises a worker's error as ``Caught X in DataLoader worker ...
    Original Traceback ... module.X: message``: the message is the last line."""
    text = str(error).strip()
    if "Traceback" not in text:
        return " ".join(text.split("\n"))
    last = text.splitlines()[-1].strip()
    head, colon, rest = last.partition(": ")
    return rest if colon and " " not in head else last


class ReasonError(ValueError):
    """An item to skip and count under ``reason`` (one of the subclass's ``REASONS``), with
    a ``detail``; pickles with both (Ray and DataLoader workers send errors pickled)."""

    REASONS: tuple[str, ...] = ()
    KIND = "reason"

    def __init__(self, reason: str, detail: str = ""):
        if reason not in self.REASONS:
            raise ValueError(f"unknown {self.KIND} {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


class ManifestError(DataError, ValueError):
    """A shard set and its manifest disagree, or the manifest is malformed."""


class TooManyBadSamples(DataError, RuntimeError):
    """More than ``max_bad_fraction`` of an epoch's samples (of one reader process) were bad."""


def too_many_bad(shard: str, bad: int, total: int, counts: dict) -> TooManyBadSamples:
    """The error for ``bad`` bad samples of ``total`` read, most of them in ``shard``."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
    return TooManyBadSamples(
        f"too many bad samples: {bad} of {total} this epoch ({reasons}), most in shard {shard}; "
        f"fix or remove the shard, or raise data.max_bad_fraction",
        shard=shard, bad=bad, total=total, counts=dict(counts),
    )
