"""A user's own files named by a config: a reward module beside the config file needs no PYTHONPATH, and the
config's relative input paths resolve against its own folder, from any working directory
(pipeline/config.py: find_task_modules, resolve_file_paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.worlds.tasks import load_reward_fn


def _project(tmp_path: Path, module: str, body: str) -> Path:
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / f"{module}.py").write_text(body)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(40)]
    (proj / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "elsewhere").mkdir()
    return proj


def test_a_reward_module_beside_the_config_is_found_from_another_working_directory(tmp_path, monkeypatch):
    proj = _project(tmp_path, "beside_reward", "def score(completions, answers):\n"
                    "    return [float(c.strip() == a) for c, a in zip(completions, answers)]\n")
    (proj / "my.toml").write_text('[task]\nreward_fn = "beside_reward:score"\ndataset = "data/prompts.jsonl"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(proj / "my.toml")
    assert cfg.task.python_path == [str(proj.resolve())]
    assert cfg.task.dataset == str((proj / "data" / "prompts.jsonl").resolve())  # against the file's folder
    fn = load_reward_fn(cfg.task.reward_fn, python_path=cfg.task.python_path)
    assert fn([" 4", "5"], ["4", "4"]) == [1.0, 0.0]
    # an override is relative to the working directory, as a shell user expects: left as given
    assert load_config(proj / "my.toml", ["--task.dataset", "data/prompts.jsonl"]).task.dataset == "data/prompts.jsonl"


def test_a_reward_module_in_the_working_directory_is_remembered_for_the_roles(tmp_path, monkeypatch):
    proj = _project(tmp_path, "cwd_reward", "def score(completions, answers):\n    return [0.5] * len(completions)\n")
    cfg_file = tmp_path / "elsewhere" / "c.toml"
    cfg_file.write_text('[task]\nreward_fn = "cwd_reward:score"\n')
    monkeypatch.chdir(proj)
    assert load_config(cfg_file).task.python_path == [str(proj.resolve())]


def test_a_reward_module_found_nowhere_is_refused_at_load_naming_where_it_looked(tmp_path, monkeypatch):
    proj = _project(tmp_path, "unrelated", "")
    (proj / "my.toml").write_text('[task]\nreward_fn = "nowhere_reward:score"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"task.reward_fn='nowhere_reward:score': no module 'nowhere_reward' on the "
                       r"Python path, in the config's folder \(.*proj\) or the working directory \(.*elsewhere\)"):
        load_config(proj / "my.toml")


def test_installed_modules_add_nothing_to_the_python_path(tmp_path):
    (tmp_path / "c.toml").write_text('[task]\nreward_fn = "pipeline.worlds.tasks:arithmetic_reward"\n'
                                     'ground_truth_fn = "json:loads"\n')  # probe-rl's own, and the standard library
    assert load_config(tmp_path / "c.toml").task.python_path == []


def test_probe_and_model_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    import torch

    from probes.probe import LinearProbe

    proj = _project(tmp_path, "unused", "")
    LinearProbe("hack", 1, torch.zeros(64), torch.zeros(1)).save(proj / "probes" / "hack")
    (proj / "model").mkdir()
    (proj / "my.toml").write_text('[model]\npath = "model"\n[[scorer.probes]]\npath = "probes/hack"\n'
                                  '[[scorer.probes]]\npath = "toy"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(proj / "my.toml")
    assert cfg.model.path == str((proj / "model").resolve())
    assert [p.path for p in cfg.scorer.probes] == [str((proj / "probes" / "hack").resolve()), "toy"]
    (proj / "hub.toml").write_text('[model]\npath = "Qwen/Qwen2.5-0.5B-Instruct"\n')  # nothing there: a hub id
    assert load_config(proj / "hub.toml").model.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_mistyped_folder_is_never_sent_to_the_hub_and_an_offline_hub_fails_fast(tmp_path, monkeypatch):
    from pipeline.worlds import world

    asked = []
    monkeypatch.setattr(world, "hub_reachable", lambda *a: asked.append(1) or False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for typo in ("models/mine", "models/mine/v2", "./mine", "no/such/folder"):  # a path, not "org/name"
        with pytest.raises(ValueError, match=f"model.path '{typo}' does not exist"):
            world.resolve_model_path(typo)
    assert not asked
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match=r"not a local directory nor in the hub cache, and the hub did not answer "
                       r"within 3 s \(on a machine without network, set HF_HUB_OFFLINE=1\)"):
        world.resolve_model_path("someorg/some-model")
    assert asked == [1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # told so: the hub is not even tried
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        world.resolve_model_path("someorg/some-model")
    assert asked == [1]


def test_submit_uploads_the_users_folder_with_the_files_its_config_names(tmp_path, monkeypatch):
    """The job's working directory is an upload of the user's folder: the reward module, dataset and probe under
    it go with it, named relative to it; a file elsewhere is kept at its path and said not to be uploaded; a
    folder too large to upload is refused before anything is sent (pipeline/cli/jobs.py: for_upload)."""
    import torch

    from pipeline.cli import jobs
    from probes.probe import LinearProbe

    proj = _project(tmp_path, "upload_reward", "def score(completions, answers):\n    return [1.0] * len(completions)\n")
    LinearProbe("hack", 1, torch.zeros(64), torch.zeros(1)).save(proj / "probes" / "hack")
    outside = tmp_path / "shared" / "eval.jsonl"
    outside.parent.mkdir()
    outside.write_text((proj / "data" / "prompts.jsonl").read_text())
    (proj / "my.toml").write_text(f'[task]\nreward_fn = "upload_reward:score"\ndataset = "data/prompts.jsonl"\n'
                                  f'eval_dataset = "{outside}"\n[[scorer.probes]]\npath = "probes/hack"\n'
                                  '[eval]\nprobe_data = "/cluster/labelled.jsonl"\n')
    monkeypatch.chdir(proj)
    cfg, notes = jobs.for_upload(load_config("my.toml"), proj)
    assert cfg.task.dataset == "data/prompts.jsonl" and cfg.scorer.probes[0].path == "probes/hack"
    assert cfg.task.python_path == ["."]  # the module beside the config, in the job's working directory
    assert cfg.task.eval_dataset == str(outside.resolve())
    assert notes == [f"task.eval_dataset = {outside.resolve()}: outside the uploaded folder {proj.resolve()}; not "
                     "uploaded, so it must exist at that path on every node (shared storage)",
                     "eval.probe_data = /cluster/labelled.jsonl: not on this machine; it must exist at that path on "
                     "the cluster"]
    # the job reads that config in its copy of the upload, its working directory on the cluster
    import shutil

    from pipeline.cli.main import _config_from_env
    from pipeline.config import dump_toml

    shutil.copytree(proj, tmp_path / "cluster-copy")
    monkeypatch.chdir(tmp_path / "cluster-copy")
    monkeypatch.setenv("PROBE_RL_TEST_CONFIG", dump_toml(cfg))
    there = _config_from_env("PROBE_RL_TEST_CONFIG", [])
    assert there.task.dataset == str((tmp_path / "cluster-copy" / "data" / "prompts.jsonl").resolve())
    assert load_reward_fn(there.task.reward_fn, python_path=there.task.python_path)(["x"], ["y"]) == [1.0]
    monkeypatch.chdir(proj)
    size, _ = jobs.upload_size(proj, jobs.UPLOAD_EXCLUDES, 2**30)
    assert size == sum(f.stat().st_size for f in proj.rglob("*") if f.is_file())
    with open(proj / "data" / "huge.bin", "wb") as f:  # sparse: 200 MiB on paper, nothing on disk
        f.truncate(200 * 2**20)
    (proj / ".venv").mkdir()
    with open(proj / ".venv" / "site.bin", "wb") as f:  # an environment is never uploaded, whatever its size
        f.truncate(4 * 2**30)
    with pytest.raises(ValueError, match=r"holds over 100 MiB \(largest: data \(200 MiB\)"):
        jobs.submit(load_config("my.toml"), "http://127.0.0.1:1", log=lambda line: None)


def test_the_my_model_template_runs_its_checks_in_a_users_folder(tmp_path, monkeypatch, tiny_model_dir):
    """configs/my_model.toml copied into a project with the files its header names: it loads from another working
    directory, and its world builds on them (model, tokenizer, dataset, reward module with its arguments)."""
    import shutil

    from pipeline.config import SHIPPED_CONFIGS
    from pipeline.worlds.world import build_world

    proj = _project(tmp_path, "myreward", "def score(completions, answers, prompts):\n"
                    "    return [float(a in c) for c, a in zip(completions, answers)]\n")
    shutil.copytree(tiny_model_dir, proj / "models" / "my-model")
    shutil.copy(SHIPPED_CONFIGS / "my_model.toml", proj / "my_model.toml")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(proj / "my_model.toml", ["--generator.max_model_len", "64", "--generator.max_new_tokens", "8"])
    world = build_world(cfg, log=lambda line: None)
    assert world.model_path == str((proj / "models" / "my-model").resolve())
    assert len(world.prompts) + len(world.eval_prompts) == 40 and world.reward_args == ("prompts",)
    assert world.reward(["it is 4", "5"], ["4", "4"], [2, 2]) == [1.0, 0.0]


def test_the_wheel_ships_the_configs_and_finds_them_from_anywhere(tmp_path):
    """`pip install` users get configs/ as package data: the wheel holds every shipped config, and the
    documented `--config configs/<name>.toml` finds the installed copy from any working directory."""
    import subprocess
    import sys
    import zipfile

    from pipeline.config import REPO_ROOT, SHIPPED_CONFIGS

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("probe_rl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        shipped = {n.rpartition("/")[2] for n in z.namelist() if n.startswith("pipeline/configs/")}
    assert shipped == {p.name for p in SHIPPED_CONFIGS.glob("*.toml")} and "toy.toml" in shipped
    (tmp_path / "work").mkdir()
    out = subprocess.run([sys.executable, "-c", "import pipeline, pipeline.config as c; print(pipeline.__file__); "
                          "print(c.load_config('configs/smollm2.toml').model.path)"], cwd=tmp_path / "work",
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(tmp_path / "site" / "pipeline" / "__init__.py"), "smollm2"]


def test_dry_run_shows_every_key_and_checks_the_files(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from pydantic import BaseModel

    from pipeline.cli.main import main
    from pipeline.config import Config

    assert main(["run", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "# checked: 4096 prompts and 256 held out" in err

    def leaves(model: type[BaseModel], section: str) -> list[tuple[str, str]]:
        found = []
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += leaves(kind, f"{section}.{name}" if section else name)
            elif section and not (section == "scorer" and name == "probes"):
                found.append((section, name))
        return found

    blocks: dict[str, str] = {}
    for part in ("\n" + out).split("\n["):
        header, _, body = part.partition("]\n")
        blocks[header.strip("[]")] = body
    missing = [f"{s}.{k}" for s, k in leaves(Config, "")
               if f"{s}.{k}" not in blocks  # a table of its own (a dict, such as resources)
               and not any(line.startswith((f"{k} = ", f"# {k} = (unset)")) for line in blocks.get(s, "").splitlines())]
    assert not missing  # every key, its value or `(unset)`
    assert load_config(_write(tmp_path / "again.toml", out)).model_dump() == load_config().model_dump()

    proj = _project(tmp_path, "dry_reward", "def score(completions, answers, difficulty):\n    return [0.0]\n")
    shutil_copy = __import__("shutil").copytree
    shutil_copy(tiny_model_dir, proj / "model")
    (proj / "c.toml").write_text('[model]\npath = "model"\n[task]\nreward_fn = "dry_reward:score"\n'
                                 'dataset = "data/prompts.jsonl"\n[generator]\nmax_model_len = 64\nmax_new_tokens = 8\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["run", "--config", str(proj / "c.toml"), "--dry-run"]) == 2  # a column the data lacks
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("probe-rl: task.reward_fn: score requires ['difficulty'], which the data does not have")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_model_folder_without_weights_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from pipeline.worlds.world import resolve_model_path

    shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match=r"model.path '.*m' has a config.json but no weights \(\*.safetensors\)"):
        resolve_model_path(str(tmp_path / "m"))
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_the_readmes_python_example_calls_the_api_as_it_is():
    """The README's notebook example: every name it imports exists and each call binds to its signature."""
    import ast
    import importlib
    import inspect

    from pipeline.config import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    [code] = [b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "prepare(cfg)" in b]
    tree = ast.parse(code)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            names.update({a.name: getattr(module, a.name) for a in node.names})
    assert {"load_config", "prepare", "run"} <= set(names)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("load_config", "prepare", "run")]
    assert len(calls) == 3
    for call in calls:
        inspect.signature(names[call.func.id]).bind(*[object() for _ in call.args],
                                                    **{k.arg: object() for k in call.keywords})
