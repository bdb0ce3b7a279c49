"""DeepSpeed's CPU comm op is built into a folder of this environment's own (setup.sh builds it there)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from learner.cpu_ops import extensions_dir


def test_the_extension_folder_is_this_environments_own_unless_torch_extensions_dir_names_one(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = Path(extensions_dir())
    assert folder.parent == Path.home() / ".cache" / "torch_extensions"
    assert folder.name == f"probe-rl-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")  # another environment: another folder
    assert Path(extensions_dir()) != folder and Path(extensions_dir()).parent == folder.parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/shared/ext")
    assert extensions_dir() == "/shared/ext"


def test_the_environments_own_ninja_comes_first_so_every_process_builds_alike(monkeypatch, tmp_path):
    """torch runs the first `ninja` on PATH; the system's and the environment's record a build differently (each
    rebuilds what the other built), so the environment's own is put first, once."""
    import os

    from learner.cpu_ops import use_extensions_dir

    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ninja").touch()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(bin_dir), "/bin"]))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_extensions_dir()
    assert os.environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin", "/bin"]
    assert os.environ["TORCH_EXTENSIONS_DIR"] == extensions_dir()
    (bin_dir / "ninja").unlink()  # an environment without its own ninja: PATH is left as it is
    monkeypatch.setenv("PATH", "/usr/bin")
    use_extensions_dir()
    assert os.environ["PATH"] == "/usr/bin"
