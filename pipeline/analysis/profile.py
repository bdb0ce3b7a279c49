"""`probe-rl profile`: the overhead of probe shaping against plain RLHF, measured in one session.

Arms share the config and seed and differ only in the probes: *plain* has no probes (scorers compute
reference log-probs only, or nothing at all without KL) and *probes* has the config's probes and
shaping. Arms alternate (A B A B ...) inside one Ray instance so machine noise hits both. With
`--kl both` the same pair also runs with `learner.kl_coef = 0`, where plain RLHF has no scorer pass
and the probe arm pays a pass truncated after its deepest probe. Writes profile.md, step_time.png and
a Ray timeline (Chrome trace) of one step of each arm.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import Config, _merge, load_config
from pipeline.cores import node_cores

STAGES = ("wait_rollouts", "reward", "learn", "sync", "probe_retrain")


def arms_of(base: Config, kl: str, live: bool = False, in_flight: bool = False,
            cores: bool = False, continuous: bool = False) -> dict[str, Config]:
    """plain-<tag> and probes-<tag> (tag: kl, nokl); with `live` also live-<tag> (the probes on a live scorer copy:
    a second pass) and gen-<tag> (the probes read inside the generators' own sampling pass); with `in_flight`
    also inflight-<tag> (the probes arm with weights reaching generators mid-generation); with `continuous` also
    continuous-<tag> (the probes arm with generators that never wait: actors/stream.py); with `cores` also
    phase-<tag> (the probes arm with pipeline.cores = "phase"), sync-<tag> (the probes arm at max_staleness 0,
    each role on its reservation) and colocated-<tag> (pipeline.colocate: max_staleness 0, every phase on every
    core)."""
    if not base.scorer.probes:
        raise ValueError("profile compares plain RLHF with probes: the config needs scorer.probes")
    shaping = base.shaping.model_dump() if base.shaping.kind != "none" else {"kind": "penalty", "coef": 1.0}
    data = base.model_dump(mode="json")
    probes_on = _merge(data, {"shaping": shaping, "eval": {"every": 0}})
    plain = _merge(data, {"shaping": {"kind": "none"}, "scorer": {"probes": [], "retrain_every": 0},
                          "eval": {"every": 0}})
    arms = {}
    for tag, coef in (("kl", base.learner.kl_coef or 0.01), ("nokl", 0.0)):
        if kl == "on" and tag == "nokl" or kl == "off" and tag == "kl":
            continue
        arms[f"plain-{tag}"] = Config.model_validate(_merge(plain, {"learner": {"kl_coef": coef}}))
        arms[f"probes-{tag}"] = Config.model_validate(_merge(probes_on, {"learner": {"kl_coef": coef}}))
        if live:
            for arm, where in (("live", "live"), ("gen", "generator")):
                arms[f"{arm}-{tag}"] = Config.model_validate(_merge(probes_on, {
                    "learner": {"kl_coef": coef}, "scorer": {"model": where, "retrain_every": 0}}))
        if in_flight:
            arms[f"inflight-{tag}"] = Config.model_validate(_merge(probes_on, {
                "learner": {"kl_coef": coef}, "generator": {"update_mode": "in_flight"}}))
        if continuous:
            arms[f"continuous-{tag}"] = Config.model_validate(_merge(probes_on, {
                "learner": {"kl_coef": coef}, "generator": {"update_mode": "continuous"}}))
        if cores:
            for arm, pipe in (("phase", {"cores": "phase", "colocate": False}),
                              ("sync", {"max_staleness": 0, "cores": "reserved", "colocate": False}),
                              ("colocated", {"max_staleness": 0, "cores": "phase", "colocate": True})):
                arms[f"{arm}-{tag}"] = Config.model_validate(_merge(probes_on, {
                    "learner": {"kl_coef": coef}, "pipeline": pipe}))
    return arms


def profile(config: str | None, overrides: list[str], repeats: int, kl: str, out: str | None, warmup: int = 2,
            log: Callable[[str], None] = print, live: bool = False, in_flight: bool = False,
            cores: bool = False, continuous: bool = False) -> Path:
    """Run the arms A B A B `repeats` times and write the report. Runs already complete in `out` (an interrupted
    profile, or one run again with more --repeats) are read back instead of run again."""
    from pipeline.loop.run_dir import restart_run_dir

    base = load_config(config, overrides)
    arms = arms_of(base, kl, live, in_flight, cores, continuous)
    root = Path(out or Path(base.run.output_dir) / "profile")
    root.mkdir(parents=True, exist_ok=True)
    plan = []  # (repeat, arm, its config, done already)
    for r in range(repeats):
        for name, cfg in arms.items():
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={
                "output_dir": str(root), "name": f"{name}-r{r}", "progress": False})})
            plan.append((r, name, cfg, _complete(root / f"{name}-r{r}", cfg, log)))
    results: dict[str, list[dict]] = {name: [] for name in arms}
    todo = [p for p in plan if not p[3]]
    if len(todo) < len(plan):
        log(f"profile: {len(plan) - len(todo)} of {len(plan)} runs are complete in {root} and are read back")
    session = _Session(arms, log) if todo else None
    try:
        for r, name, cfg, done in plan:
            run_dir = root / f"{name}-r{r}"
            if not done:  # a run cut off before starts again: its partial figures would skew the means
                run_dir = restart_run_dir(cfg)
                session.run(name, cfg, run_dir)
            rows = _rows(run_dir)
            results[name].append(_summarise(rows[warmup:], cfg))
            if r == 0 and not done:
                _timeline(rows[min(warmup, len(rows) - 1)], root / f"timeline-{name}.json")
            log(f"[repeat {r + 1}/{repeats}] {name}: {results[name][-1]['step_s']:.3f} s/step"
                + (" (read back)" if done else ""))
    finally:
        if session is not None:
            session.close()
    write_profile(root, results, base)
    log(f"profile: {root / 'profile.md'}")
    return root


class _Session:
    """The worlds and the one Ray instance the profile's runs share (started only when a run is left to do)."""

    def __init__(self, arms: dict[str, Config], log) -> None:
        from pipeline.loop.remote import init_ray
        from pipeline.worlds.world import build_world

        # one world per kind of arm (plain, probes, live, gen): they differ in where the probes are read
        self.worlds = {}
        for name, cfg in arms.items():
            kind = name.split("-")[0]
            if kind not in self.worlds:
                self.worlds[kind] = build_world(cfg, log)
        init_ray(max(arms.values(), key=lambda c: c.reserved_cpus()))

    def run(self, name: str, cfg: Config, run_dir: Path) -> None:
        from pipeline.loop.driver import run

        run(cfg, run_dir, self.worlds[name.split("-")[0]], log=lambda *_: None)

    def close(self) -> None:
        import ray

        ray.shutdown()


def _complete(run_dir: Path, cfg: Config, log) -> bool:
    """Whether `run_dir` holds a finished run of `cfg`. A run of another config is refused: its figures would be
    mixed into this profile's."""
    from pipeline.loop.run_dir import finished

    saved = run_dir / "config.toml"
    if not (run_dir / "metrics.parquet").is_file():
        return False
    if not saved.is_file() or (load_config(str(saved)).model_dump(exclude={"run"})
                               != cfg.model_dump(exclude={"run"})):
        raise ValueError(f"{run_dir} holds a run of another config (or of an older probe-rl that kept none); "
                         "profile into a new --out folder, or remove that one")
    if not finished(run_dir):
        log(f"profile: {run_dir.name} was cut off before its last step; it is run again")
        return False
    return True


def _rows(run_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def _summarise(rows: list[dict], cfg: Config) -> dict[str, float]:
    """Per-step means: the step's real wall time, the stages inside it, and resource-seconds per role.

    Resource-seconds are CPU-seconds (GPU-seconds on GPUs): *busy* is each role's working seconds times the
    processors one worker holds (generators: their generate calls; scorers: their score calls; learner: its
    slowest rank's compute, times the ranks); *held* is every reserved processor times the step's wall time."""
    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else 0.0

    g, sc, lr = cfg.generator, cfg.scorer, cfg.learner
    out = {"step_s": mean("time/step_wall_s"), "tokens_per_s": mean("rollout/tokens_per_s"),
           "generate_s": mean("time/generate_wall_s"), "score_s": mean("time/score_busy_s"),
           "learn_compute_s": mean("time/learn_compute_s"), "padding_waste": mean("scorer/padding_waste"),
           "completion_len": mean("rollout/completion_len")}
    for stage in STAGES:
        out[f"{stage}_s"] = mean(f"time/stage/{stage}_s")
    out["scorer_utilisation"] = out["score_s"] / (out["step_s"] * sc.num_workers) if out["step_s"] else 0.0
    per = lambda r: max(r.num_cpus, r.num_gpus)  # noqa: E731 - processors one worker holds
    out["busy_generator"] = mean("time/generate_busy_s") * per(g)
    out["busy_scorer"] = out["score_s"] * per(sc)
    out["busy_learner"] = out["learn_compute_s"] * lr.num_ranks * per(lr)
    out["busy_total"] = out["busy_generator"] + out["busy_scorer"] + out["busy_learner"]
    # generator processors held through the step but not generating (waiting for weights, or for work)
    out["idle_generator"] = out["step_s"] * g.num_workers * per(g) - out["busy_generator"]
    held = sum(n * per(r) for _, n, r in cfg.roles())
    out["held_total"] = held * out["step_s"]
    # CPU-seconds each role computed, at the thread counts it ran on (cores/<role>_threads; pipeline.cores)
    out["threads_generator"], out["threads_scorer"], out["threads_learner"] = (
        mean("cores/generate_threads"), mean("cores/score_threads"), mean("cores/learn_threads"))
    out["work_total"] = (mean("time/generate_busy_s") * out["threads_generator"]
                         + out["score_s"] * out["threads_scorer"]
                         + out["learn_compute_s"] * lr.num_ranks * out["threads_learner"])
    out["cores"] = float(node_cores())  # the machine's: a profile's runs are local
    # how the step's wall time splits between the roles (per worker), and the overlap limit: a step can take no
    # less than its slowest role's busy seconds (per worker), whatever overlaps
    out["tokens_per_step_s"] = mean("rollout/tokens") / out["step_s"] if out["step_s"] else 0.0
    busy = {"generator": mean("time/generate_busy_s") / g.num_workers, "scorer": out["score_s"] / sc.num_workers,
            "learner": out["learn_compute_s"]}
    out["limit_s"] = max(busy.values())
    for role, seconds in busy.items():
        out[f"per_worker_{role}"] = seconds
    out["idle_frac_generator"] = max(0.0, 1 - busy["generator"] / out["step_s"]) if out["step_s"] else 0.0
    out["idle_frac_learner"] = max(0.0, 1 - busy["learner"] / out["step_s"]) if out["step_s"] else 0.0
    out["token_staleness"] = mean("rollout/token_staleness_mean")
    out["token_staleness_max"] = max((r.get("rollout/token_staleness_max") or 0.0 for r in rows), default=0.0)
    return out


def _timeline(row: dict, path: Path) -> None:
    """Ray's Chrome trace, cut to the wall-clock window of one step."""
    import ray

    start, end = row["time/wall_start"] * 1e6, row["time/wall_end"] * 1e6
    events = [e for e in ray.timeline() if "ts" in e and start <= float(e["ts"]) <= end]
    path.write_text(json.dumps(events))


def overhead(results: dict[str, list[dict]], tag: str, key: str = "step_s",
             arm: str = "probes") -> tuple[float, float, float] | None:
    """Median, min and max over repeats of key(arm) / key(plain), paired by repeat (key: step_s, the wall
    time; busy_total, the resource-seconds; busy_generator, the generators' busy seconds)."""
    a, b = results.get(f"{arm}-{tag}"), results.get(f"plain-{tag}")
    if not a or not b:
        return None
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True) if y[key] > 0]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def truncated_share(results: dict[str, list[dict]]) -> float | None:
    """Scorer seconds of the no-KL probe pass (truncated after the deepest probe) over those of the KL probe
    pass (the whole model, plus the reference log-probs): the share of a full pass the truncated one costs."""
    a, b = results.get("probes-nokl"), results.get("probes-kl")
    if not a or not b:
        return None
    return float(np.mean([x["score_s"] for x in a]) / np.mean([y["score_s"] for y in b]))


def write_profile(root: Path, results: dict[str, list[dict]], base: Config) -> Path:
    from pipeline.analysis.cost import Arch, Workload, step_cost

    lines = ["# probe-rl profile: probes against plain RLHF", "",
             f"{base.pipeline.prompts_per_step} prompts x {base.pipeline.group_size} completions per step, "
             f"{base.pipeline.num_steps} steps per run, arms alternated, {len(next(iter(results.values())))} "
             "repeats; means over steps after warm-up. *s/step* is the step's real wall-clock time (the driver's clock "
             "from start to end of the step); *generate* is generation's wall time, *score* the scorers' busy "
             "seconds, *learn* the learner's compute. Resource-seconds per step: *busy* CPU-seconds (GPU-seconds on "
             "GPUs) each role spent working, times the processors one worker holds; *held*: every reserved processor "
             "times the step's wall time.", "",
             "| arm | s/step | generate s | score s | learn s | sync s | tokens/s | completion tokens | busy: gen "
             "| busy: scorer | busy: learner | busy total | held total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, reps in results.items():
        m = {k: float(np.mean([r[k] for r in reps])) for k in reps[0]}
        lines.append(f"| {name} | {m['step_s']:.3f} | {m['generate_s']:.3f} | {m['score_s']:.3f} | "
                     f"{m['learn_compute_s']:.3f} | {m['sync_s']:.3f} | {m['tokens_per_s']:.0f} | "
                     f"{m['completion_len']:.0f} | {m['busy_generator']:.2f} | {m['busy_scorer']:.2f} | "
                     f"{m['busy_learner']:.2f} | {m['busy_total']:.2f} | {m['held_total']:.2f} |")
    lines += ["", "Overhead (probes / plain, per repeat pair; median, min, max):", ""]
    for tag, label in (("kl", "with KL (probes ride on the reference pass)"),
                       ("nokl", "without KL (plain has no scorer pass; probes pay a truncated one)")):
        wall, busy = overhead(results, tag), overhead(results, tag, "busy_total")
        if wall and busy:
            lines.append(f"- {label}: wall time **{wall[0]:.3f}** ({wall[1]:.3f}-{wall[2]:.3f}); busy "
                         f"resource-seconds **{busy[0]:.3f}** ({busy[1]:.3f}-{busy[2]:.3f})")
    lines += _live_section(results) + _flight_section(results) + _cores_section(results)
    share = truncated_share(results)
    if share is not None:
        # the toy's probes read toy.probe_layer; other models' probe layers are in their files, not the config
        used = (base.toy.probe_layer + 1) / base.toy.num_layers if base.model.path == "toy" else None
        lines.append(f"- truncated probe pass (no KL) costs **{share:.2f}** of a full scorer pass (with KL)"
                     + (f"; layers used / total = {used:.2f}, ratio {share / used:.2f}x" if used else ""))
    t = base.toy  # the toy world's architecture, as built (the toy or the mid world)
    arch = Arch(f"toy world ({t.num_layers} layers x {t.hidden_size})", t.num_layers, t.hidden_size,
                t.mlp_ratio * t.hidden_size, 64 if t.tokenizer == "chars" else t.bpe_vocab, t.hidden_size // 64,
                t.hidden_size // 64, 64) if base.model.path == "toy" else None
    if arch is not None:
        completion = int(np.mean([r["completion_len"] for reps in results.values() for r in reps])) or 1
        lines += ["", f"## Cost model check (pipeline/analysis/cost.py on the {arch.name} architecture)", "",
                  "| case | predicted probe overhead (FLOPs) | measured step-time ratio − 1 |", "|---|---|---|"]
        for tag, kl in (("kl", True), ("nokl", False)):
            o = overhead(results, tag)
            if o is None:
                continue
            work = Workload(base.pipeline.prompts_per_step, base.pipeline.group_size, 6, completion,
                            (base.toy.probe_layer,), len(base.scorer.probes), kl, 4)
            lines.append(f"| {tag} | {step_cost(arch, work).overhead():.2%} | {o[0] - 1:+.2%} |")
        lines += ["", "The prediction is the probes' share of the step's compute. The measured ratio is of wall "
                  "time, where scoring overlaps learning (the pipeline is asynchronous) and the toy step on 2 CPU "
                  "cores is dominated by fixed per-call costs (Ray calls, Arrow, Python), so extra scorer compute "
                  "shows up only when the scorer becomes the slowest stage. `probe-rl cost` gives the FLOP picture "
                  "at real sizes."]
    lines += ["", "![seconds per step by stage](step_time.png)", "",
              "Ray timelines of one step per arm: `timeline-<arm>.json` (open in chrome://tracing or Perfetto)."]
    _plot(root, results)
    path = root / "profile.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _live_section(results: dict[str, list[dict]]) -> list[str]:
    """The live readings (profile --live) against plain: generator, scorer, total busy seconds and wall time."""
    lines: list[str] = []
    live_rows = [(arm, tag) for tag in ("kl", "nokl") for arm in ("probes", "live", "gen")
                 if f"live-{tag}" in results and f"{arm}-{tag}" in results]
    if live_rows:
        lines += ["", "## Reading the probes live", "",
                  "*probes*: on the frozen scorer copy; *live*: on a live scorer copy that takes every weight version "
                  "(a second pass); *gen*: inside the generators' own sampling pass (no extra pass, "
                  "pipeline/transport/vllm_probes.py). Ratios to plain, per repeat pair: median (min-max).", "",
                  "| arm | generator busy s / plain | scorer busy s / plain | busy total / plain | wall / plain |",
                  "|---|---|---|---|---|"]
        for arm, tag in live_rows:
            cells = []
            for key in ("busy_generator", "busy_scorer", "busy_total", "step_s"):
                o = overhead(results, tag, key, arm)
                cells.append(f"**{o[0]:.3f}** ({o[1]:.3f}-{o[2]:.3f})" if o else "- (plain has none)")
            lines.append(f"| {arm}-{tag} | " + " | ".join(cells) + " |")
    return lines


MODE_ARMS = (("probes", "between steps"), ("inflight", "in flight"), ("continuous", "continuous"))


def _flight_section(results: dict[str, list[dict]]) -> list[str]:
    """The generation modes (profile --in-flight, --continuous) against the same arm with updates between generate
    calls: steps/s, tokens/s, idle shares, token staleness, and the overlap limit (the slowest role's busy seconds
    per worker, per step: no overlap makes a step shorter)."""
    lines: list[str] = []
    for tag in ("kl", "nokl"):
        modes = [(arm, label) for arm, label in MODE_ARMS if f"{arm}-{tag}" in results]
        if f"probes-{tag}" not in results or len(modes) < 2:
            continue
        base = results[f"probes-{tag}"]
        lines += ["", f"## Generation modes ({tag})", "",
                  "*between steps*: a new weight version reaches a generator after the generate call it serves; *in "
                  "flight*: between two decoding steps (`generator.update_mode = \"in_flight\"`); *continuous*: "
                  "generators never wait for a call, later steps' groups enter as sequences finish "
                  "(`\"continuous\"`, actors/stream.py). *idle*: the share of the step a generator (per worker) or "
                  "the learner was not computing; *staleness*: versions each token lags the learner that trains on it "
                  "(mean, max); *limit*: the slowest role's busy seconds per worker a step, which no overlap beats. "
                  "Medians of the repeats (min-max); ratios per repeat pair.", "",
                  "| mode | s/step | steps/s / between | tokens/s | generator idle | learner idle | staleness | "
                  "limit s (role) | s/step / limit |", "|---|---|---|---|---|---|---|---|---|"]
        for arm, label in modes:
            reps = results[f"{arm}-{tag}"]

            def med(key, reps=reps):
                vals = sorted(r[key] for r in reps)
                return statistics.median(vals), vals[0], vals[-1]

            step, speed = med("step_s"), sorted(b["step_s"] / a["step_s"] for a, b in zip(reps, base, strict=True))
            limit = med("limit_s")
            roles = ("generator", "scorer", "learner")
            role = max(roles, key=lambda r: statistics.median(x[f"per_worker_{r}"] for x in reps))
            ratio = sorted(r["step_s"] / r["limit_s"] for r in reps if r["limit_s"])
            lines.append(
                f"| {label} | {step[0]:.2f} ({step[1]:.2f}-{step[2]:.2f}) | **{statistics.median(speed):.2f}** "
                f"({speed[0]:.2f}-{speed[-1]:.2f}) | {med('tokens_per_step_s')[0]:.0f} | "
                f"{med('idle_frac_generator')[0]:.0%} | {med('idle_frac_learner')[0]:.0%} | "
                f"{med('token_staleness')[0]:.2f}, {max(r['token_staleness_max'] for r in reps):.0f} | "
                f"{limit[0]:.2f} ({role}) | {statistics.median(ratio) if ratio else float('nan'):.2f} |")
    return lines


CORE_ARMS = (("probes", "disaggregated, each role on its reservation"),
             ("phase", "disaggregated, threads follow the phase"),
             ("sync", "synchronous (max_staleness 0), each role on its reservation"),
             ("colocated", "colocated: synchronous, every phase on every core"))


def _cores_section(results: dict[str, list[dict]]) -> list[str]:
    """profile --cores: s/step of each way of sharing the cores, against the machine's floor. The floor of an arm
    is its CPU-seconds of work a step (each role's busy seconds times the threads it ran on) over the cores; the
    single-thread floor is the reserved arms' work (every role on one thread, the most efficient use of a core)
    over the cores: no arm can beat it by more than its roles' parallel efficiency allows."""
    lines: list[str] = []
    for tag in ("kl", "nokl"):
        present = [(arm, label) for arm, label in CORE_ARMS if f"{arm}-{tag}" in results]
        if len(present) < 2 or f"colocated-{tag}" not in results:
            continue
        base = results[f"probes-{tag}"]
        single = (statistics.median(r["work_total"] / r["cores"] for r in results[f"sync-{tag}"])
                  if f"sync-{tag}" in results else None)
        lines += ["", f"## Sharing the cores ({tag})", "",
                  "*floor*: the arm's CPU-seconds of work a step (each role's busy seconds times the threads it ran "
                  "on) over the machine's cores; *1-thread floor*: the synchronous reserved arm's work, every role on "
                  "one thread, over the cores. Threads: mean per call (pipeline.cores). Medians over repeats "
                  "(min-max).", "",
                  "| arm | s/step | steps/s vs disaggregated | threads gen / score / learn | floor s | s/step / floor "
                  "| s/step / 1-thread floor |", "|---|---|---|---|---|---|---|"]
        for arm, label in present:
            reps = results[f"{arm}-{tag}"]
            step = [r["step_s"] for r in reps]
            speed = sorted(b["step_s"] / r["step_s"] for r, b in zip(reps, base, strict=True))
            floor = statistics.median(r["work_total"] / r["cores"] for r in reps)
            ratio = sorted(r["step_s"] / (r["work_total"] / r["cores"]) for r in reps if r["work_total"])
            threads = " / ".join(f"{statistics.median(r[k] for r in reps):.2f}"
                                 for k in ("threads_generator", "threads_scorer", "threads_learner"))
            lines.append(f"| {arm}-{tag}: {label} | {statistics.median(step):.2f} ({min(step):.2f}-{max(step):.2f})"
                         f" | **{statistics.median(speed):.3f}** ({speed[0]:.3f}-{speed[-1]:.3f}) | {threads} | "
                         f"{floor:.2f} | **{statistics.median(ratio):.3f}** ({ratio[0]:.3f}-{ratio[-1]:.3f}) | "
                         + (f"{statistics.median(step) / single:.3f}" if single else "-") + " |")
    return lines


def _plot(root: Path, results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    bottom = np.zeros(len(names))
    for stage in STAGES:
        vals = np.array([np.mean([r[f"{stage}_s"] for r in results[n]]) for n in names])
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set_ylabel("seconds per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "step_time.png", dpi=110)
    plt.close(fig)
