"""`probe-rl`: the command line.

Parses and validates the config before importing anything heavy (torch, vllm, ray, deepspeed), so
`--help`, `--dry-run` and config mistakes answer in about a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    cluster_address,
    dump_toml_with_unset,
    load_config,
)

DESCRIPTION = """\
probe-rl: asynchronous RL for language models with interpretability probes in the reward.

Generators (vLLM) sample completions, scorers (a frozen copy of the model with forward hooks)
compute linear-probe scores and reference log-probs, the rewarder shapes the task reward with the
probe scores, and a DeepSpeed learner trains on it and pushes new weights back to the generators.
"""

RUN_EPILOG = f"""\
config:
  Settings come from a TOML file (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)}) and can be
  overridden with dotted keys, e.g.

    probe-rl run --pipeline.num_steps 10 --learner.lr 1e-5 --shaping.kind penalty

  Sections: {", ".join(Config.model_fields)}.
  `probe-rl run --dry-run` prints every key with its resolved value; the comments in
  pipeline/config.py explain each one.

outputs (in run.output_dir/run.name):
  config.toml       the resolved config
  metrics.parquet   one row per step: rewards, probe scores, KL, loss, staleness, tokens/s, seconds per stage
  rollouts.parquet  a sample of rollouts with their scores and decoded text
  eval.parquet      with eval.every: probe AUROC on the live policy, the frozen copy and a refit probe
  checkpoints/      step_000010/ (the step, six digits): weights, config and tokenizer (a transformers/vLLM
                    model folder), Adam moments in optimizer/; step_000010.inflight.parquet: rollouts
                    launched before it.
                    Every 10 steps or 30 minutes by default; a lost learner restarts from the newest
                    by itself, and --resume continues a stopped run from it
  STOP              create it (touch RUN_DIR/STOP) to stop a run cleanly: after the step in hand it
                    checkpoints with the rollouts in flight and exits; --resume carries on exactly
  summary.json      first/last task reward, eval accuracy before/after, seconds per step

other commands (each with --help):
  probe-rl probe train|eval|toy-data   fit and measure linear probes
  probe-rl experiment                  arms x seeds and a report;  probe-rl report DIR  rewrites one
  probe-rl profile                     overhead of probes against plain RLHF
  probe-rl cost                        FLOPs and memory per step, toy to 405B
  probe-rl submit|status|logs|stop     Ray jobs on a cluster
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("probe-rl")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe-rl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"probe-rl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="train (the default command)", description=DESCRIPTION, epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    run.add_argument("--config", default=None, help=f"TOML config file (default: {DEFAULT_CONFIG.name})")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config, every key (unset ones as "
                     "comments), check the files it names (model, dataset, reward module, probes) and exit")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue RUN_DIR from its last checkpoint: its config.toml, same step numbering, "
                     "metrics appended (overrides such as --pipeline.num_steps still apply)")
    run.add_argument("--config-env", default=None, help=argparse.SUPPRESS)  # set by `probe-rl submit`
    jobs_common = argparse.ArgumentParser(add_help=False)
    jobs_common.add_argument("--address", default=None,
                             help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265); "
                             "token-authenticated clusters read $RAY_AUTH_TOKEN")
    sm = sub.add_parser("submit", parents=[jobs_common], help="submit a run as a Ray job to a cluster",
                        description="Validate CONFIG (+ dotted overrides) and the files it names here, then submit "
                        "it as a Ray job whose working directory is an upload of this folder (--working-dir; up to "
                        "100 MiB, outputs and environments left out): the files the config names under it go with "
                        "it, named relative to it; probe-rl itself must be installed on the cluster (deploy/). "
                        "Prints the job id.",
                        epilog="example: probe-rl submit configs/gpu.toml --pipeline.num_steps 50 "
                        "--address http://127.0.0.1:8265 --follow", allow_abbrev=False)
    sm.add_argument("--config", default=None, help=f"TOML config; may also come first, as `submit CONFIG` "
                    f"(default: {DEFAULT_CONFIG.name})")
    sm.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    sm.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    sm.add_argument("--job-id", default=None, help="submission id to use (default: generated)")
    sm.add_argument("--working-dir", default=None, help="the folder uploaded as the job's working directory "
                    "(default: the current one)")
    about = {
        "status": ("print a job's status", "Print the status of a job `probe-rl submit` started (PENDING, RUNNING, "
                   "SUCCEEDED, FAILED or STOPPED) and the server's message about it."),
        "logs": ("print (or --follow) a job's logs", "Print everything the job has printed so far (the run's own "
                 "progress lines), or with --follow stream it until the job ends."),
        "stop": ("stop a job", "Ask the cluster to stop a job (its driver is signalled, the roles end with it). For a "
                 "clean stop that checkpoints and can be resumed, touch STOP in the run folder instead."),
    }
    for name, (text, description) in about.items():
        jp = sub.add_parser(name, parents=[jobs_common], help=text, description=description + " Each request "
                            "waits at most 15 s for the dashboard to answer.")
        jp.add_argument("job_id", help="the id `probe-rl submit` printed (raysubmit_... or your --job-id)")
        if name == "logs":
            jp.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    _add_probe_parser(sub)
    _add_analysis_parsers(sub)
    return parser


def _add_probe_parser(sub) -> None:
    probe = sub.add_parser("probe", help="train and evaluate linear probes", description="Linear probes on a model's "
                           "residual stream: fit them on labelled completions, or measure them on a model/checkpoint.")
    psub = probe.add_subparsers(dest="probe_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="toy", help='hub id, local model directory or checkpoint, or "toy" (default)')
    common.add_argument("--data", required=True, help="labelled completions: Parquet/JSONL with prompt, completion, label")
    common.add_argument("--config", default=None, help="config whose [toy] section defines the toy model")
    common.add_argument("--aggregation", default=None, help="mean, max, last or window:K over completion tokens")
    pt = psub.add_parser("train", parents=[common], help="fit one logistic-regression probe per layer",
                         description="Extract activations with scoped hooks (one pass for all layers), fit "
                         "class-balanced L2 logistic regression on a prompt-grouped train split, save each probe as "
                         "safetensors + JSON, and print held-out AUROC and recall at 1% and 5% false-positive rate.")
    pt.add_argument("--layers", type=int, nargs="+", required=True, help="0-based decoder layers to probe")
    pt.add_argument("--name", default="probe", help="probe name (suffixed _l<layer> when several layers)")
    pt.add_argument("--out", default="probes_out", help="directory for <name>.safetensors/.json")
    pt.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on standardised weights")
    pt.add_argument("--held-out", type=float, default=0.2, help="fraction of prompts held out for the metrics")
    pt.add_argument("--no-balance", action="store_true", help="do not reweight classes to equal total weight")
    pt.add_argument("--seed", type=int, default=0)
    pe = psub.add_parser("eval", parents=[common], help="AUROC and recall at fixed FPR of saved probes",
                         description="Score labelled completions with saved probes on a model or checkpoint.")
    pe.add_argument("probes", nargs="+", help="probe files (<stem>, <stem>.json or <stem>.safetensors)")
    pe.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ptd = psub.add_parser("toy-data", help="write the toy labelled set (hedge vs plain answers)")
    ptd.add_argument("out", help="output .jsonl")
    ptd.add_argument("--num", type=int, default=1000, help="prompts (two completions each)")
    ptd.add_argument("--seed", type=int, default=123)
    ptd.add_argument("--config", default=None)


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least`, else a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _add_analysis_parsers(sub) -> None:
    ex = sub.add_parser("experiment", help="run arms x seeds and write a report",
                        description="Run every arm of an experiment file with every seed (by default configs/"
                        "experiment.toml: plain RL and the probe in the reward (read on the frozen copy, and live in the "
                        "generators' sampling pass), in the loss, and ablated: 5 arms in three toy worlds, 15 runs of "
                        "50 steps, about 20 minutes on 2 cores once the worlds are built), sharing one Ray instance; an arm "
                        "already finished in --out is not run again (rerun with the same --out to resume; a run held "
                        "in --out's data/, as a committed report's is, counts as finished too, so a long experiment "
                        "resumes on a fresh clone). The report is rewritten after every run. Then "
                        "write report.md: hack, correct and evasion rates, held-out accuracy, the probe's live, frozen "
                        "and refit AUROC and the share of hacks it flags, every arm side by side with plain RL and what "
                        "each is predicted to do, PNG plots, and every run's metrics as Parquet in data/.",
                        epilog="Extra --section.key VALUE overrides apply to every run, after the file's shared "
                        "[overrides] and its arms', e.g. --pipeline.num_steps 20.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ex.add_argument("--file", default=str(DEFAULT_CONFIG.parent / "experiment.toml"), help="experiment file")
    ex.add_argument("--arms", nargs="+", default=None, help="arms to run (default: the file's default_arms)")
    ex.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the file's)")
    ex.add_argument("--out", default=None, help="output directory (default: runs/experiment-<time>)")
    ex.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's checkpoints (by default removed: the report reads none, and a "
                    "real model's take GBs a run)")
    ex.add_argument("--dry-run", action="store_true", help="validate every run's config, list the runs, exit")
    co = sub.add_parser("cost", help="FLOPs/memory per step and the probes' overhead, toy to 405B",
                        description="Estimate FLOPs and memory of one RL step per stage (generate, reference, learn, "
                        "probes) for Llama-style models, and the overhead probe shaping adds over plain RLHF, with "
                        "and without a KL term. See pipeline/analysis/cost.py for the model and its assumptions.")
    co.add_argument("--model", nargs="+", default=["toy", "0.5b", "7b", "70b", "405b"], help="presets to tabulate "
                    "(default: all)")
    co.add_argument("--prompts", type=_count(1), default=64, help="prompts a step (default: 64)")
    co.add_argument("--group", type=_count(1), default=8, help="completions per prompt (default: 8)")
    co.add_argument("--prompt-len", type=_count(1), default=256, help="tokens a prompt (default: 256)")
    co.add_argument("--completion-len", type=_count(1), default=1024, help="tokens a completion (default: 1024)")
    co.add_argument("--probe-layer", type=_count(0), default=None, help="deepest probed layer (default: the middle)")
    co.add_argument("--num-probes", type=_count(1), default=1, help="probes read per token (default: 1)")
    pf = sub.add_parser("profile", help="overhead of probes against plain RLHF, measured A B A B",
                        description="Run the plain arm (no probes: scorers compute reference log-probs only) and the "
                        "probe-shaped arm on the same config and seed, alternating, and write profile.md with seconds "
                        "per stage, tokens/s, scorer utilisation, the overhead ratio with its spread, a chart, and a "
                        "Ray timeline of one step per arm. Runs already complete in --out are read back, not run again: "
                        "the same command finishes an interrupted profile, and a larger --repeats adds pairs.",
                        epilog="Extra --section.key VALUE overrides apply to every run.", allow_abbrev=False)
    pf.add_argument("--config", default=None, help=f"TOML config; may also come first, as `profile CONFIG` "
                    f"(default: {DEFAULT_CONFIG.name})")
    pf.add_argument("--repeats", type=_count(1), default=2, help="A B pairs per KL setting")
    pf.add_argument("--kl", choices=["on", "off", "both"], default="both", help="with a KL term, without, or both")
    pf.add_argument("--out", default=None, help="output directory (default: <run.output_dir>/profile)")
    pf.add_argument("--live", action="store_true", help="also the live readings: the probes on a live scorer copy "
                    "(a second pass) and inside the generators' sampling pass (none)")
    pf.add_argument("--in-flight", action="store_true", help="also the probes arm with weights reaching generators "
                    "mid-generation (generator.update_mode = in_flight)")
    pf.add_argument("--continuous", action="store_true", help="also the probes arm with generators that never wait "
                    "for a call (generator.update_mode = continuous), beside between steps (and in flight, with "
                    "--in-flight): steps/s, tokens/s, idle shares, staleness, the overlap limit")
    pf.add_argument("--cores", action="store_true", help="also the ways of sharing the cores: threads that follow "
                    "the phase (pipeline.cores = phase), synchronous, and colocated (pipeline.colocate), against the "
                    "machine's floor")
    rp = sub.add_parser("report", help="(re)write the report of an experiment directory",
                        description="Write report.md (and its plots and data/) for an experiment's output folder "
                        "from the runs in it, or, where its run folders are gone, from the data/ a report wrote; "
                        "what `probe-rl experiment` writes at its end.")
    rp.add_argument("dir", help="experiment output directory: its <arm>-seed<k>/ run folders, or, where there are "
                    "none (a committed report such as docs/results/experiment), the data/ folder a report wrote")
    rp.add_argument("--experiment", metavar="FILE", help="the experiment file the runs came from: the report names "
                    "it and keeps its arm order (default: arms alphabetically, the file named '(rewritten)')")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]  # `probe-rl` alone runs the default toy job
    if len(argv) > 1 and argv[0] in ("submit", "profile", "experiment") and not argv[1].startswith("-"):
        # `submit CONFIG --a.b 1`: argparse would take `1` as CONFIG
        argv = [argv[0], "--file" if argv[0] == "experiment" else "--config", *argv[1:]]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "experiment":
        return _experiment(args, rest)
    if args.command == "report":
        return _report(args)
    if args.command == "cost":
        return _cost(args)
    if args.command == "profile":
        return _profile(args, rest)
    if args.command == "probe":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _probe(args)
    if args.command in ("status", "logs", "stop"):
        return _job(args)
    try:
        if getattr(args, "config_env", None):
            cfg = _config_from_env(args.config_env, rest)
        elif getattr(args, "resume", None):
            from pathlib import Path

            if args.config:
                raise ConfigError("--resume takes the run directory's own config.toml; drop --config")
            cfg = load_config(Path(args.resume) / "config.toml", rest)
        else:
            cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"probe-rl: {e}", file=sys.stderr)
        return 2
    if args.command == "submit":
        return _submit(args, cfg)
    if args.dry_run:
        print(dump_toml_with_unset(cfg), end="")
        from pipeline.worlds.world import check_files

        try:
            checked = check_files(cfg)
        except ValueError as e:
            print(f"probe-rl: {e}", file=sys.stderr)
            return 2
        print(f"# checked: {'; '.join(checked)}", file=sys.stderr)
        return 0
    try:
        cluster_address(cfg.run.ray_address)  # before a run folder is made
    except ConfigError as e:
        print(f"probe-rl: {e}", file=sys.stderr)
        return 2
    return _run(cfg, getattr(args, "resume", None))


def _run(cfg: Config, resume: str | None = None) -> int:
    from pathlib import Path

    from pipeline.loop.driver import prepare, run
    from pipeline.loop.run_dir import latest_checkpoint
    from pipeline.worlds.world import build_world

    try:
        if resume is None:
            run_dir, world, checkpoint = *prepare(cfg), None
        else:
            run_dir = Path(resume)
            checkpoint = latest_checkpoint(run_dir)
            world = build_world(cfg)
    except ValueError as e:  # a bad model path, probe file, dataset or run directory: say what to change
        print(f"probe-rl: {e}", file=sys.stderr)
        return 2
    summary = run(cfg, run_dir, world, resume_from=checkpoint)
    print("\nsummary:")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _experiment(args: argparse.Namespace, rest: list[str]) -> int:
    from pipeline.analysis.experiment import load_experiment

    try:
        exp, runs = load_experiment(args.file, args.arms, args.seeds, rest)
    except ConfigError as e:
        print(f"probe-rl experiment: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for arm, seed in runs:
            print(f"{arm} seed {seed}")
        return 0
    from pipeline.analysis.experiment import run_experiment

    try:
        run_experiment(args.file, runs, args.out, vary_world=exp.vary_world, keep_checkpoints=args.keep_checkpoints)
    except ValueError as e:
        print(f"probe-rl experiment: {e}", file=sys.stderr)
        return 2
    return 0


def _config_from_env(var: str, rest: list[str]) -> Config:
    import os
    import tempfile

    text = os.environ.get(var)
    if text is None:
        raise ConfigError(f"--config-env {var}: the variable is not set")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    from pathlib import Path

    return load_config(f.name, rest, relative_to=Path.cwd())  # the job's working directory: the user's upload


def _job_errors(fn):
    """Turn the job server's failures (unreachable, refused token) into one clear line and exit code 1."""

    def wrapped(args, *rest):
        from ray.exceptions import AuthenticationError

        from pipeline.cli.jobs import address_of

        try:
            return fn(args, *rest)
        except AuthenticationError as e:
            first = str(e).strip().splitlines()[0]
            print(f"probe-rl {args.command}: authentication failed at {address_of(args.address)}: {first} "
                  "(set RAY_AUTH_TOKEN to the cluster's token; see deploy/README.md)", file=sys.stderr)
        except ConnectionError as e:
            print(f"probe-rl {args.command}: cannot reach the Ray job server at {address_of(args.address)} ({e}). "
                  "Is the cluster up and its dashboard running? Token-authenticated clusters also need "
                  "RAY_AUTH_TOKEN set here.", file=sys.stderr)
        except TimeoutError as e:
            print(f"probe-rl {args.command}: {e}", file=sys.stderr)
        except RuntimeError as e:
            print(f"probe-rl {args.command}: the Ray job server refused the request: {e}", file=sys.stderr)
        except ValueError as e:  # an address that is not a dashboard's
            print(f"probe-rl {args.command}: {e}", file=sys.stderr)
            return 2
        return 1

    return wrapped


@_job_errors
def _submit(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.cli import jobs

    job_id = jobs.submit(cfg, args.address, args.python, args.job_id, working_dir=args.working_dir,
                         log=lambda line: print(line, file=sys.stderr))
    print(job_id)
    if args.follow:
        jobs.follow_logs(job_id, args.address)
        status = jobs.wait_for(job_id, args.address, timeout_s=60)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


@_job_errors
def _job(args: argparse.Namespace) -> int:
    from pipeline.cli import jobs

    c, url = jobs.client(args.address), jobs.address_of(args.address)

    def ask(call, what: str):
        return jobs.bounded(call, jobs.ANSWER_WAIT_S, what, url)

    if args.command == "status":
        info = ask(lambda: c.get_job_info(args.job_id), f"the status of job {args.job_id}")
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs":
        if args.follow:
            jobs.follow_logs(args.job_id, args.address)
        else:
            print(ask(lambda: c.get_job_logs(args.job_id), f"the logs of job {args.job_id}"), end="")
    else:
        stopped = ask(lambda: c.stop_job(args.job_id), f"the stop of job {args.job_id}")
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _profile(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        load_config(args.config, rest)
    except ConfigError as e:
        print(f"probe-rl profile: {e}", file=sys.stderr)
        return 2
    from pipeline.analysis.profile import profile

    try:
        profile(args.config, rest, args.repeats, args.kl, args.out, live=args.live, in_flight=args.in_flight,
                cores=args.cores, continuous=args.continuous)
    except ValueError as e:
        print(f"probe-rl profile: {e}", file=sys.stderr)
        return 2
    return 0


def _cost(args: argparse.Namespace) -> int:
    from pipeline.analysis.cost import PRESETS, Workload, format_table, step_cost

    unknown = [m for m in args.model if m not in PRESETS]
    if unknown:
        print(f"probe-rl cost: unknown model {unknown}; presets: {sorted(PRESETS)}", file=sys.stderr)
        return 2
    archs, works = [], []
    for kl in (True, False):
        costs = []
        for m in args.model:
            arch = PRESETS[m]
            layer = min(args.probe_layer, arch.layers - 1) if args.probe_layer is not None else arch.layers // 2
            work = Workload(args.prompts, args.group, args.prompt_len, args.completion_len, (layer,),
                            args.num_probes, kl)
            costs.append(step_cost(arch, work))
            if kl:
                archs.append(arch)
                works.append(work)
        print(f"\n{'With' if kl else 'Without'} a KL term ({args.prompts} prompts x {args.group} completions, "
              f"{args.prompt_len}+{args.completion_len} tokens, {args.num_probes} probe(s)):\n")
        print(format_table(costs))
    from pipeline.analysis.cost import Utilisation, format_live_table

    print("\nReading the probes on the live policy (KL on): a live scorer copy runs the policy again up to the "
          "deepest probe and takes every weight version; a generator read adds only the probes' dot products to "
          "the generators' own pass:\n")
    print(format_live_table(archs, works))

    u = Utilisation()
    print(f"\nEstimated time uses per-stage utilisation (decode {u.decode:.0%}, prefill {u.prefill:.0%}, score "
          f"{u.score:.0%}, learn {u.learn:.0%} of peak; score and learn measured at 7B on an H200, see "
          "pipeline/analysis/cost.py); FLOPs are exact for the architecture.")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.analysis.report import load_exported, load_runs, write_report

    root = Path(args.dir)
    runs = []
    for d in sorted(root.glob("*-seed*")):
        arm, _, seed = d.name.rpartition("-seed")
        if seed.isdigit() and (d / "metrics.parquet").exists():
            runs.append((arm, int(seed)))
    # The runs in folders, and those a report wrote to data/ whose folders are gone (an experiment resumed on a
    # fresh machine from its committed report): the report rewrites data/, so both must be in it.
    data = load_runs(root, runs)
    for arm, rs in load_exported(root).items():
        for r in rs:
            if (arm, r["seed"]) not in runs:
                data.setdefault(arm, []).append(r)
                runs.append((arm, r["seed"]))
    if not runs:
        raise SystemExit(f"error: {root} holds no finished run (<arm>-seed<k>/metrics.parquet) and no data/runs.parquet; "
                         "pass the --out folder of an experiment")
    vary_world, name, model = True, "(rewritten)", "toy"
    configs = sorted(root.glob("*-seed*/config.toml"))
    if configs:  # the runs' own config names their model
        from pipeline.config import load_config

        model = load_config(configs[0]).model.path
    if args.experiment:
        from pipeline.analysis.experiment import load_experiment

        exp, exp_configs = load_experiment(args.experiment, None, None, [])
        arms = list(exp.arms)
        missing = sorted({arm for arm, _ in runs} - set(arms))
        if missing:
            raise SystemExit(f"error: runs of arms {missing} under {root} are not in {args.experiment}")
        runs.sort(key=lambda r: (arms.index(r[0]), r[1]))
        vary_world, name = exp.vary_world, args.experiment
        model = model if configs else next(iter(exp_configs.values())).model.path
    print(write_report(root, name, runs, vary_world=vary_world, data=data, model=model))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from pipeline.cli import probe_cli as cli

    handler = {"train": cli.train, "eval": cli.evaluate, "toy-data": cli.toy_data}[args.probe_command]
    try:
        return handler(args)
    except ValueError as e:
        print(f"probe-rl probe {args.probe_command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
