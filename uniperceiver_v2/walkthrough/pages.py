"""What a notebook page shows besides figures: the code of the package where it is taught.

The notebooks put the implementation of an equation under the equation (as the Annotated Transformer does), read
from the package itself with :mod:`inspect`, so the page always shows the code that runs.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["source_block"]


def source_block(obj: Any, start: str | None = None, end: str | None = None) -> str:
    """The source of a function, method or class as a markdown code block, headed by where it lives.

    Args:
        obj: the function, method or class (``GlobalAttentionPooling.forward``).
        start: keep the source from the first line containing this text on (e.g. skip a long docstring).
        end: and up to the first later line containing this text, that line included.

    Returns:
        Markdown: "``qualname`` in ``uniperceiver_v2/.../file.py``, line N:" and a fenced python block; show it with
        ``display(Markdown(...))``.

    Raises:
        ValueError: ``start`` or ``end`` is not in the source.
    """
    obj = inspect.unwrap(obj)                    # the function itself, not a decorator's wrapper (torch.no_grad)
    lines, first = inspect.getsourcelines(obj)
    lines = "".join(lines).splitlines()
    offset = 0
    if start is not None:
        found = [i for i, line in enumerate(lines) if start in line]
        if not found:
            raise ValueError(f"source_block: {start!r} is not in the source of {obj.__qualname__}")
        offset = found[0]
        lines = lines[offset:]
    if end is not None:
        found = [i for i, line in enumerate(lines) if end in line and i > 0]
        if not found:
            raise ValueError(f"source_block: {end!r} is not in the source of {obj.__qualname__}")
        lines = lines[:found[0] + 1]
    path = Path(inspect.getsourcefile(obj)).resolve()
    checkout = Path(__file__).resolve().parents[2]
    shown = path.relative_to(checkout) if path.is_relative_to(checkout) else path.name
    where = f"`{obj.__qualname__}` in `{shown}`, line {first + offset}"
    return where + ":\n\n```python\n" + textwrap.dedent("\n".join(lines)) + "\n```"
