"""Progress bars: lively on a terminal, a line every 30 s in logs (Kubernetes, CI).

TQDM_DISABLE=1 turns them off."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def bar(iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it", leave: bool = True):
    on_terminal = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        mininterval=0.1 if on_terminal else 30.0,
        disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
        dynamic_ncols=True,
    )
