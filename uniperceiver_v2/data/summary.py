"""Errors and bookkeeping shared by every data reader.

Every reader validates its source once, when it is built. A record that is malformed (a missing key,
a duplicate id) always raises :class:`DataError`. A record that is well-formed but unusable (a box of
zero size, an annotation pointing at an unknown image) follows the reader's ``on_invalid`` policy:
``"error"`` raises, ``"skip"`` drops the record and counts it. Either way nothing disappears silently:
the counts end up in a :class:`DatasetSummary` that the reader logs and returns from ``summary()``.
A training run sets the policy of every reader with the config key ``data.on_invalid``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import INVALID_POLICIES

MAX_EXAMPLES_PER_REASON = 3
# How a user reaches the "skip" policy: the config key of a run, the argument of a reader used directly.
SKIP_HINT = "set data.on_invalid=skip (on_invalid='skip' for a reader) to leave such records out and count them"


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and the record."""


@dataclass
class DatasetSummary:
    """What a reader kept, what it skipped and why, and what it counted along the way.

    Attributes:
        source: the file or folder that was read.
        kept: number of usable items per kind, e.g. ``{"images": 100, "annotations": 412}``.
        skipped: number of dropped records per reason, e.g. ``{"crowd annotation": 3}``.
        invalid: the part of ``skipped`` that the ``on_invalid`` policy dropped (records that were unusable,
            not left out by design like crowd annotations), per reason.
        notes: counts worth knowing that did not drop anything, e.g. ``{"images without objects (kept)": 4}``.
        examples: for each skip reason, up to three record descriptions, to find them in the file.
    """

    source: str
    kept: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_invalid(self) -> int:
        return sum(self.invalid.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields."""
        return asdict(self)

    def __str__(self) -> str:
        def fmt(counts: dict[str, int]) -> str:
            return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "none"

        lines = [f"{self.source}", f"  kept: {fmt(self.kept)}", f"  skipped: {fmt(self.skipped)}"]
        if self.notes:
            lines.append(f"  notes: {fmt(self.notes)}")
        for reason, examples in self.examples.items():
            lines.append(f"  e.g. {reason}: {'; '.join(examples)}")
        return "\n".join(lines)


class RecordLog:
    """Applies an ``on_invalid`` policy to records of one source and collects the counts.

    ``invalid(...)`` is for records the policy governs (raise or skip); ``skip(...)`` is for records
    that are always left out by design (e.g. crowd annotations as training targets); ``note(...)``
    counts things that were kept.
    """

    def __init__(self, source: str, on_invalid: str):
        if on_invalid not in INVALID_POLICIES:
            raise ValueError(f"on_invalid must be one of {INVALID_POLICIES}, got {on_invalid!r}")
        self.source = source
        self.on_invalid = on_invalid
        self._skipped: Counter[str] = Counter()
        self._invalid: Counter[str] = Counter()
        self._notes: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def invalid(self, reason: str, record: str) -> None:
        """Raise ``DataError`` (policy "error") or count the record as skipped (policy "skip")."""
        if self.on_invalid == "error":
            raise DataError(f"{self.source}: {record}: {reason} ({SKIP_HINT})")
        self._invalid[reason] += 1
        self.skip(reason, record)

    def skip(self, reason: str, record: str) -> None:
        self._skipped[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(record)

    def note(self, key: str, count: int = 1) -> None:
        self._notes[key] += count

    def summary(self, kept: dict[str, int]) -> DatasetSummary:
        return DatasetSummary(
            source=self.source,
            kept=dict(kept),
            skipped=dict(sorted(self._skipped.items())),
            notes=dict(sorted(self._notes.items())),
            examples={reason: list(examples) for reason, examples in sorted(self._examples.items())},
            invalid=dict(sorted(self._invalid.items())),
        )


def log_summary(logger: logging.Logger, summary: DatasetSummary) -> None:
    """Log at WARNING when records were skipped (someone should look), at INFO otherwise."""
    level = logging.WARNING if summary.num_skipped else logging.INFO
    logger.log(level, "%s", summary)
