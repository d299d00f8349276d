"""The tune studies the default recipe's constants come from, and the recipe against them.

    python benchmarks/recipe_studies.py --runs-dir studies \\
        --study shakespeare=PATH/tinyshakespeare.txt:4:10 --study linux=PATH/linux-5M.c:3:8 ...
    python benchmarks/recipe_studies.py --runs-dir studies --report-only ...

Each --study NAME=CORPUS:MINUTES:TRIALS runs `lstmlm tune` on CORPUS (NAME the study, MINUTES
each trial, TRIALS trials; more trials join the same study on a second run) with the options
in --tune-args. A new study's first trials are seeded (Optuna's enqueue_trial) with the
hand-made recipe (benchmarks/configs/tinyshakespeare-hand.toml's 1×512, Adam 8e-3, cosine, no regularization)
and two variations, 1×768 and 1×384: a dozen trials of a 19-dimensional space would otherwise
be a random search. Then it reads the study back from its SQLite storage and prints, per study, its
trials by validation loss — the settings Optuna chose, the model's weights, the tokens the
trial trained on — and what `lstmlm.recipe.choose` picks for the same corpus, vocabulary,
machine speed (the recipe's probe, timed here) and minutes. `--json FILE` keeps it all.
Run it on a quiet machine: a trial's result is what its minutes allowed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lstmlm import recipe
from lstmlm.bench import measure_training
from lstmlm.config import Config, ModelConfig
from lstmlm.data.pipeline import prepare_data
from lstmlm.device import resolve_precision
from lstmlm.model import num_parameters

SHOWN = ("hidden", "layers", "embedding", "lr", "batch_size", "num_steps", "dropout", "weight_drop", "warmup_steps", "schedule")


def parse(spec: str) -> tuple[str, str, float, int]:
    name, rest = spec.split("=", 1)
    corpus, minutes, trials = rest.rsplit(":", 2)
    return name, corpus, float(minutes), int(trials)


OFF = {"dropout": 0.0, "weight_drop": 0.0, "locked_dropout": False, "dropout_input": 0.0, "dropout_output": 0.0, "embedding_dropout": 0.0,
       "ar": 0.0, "tar": 0.0, "optimizer": "adam", "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 50, "num_steps": 100}  # fmt: skip
SEEDS = (
    {"hidden": 512, "layers": 1, "lr": 8e-3, "batch_size": 32},  # the hand-made recipe
    {"hidden": 768, "layers": 1, "lr": 6e-3, "batch_size": 32},
    {"hidden": 384, "layers": 1, "lr": 1e-2, "batch_size": 64},
)


def run_study(name: str, corpus: str, minutes: float, trials: int, runs_dir: Path, tune_args: list[str]) -> None:
    command = [sys.executable, "-m", "lstmlm", "tune", "--corpus", corpus, "--minutes", f"{minutes:g}", "--study", name,
               "--runs-dir", str(runs_dir), "--json", *tune_args]  # fmt: skip
    if not (runs_dir / f"tune-{name}.db").exists():  # made, then seeded, then run
        subprocess.run([*command, "--trials", "0"], check=True, capture_output=True)
        seed(name, runs_dir, corpus)
    print("$ " + shlex.join([*command, "--trials", str(trials)]), flush=True)
    subprocess.run([*command, "--trials", str(trials)], check=False)


def seed(name: str, runs_dir: Path, corpus: str) -> None:
    import optuna

    vocab = len(prepare_data(Config().with_overrides({"corpus": corpus}).resolved()).vocab)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / f'tune-{name}.db'}")
    for s in SEEDS:
        study.enqueue_trial({**OFF, **s, "embedding": recipe.embedding_for(vocab)}, skip_if_exists=True)


def read_study(name: str, runs_dir: Path) -> list[dict[str, Any]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / f'tune-{name}.db'}")
    rows = []
    for trial in study.get_trials(deepcopy=False):
        cfg = trial.user_attrs.get("config")
        if trial.value is None or cfg is None:
            rows.append({"number": trial.number, "state": trial.state.name.lower(), "params": trial.params})
            continue
        metrics = runs_dir / str(trial.user_attrs.get("run", "")) / "metrics.jsonl"
        tokens = sum(json.loads(line).get("tokens", 0) for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else None
        flat = {k: v for table in cfg.values() for k, v in table.items()}
        rows.append({"number": trial.number, "state": trial.state.name.lower(), "val_nats": trial.value, "settings": {k: flat.get(k) for k in SHOWN},
                     "tokens": tokens, "run": trial.user_attrs.get("run")})  # fmt: skip
    return sorted(rows, key=lambda r: r.get("val_nats", float("inf")))


def recipe_for(corpus: str, minutes: float) -> dict[str, Any]:
    cfg = Config().with_overrides({"corpus": corpus}).resolved()
    data = prepare_data(cfg)
    probe = recipe.probe_dims(len(data.vocab))
    precision = resolve_precision("auto", torch.device("cpu"))
    speed = measure_training("cudnn", probe, "cpu", precision, steps=4, warmup=1).tokens_per_s  # as training.py's probe times it (step.timed_steps)
    chosen = recipe.choose(len(data.train), len(data.vocab), speed, minutes)
    return {"corpus_tokens": len(data.train), "vocab": len(data.vocab), "probe_tokens_per_s": speed, "recipe": chosen.__dict__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", required=True, help="NAME=CORPUS:MINUTES:TRIALS")
    parser.add_argument("--runs-dir", type=Path, default=Path("studies"))
    parser.add_argument("--tune-args", default="--model cudnn --precision auto --pruner median --startup-trials 3")
    parser.add_argument("--report-only", action="store_true", help="read the studies, run no trial")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {}
    for name, corpus, minutes, trials in map(parse, args.study):
        if not args.report_only:
            run_study(name, corpus, minutes, trials, args.runs_dir, shlex.split(args.tune_args))
        rows = read_study(name, args.runs_dir)
        report[name] = {"corpus": corpus, "minutes": minutes, "trials": rows, **recipe_for(corpus, minutes)}
        for row in rows:  # the figure TOKENS_PER_PARAMETER is fitted to: tokens seen per weight
            if row.get("tokens") and "settings" in row:
                s = row["settings"]
                row["parameters"] = num_parameters(ModelConfig(hidden=s["hidden"], layers=s["layers"], embedding=s["embedding"]), report[name]["vocab"])
                row["tokens_per_parameter"] = row["tokens"] / row["parameters"]
    for name, r in report.items():
        print(f"\n{name}: {r['corpus']}, {r['corpus_tokens']:,} training tokens, {r['vocab']} symbols, {r['minutes']:g} minutes a trial, "
              f"probe {r['probe_tokens_per_s']:,.0f} tokens/s")
        for row in r["trials"]:
            if "val_nats" in row:
                s = row["settings"]
                print(f"  #{row['number']:<3} {row['state']:9} {row['val_nats']:.4f} nats  " + "  ".join(f"{k}={s[k]}" for k in SHOWN if s.get(k) is not None)
                      + (f"  tokens={row['tokens']:,}" if row.get("tokens") else "")
                      + (f"  weights={row['parameters']:,} ({row['tokens_per_parameter']:.1f} tokens each)" if "parameters" in row else ""))  # fmt: skip
            else:
                print(f"  #{row['number']:<3} {row['state']:9} {row['params']}")
        rec = r["recipe"]
        print("  recipe: " + "  ".join(f"{k}={rec[k]}" for k in (*recipe.RECIPE_KEYS, "parameters", "tokens", "epochs")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
