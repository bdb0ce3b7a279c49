"""Handlers of `probe-rl probe train|eval|toy-data` (argument parsing lives in pipeline/cli/main.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load_model(spec: str, config: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.worlds.world import resolve_model_path

    if spec == "toy":
        from pipeline.worlds.toy import ensure_toy_world

        path = str(ensure_toy_world(load_config(config).toy).model_dir)
    else:
        path = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def _print_metrics(name: str, layer: int, m: dict) -> None:
    print(f"  {name:<20} layer {layer:<3} AUROC {m['auroc']:.4f}   recall@1%FPR {m['recall_at_1pct_fpr']:.3f}   "
          f"recall@5%FPR {m['recall_at_5pct_fpr']:.3f}   (n={m['num']}, positives={m['num_positive']})")


def train(args: argparse.Namespace) -> int:
    from pipeline.worlds.tasks import load_labelled
    from probes.toolkit import train_probes

    data = load_labelled(args.data)
    path, model, tokenizer = _load_model(args.model, args.config)
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    for layer in args.layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"--layers {layer}: model {path} has {num_layers} layers (0..{num_layers - 1})")
    print(f"fitting {len(args.layers)} probe(s) on {len(data)} labelled completions, model {path} (hidden {hidden})")
    results = train_probes(model, tokenizer, data, args.layers, args.name, args.aggregation or "mean", args.l2,
                           args.held_out, args.seed, balance=not args.no_balance)
    out = Path(args.out)
    print(f"held-out metrics ({args.aggregation or 'mean'} over completion tokens); probes saved in {out}/")
    for probe, metrics in results:
        probe.notes["model"] = path
        probe.notes["data"] = str(args.data)
        probe.save(out / probe.name)
        _print_metrics(probe.name, probe.layer, metrics)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pipeline.worlds.tasks import load_labelled
    from probes.probe import load_probe
    from probes.toolkit import evaluate_probes

    data = load_labelled(args.data)
    probes = [load_probe(p) for p in args.probes]
    path, model, tokenizer = _load_model(args.model, args.config)
    for p in probes:
        p.check_fits(model.config.num_hidden_layers, model.config.hidden_size, model_name=f"model {path}")
        if args.aggregation:
            p.aggregation = args.aggregation
    results = evaluate_probes(model, tokenizer, data, probes)
    print(f"model {path}, {len(data)} labelled completions")
    for p, m in zip(probes, results, strict=True):
        _print_metrics(p.name, p.layer, m)
    if args.json:
        Path(args.json).write_text(json.dumps({p.name: m for p, m in zip(probes, results, strict=True)}, indent=2))
    return 0


def toy_data(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.worlds.toy import toy_labelled
    from probes.toolkit import save_labelled

    cfg = load_config(args.config).toy
    data = toy_labelled(args.num, cfg.max_operand, seed=args.seed)
    save_labelled(data, args.out)
    print(f"wrote {len(data)} labelled toy completions (label 1 = hedge) to {args.out}")
    return 0
