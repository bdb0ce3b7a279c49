"""Progress bars that stay quiet where nobody watches (CI, logs redirected to a file)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    from tqdm.auto import tqdm

    quiet = not enabled or os.environ.get("CI") == "true" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True)
