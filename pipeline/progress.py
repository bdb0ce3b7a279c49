"""Progress bars that stay quiet where nobody watches (CI, logs redirected to a file)."""

from __future__ import annotations

import os
import sys


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    from tqdm.auto import tqdm

    quiet = not enabled or os.environ.get("CI") == "true" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True)
