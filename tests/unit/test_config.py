import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, dump_toml, load_config, parse_overrides


def test_default_config_is_valid_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.model.path == "toy"
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(["--learner.lr", "1e-5", "--pipeline.max_staleness=0", "--run.name", "abc",
                            "--run.progress", "false"])
    assert tree == {"learner": {"lr": 1e-5}, "pipeline": {"max_staleness": 0}, "run": {"name": "abc", "progress": False}}
    cfg = load_config(overrides=["--learner.lr", "1e-5", "--pipeline.max_staleness", "0"])
    assert cfg.learner.lr == 1e-5 and cfg.pipeline.max_staleness == 0


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown key"):
        load_config(overrides=["--learner.lrr", "1"])


def test_bad_value_names_key_and_constraint():
    with pytest.raises(ConfigError, match=r"pipeline\.group_size: Input should be greater than or equal to 2"):
        load_config(overrides=["--pipeline.group_size", "1"])
    with pytest.raises(ConfigError, match=r"shaping\.kind: Input should be 'none', 'penalty', 'threshold', 'screen', 'loss' or 'ablate'"):
        load_config(overrides=["--shaping.kind", "clip"])


def test_cross_field_checks():
    with pytest.raises(ValueError, match="needs at least one probe"):
        Config.model_validate({"shaping": {"kind": "penalty"}})
    with pytest.raises(ValueError, match="multiple of 64"):
        Config.model_validate({"toy": {"hidden_size": 96}})
    with pytest.raises(ConfigError) as err:  # one line that names the keys, not the whole config it checked
        load_config(overrides=["--shaping.kind", "penalty", "--scorer.probes", "[]"])
    assert str(err.value).splitlines()[1:] == ["  shaping.kind='penalty' needs at least one probe in scorer.probes (or "
                                               "set shaping.kind = \"none\" for plain RLHF)"]


@pytest.mark.parametrize("key", ["learner.lr", "shaping.coef", "learner.kl_coef", "pipeline.timeout_s"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_infinite_or_nan_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: Input should be a finite number"):
        load_config(overrides=[f"--{key}", value])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_answers_fast_without_heavy_imports():
    """A config mistake is answered before torch is imported; --dry-run, which also reads the files a config
    names (probes are tensors), imports no vLLM, Ray or DeepSpeed."""
    code = (
        "import sys; from pipeline.cli.main import main; rc = main(['--dry-run', '--pipeline.num_steps', '3']);"
        "heavy = [m for m in ('vllm', 'ray', 'deepspeed') if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "num_steps = 3" in out.stdout
    assert "HEAVY []" in out.stdout
    code = ("import sys; from pipeline.cli.main import main; rc = main(['--learner.zero_stage', '5']);"
            "print('HEAVY', [m for m in ('torch', 'vllm', 'ray', 'deepspeed') if m in sys.modules]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "HEAVY []" in out.stdout


def test_cli_rejects_bad_config_with_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "run", "--learner.zero_stage", "5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "learner.zero_stage" in out.stderr


def test_weight_transport_defaults_and_backends():
    from pipeline.config import BACKEND_GLOO, BACKEND_INLINE, weight_backend

    cpu = load_config()
    assert cpu.weights.transport == "collective" and weight_backend(cpu) == BACKEND_GLOO  # gloo on CPU
    gpu = load_config(overrides={"learner": {"num_gpus": 1}, "generator": {"num_gpus": 1}})
    assert weight_backend(gpu) == "nccl"  # NCCL where learner and generators have GPUs
    assert weight_backend(load_config(overrides=["--weights.transport", "object_store"])) == BACKEND_INLINE


def test_transports_the_machine_cannot_run_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r'weights.backend = "nccl" needs GPUs .* learner.num_gpus and '
                                          r'generator.num_gpus = 0; set weights.backend = "gloo"'):
        load_config(overrides=["--weights.backend", "nccl"])
    assert load_config(overrides=["--generator.tensor_parallel_size", "2"]).generator.tensor_parallel_size == 2  # CPU
    with pytest.raises(ConfigError, match=r"generator.tensor_parallel_size=4 is larger than the GPUs in a generator's "
                                          r"placement bundle \(generator.num_gpus=2\); set generator.num_gpus = 4"):
        load_config(overrides=["--generator.tensor_parallel_size", "4", "--generator.num_gpus", "2"])
    ok = load_config(overrides=["--generator.tensor_parallel_size", "2", "--generator.num_gpus", "2"])
    assert ok.generator.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match=r"generator.num_gpus=0.5 and learner.num_gpus=0.25 are fractions of a GPU, "
                                          r"so Ray may put a learner rank and a generator on one GPU"):
        load_config(overrides=["--generator.num_gpus", "0.5", "--learner.num_gpus", "0.25"])


def test_cuda_graphs_are_on_for_gpu_generators_unless_a_feature_needs_eager_mode():
    """generator.enforce_eager unset: eager on CPU, CUDA graphs on GPUs, eager again when the ablation arm hooks
    vLLM's forward; set by hand it is kept, and graphs with the ablation hook are refused."""
    assert load_config().generator.enforce_eager is True  # CPU
    gpu = ["--generator.num_gpus", "1", "--learner.num_gpus", "1"]
    assert load_config(overrides=gpu).generator.enforce_eager is False
    assert load_config(overrides=[*gpu, "--shaping.kind", "ablate"]).generator.enforce_eager is True
    assert load_config(overrides=[*gpu, "--generator.enforce_eager", "true"]).generator.enforce_eager is True
    with pytest.raises(ConfigError, match=r"CUDA graphs and compilation skip: set generator.enforce_eager = true"):
        load_config(overrides=[*gpu, "--shaping.kind", "ablate", "--generator.enforce_eager", "false"])
    assert load_config(Path(__file__).resolve().parents[2] / "configs/gpu.toml").generator.enforce_eager is False


def test_cli_refuses_an_impossible_transport_before_anything_starts():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "run", "--weights.backend", "nccl"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "weights.backend" in out.stderr and "run directory" not in out.stdout


def test_run_help_lists_every_command():
    from pipeline.cli.main import build_parser

    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "run", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"probe-rl {name}" in out or f"|{name}" in out or f"{name}|" in out, name


@pytest.mark.parametrize("argv, says", [
    (["cost", "--prompts", "-4"], "argument --prompts: -4 is less than 1"),
    (["cost", "--completion-len", "x"], "argument --completion-len: 'x' is not a whole number"),
    (["profile", "--repeats", "0"], "argument --repeats: 0 is less than 1"),
])
def test_counts_on_the_command_line_are_checked(argv, says, capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and says in capsys.readouterr().err


def test_version():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "--version"], capture_output=True, text=True,
                         timeout=60).stdout
    assert out.strip() == f"probe-rl {version('probe-rl')}"


def test_every_shipped_run_config_loads():
    """Every run config in configs/ (experiment files are checked in test_probe_reads_config.py; the template
    my_model.toml, which names the user's files, in test_user_files.py) is valid."""
    root = Path(__file__).resolve().parents[2] / "configs"
    runs = [p for p in sorted(root.glob("*.toml")) if not p.name.startswith("experiment") and p.name != "my_model.toml"]
    assert {"toy.toml", "toy_hack.toml", "mid.toml", "mid_hack.toml", "gpu.toml"} <= {p.name for p in runs}
    for path in runs:
        cfg = load_config(path)
        assert cfg.pipeline.num_steps > 0, path.name
    mid = load_config(root / "mid_hack.toml")
    assert mid.task.reward_fn.endswith("worked_reward_loophole") and mid.toy.completions == "worked"


def test_continuous_generation_sizes_its_engine_and_is_refused_where_it_cannot_work():
    """generator.update_mode = "continuous": its engine holds a generator's share of a step's rows unless
    continuous_seqs says otherwise; continuous_seqs without it, and continuous with colocated turns, are errors
    that say what to change."""
    cfg = load_config(overrides={"generator": {"update_mode": "continuous", "num_workers": 3},
                                 "pipeline": {"prompts_per_step": 8, "group_size": 4}})
    assert cfg.stream_capacity() == 11  # ceil(32 / 3)
    assert load_config(overrides={"generator": {"update_mode": "continuous", "continuous_seqs": 64}}
                       ).stream_capacity() == 64
    with pytest.raises(ConfigError, match="continuous_seqs=64 sizes a continuous generator"):
        load_config(overrides={"generator": {"continuous_seqs": 64}})
    with pytest.raises(ConfigError, match="a live scorer must take each weight version"):
        load_config(overrides={"generator": {"update_mode": "continuous"}, "scorer": {"model": "live"}})
    with pytest.raises(ConfigError, match="never stops generating: choose one"):
        load_config(overrides={"generator": {"update_mode": "continuous"},
                               "pipeline": {"colocate": True, "max_staleness": 0}})
