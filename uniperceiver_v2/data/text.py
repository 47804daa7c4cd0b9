"""Plain-text corpus reader for masked language modelling: one sentence (or passage) per line.

Only byte offsets of the non-blank lines are kept in memory, so a multi-gigabyte corpus (BookCorpus,
Wikipedia dumps) costs 8 bytes a line instead of the text itself; lines are read on access.
"""

from __future__ import annotations

import logging
import os
from array import array
from pathlib import Path
from typing import BinaryIO

from torch.utils.data import Dataset

from .summary import SKIP_HINT, DataError, DatasetSummary, RecordLog, log_summary

logger = logging.getLogger(__name__)


class TextCorpus(Dataset):
    """Sentences of a UTF-8 text file, one a line; blank lines are skipped and counted.

    ``corpus[i]`` is the i-th non-blank line with surrounding whitespace removed (a raw string: the
    model's text encoder tokenises it). ``on_invalid``: "error" or "skip" for a line that is not valid UTF-8.
    """

    def __init__(self, path: str | Path, on_invalid: str = "error"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"text corpus not found: {self.path}")
        self.on_invalid = on_invalid
        log = RecordLog(str(self.path), on_invalid)
        self._offsets = array("q")
        offset = 0
        with open(self.path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                start, offset = offset, offset + len(line)
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if on_invalid == "error":
                        raise DataError(f"{self.path}:{line_number}: not valid UTF-8: {exc} ({SKIP_HINT})") from exc
                    log.invalid("line is not valid UTF-8", f"line {line_number}")
                    continue
                if text.strip():
                    self._offsets.append(start)
                else:
                    # Blank lines separate paragraphs in most corpora: expected, so a note, not a warning.
                    log.note("blank lines skipped")
        if not self._offsets:
            raise DataError(f"{self.path}: no non-blank line")
        self._summary = log.summary({"sentences": len(self._offsets)})
        log_summary(logger, self._summary)
        self._handle: BinaryIO | None = None
        self._handle_pid = -1

    def summary(self) -> DatasetSummary:
        return self._summary

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        # One handle per process: DataLoader workers each get their own after fork/spawn.
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the dataset
            self._handle_pid = os.getpid()
        self._handle.seek(self._offsets[index])
        return self._handle.readline().decode("utf-8").strip()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_handle_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
