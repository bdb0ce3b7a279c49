"""Checkpoint folders: weights, config and tokenizer in transformers' layout, plus Adam moments and the step.

A checkpoint loads anywhere a transformers model does (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`, `vllm.LLM(model=...)`). Weights and moments (in `optimizer/`, out of model
loaders' sight) are written as safetensors shards of at most `shard_bytes`, one layer group at a time, so writing never holds the whole model on a
rank; `model.safetensors.index.json` maps names to shards as transformers expects. `probe_rl_state.json`
is written last and the folder renamed into place, so a crash mid-save never leaves a folder that looks
complete. Reading is lazy (one tensor at a time) and never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

STATE_FILE = "probe_rl_state.json"
WEIGHTS_PREFIX = "model"
MOMENTS_PREFIX = "optimizer"
MOMENTS_DIR = "optimizer"  # a folder of its own: model loaders (vLLM) read every *.safetensors beside config.json
# Beside the moments (`exp_avg/<name>`, `exp_avg_sq/<name>`) and fp32 masters (`master/<name>`): the RNG states
RNG_CPU = "rng/torch_cpu"
RNG_CUDA = "rng/torch_cuda"


class ShardWriter:
    """Collects named CPU tensors and writes `<prefix>-0000i-of-0000n.safetensors` shards plus an index
    (a single shard is named `<prefix>.safetensors`, as transformers writes it)."""

    def __init__(self, folder: Path, prefix: str, shard_bytes: int) -> None:
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if self.pending and self.pending_bytes + t.numel() * t.element_size() > self.shard_bytes:
            self._flush()
        self.pending[name] = t.clone() if t.data_ptr() == tensor.data_ptr() else t  # never alias live weights
        self.pending_bytes += t.numel() * t.element_size()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"{self.prefix}.part{len(self.written)}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if not self.written:
            return
        n = len(self.written)
        if n == 1:
            (self.folder / self.written[0][0]).rename(self.folder / f"{self.prefix}.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written, 1):
            final = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def begin(directory: str | Path, version: int) -> tuple[Path, Path]:
    """(final path, temporary path) of the checkpoint for `version`; the temporary folder is fresh."""
    path = Path(directory) / f"step_{version:06d}"
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return path, tmp


def commit(path: Path, tmp: Path, state: dict) -> Path:
    """Write the state file last and move the folder into place."""
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def save_model_files(folder: Path, model_config: PretrainedConfig, model_path: str) -> None:
    """config.json, generation_config.json and the tokenizer of the run's model, beside the weights."""
    from transformers import AutoTokenizer, GenerationConfig

    model_config.save_pretrained(folder)
    try:
        GenerationConfig.from_pretrained(model_path).save_pretrained(folder)
    except OSError:
        pass  # the model has none
    AutoTokenizer.from_pretrained(model_path).save_pretrained(folder)


class CheckpointReader:
    """A checkpoint folder opened for reading: `version`, and tensors one at a time by name."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(path)
        try:
            state = json.loads((self.folder / STATE_FILE).read_text())
            self.version = int(state["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {self.folder}: {STATE_FILE} is missing or malformed ({e})") from None
        self.state = state
        self._where: dict[str, dict[str, object]] = {WEIGHTS_PREFIX: {}, MOMENTS_PREFIX: {}}
        files = [(WEIGHTS_PREFIX, f) for f in sorted(self.folder.glob("*.safetensors"))]
        files += [(MOMENTS_PREFIX, f) for f in sorted((self.folder / MOMENTS_DIR).glob("*.safetensors"))]
        for kind, f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"checkpoint file {f} is not a readable safetensors file: {e}") from None
            for key in handle.keys():
                self._where[kind][key] = handle
        if not self._where[WEIGHTS_PREFIX]:
            raise ValueError(f"checkpoint {self.folder} holds no model weights (*.safetensors)")

    @property
    def weight_names(self) -> set[str]:
        return set(self._where[WEIGHTS_PREFIX])

    def weight(self, name: str) -> torch.Tensor:
        return self._where[WEIGHTS_PREFIX][name].get_tensor(name)

    def moment(self, key: str, name: str) -> torch.Tensor | None:
        handle = self._where[MOMENTS_PREFIX].get(f"{key}/{name}")
        return None if handle is None else handle.get_tensor(f"{key}/{name}")

    @property
    def has_moments(self) -> bool:
        return bool(self._where[MOMENTS_PREFIX])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (its state file is written last), or None."""
    done = sorted(p.parent for p in (Path(run_dir) / "checkpoints").glob(f"step_*/{STATE_FILE}"))
    return done[-1] if done else None
