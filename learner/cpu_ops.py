"""DeepSpeed's CPU op (its shared-memory all-reduce) built once per environment, at install time.

DeepSpeed compiles that op with the machine's C++ compiler the first time a CPU rank joins a process group,
into torch's extension folder; on 2 cores that takes about half a minute, and it used to land in a run's (or a
test's) start. `setup.sh` runs `python -m learner.cpu_ops` after installing, so the first run finds it built.
The folder is one per environment (keyed by `sys.prefix`): two environments on one machine (another checkout,
another torch) would otherwise rebuild each other's build over and over.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path


def extensions_dir() -> str:
    """The torch extension folder of this environment: `TORCH_EXTENSIONS_DIR` when set, else one under
    ~/.cache/torch_extensions named after this environment's prefix."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions" / f"probe-rl-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}")


def use_extensions_dir() -> None:
    """Point torch's extension builder at this environment's folder, and at this environment's `ninja` (before
    DeepSpeed loads an op). torch runs whichever `ninja` is first on PATH, and two ninja versions (the system's
    and the pip one in the environment, which Ray's workers find first) record a build differently, so each
    would rebuild what the other built: the environment's own is put first, wherever the load happens."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    bin_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bin_dir, "ninja")):
        path = os.environ.get("PATH", "").split(os.pathsep)
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])


def build() -> bool:
    """Build (or find built) DeepSpeed's CPU shared-memory comm op, through the very call a CPU rank makes when it
    joins its process group; False where this DeepSpeed has no such op for this machine (it then falls back to
    torch's all-reduce)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_extensions_dir()
    from deepspeed.comm.torch import build_shm_op

    return build_shm_op() is not None


def main() -> int:
    start = time.monotonic()
    print(f"[setup] building DeepSpeed's CPU comm op into {extensions_dir()} (first time: about half a minute)",
          flush=True)
    built = build()
    print(f"[setup] {'the op is' if built else 'no CPU comm op for this machine; DeepSpeed uses torch all-reduce,'}"
          f" ready in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
