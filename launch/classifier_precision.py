"""The accuracy effect of bf16 class weights: the same training run with fp32, bf16 + stochastic rounding and
bf16 + round-to-nearest storage, compared by loss trajectory and held-out verification.

    python launch/classifier_precision.py synth --out /tmp/prec        # distrib-face synth data, 1 CPU rank
    python launch/classifier_precision.py faces --out /tmp/prec        # ORL + Extended Yale B (../shared/data)

Each variant trains from the same seed with the real trainer (``run_training``: DeepSpeed engine, DALI CPU
decoding, the class-sharded classifier) on one CPU rank; only the classifier's storage dtype and rounding
differ. Prints a Markdown table (docs/classifier.md, "bf16 storage: accuracy"). The faces set follows
tests/integration/test_real_faces.py (train on Yale B + ORL s1-s30, verify on ORL s31-s40).

The storage dtype is the config's ``loss.weight_dtype``; the rounding of the bf16 write-back (stochastic, the
default, or round-to-nearest) is not a config field, so this script swaps the trainer's ``build_classifier``
for one that passes ``rounding`` to the shard optimizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

VARIANTS = {"fp32": ("fp32", "stochastic"), "bf16 stochastic": ("bf16", "stochastic"),
            "bf16 nearest": ("bf16", "nearest")}


def _build_with(rounding: str):
    def build(cfg: Any, num_classes: int, ctx: Any) -> tuple[Any, Any]:
        from distrib_face.parallel import ShardedMarginClassifier
        from distrib_face.parallel.optim import ShardOptimizer
        from distrib_face.train.components import classifier_kwargs

        clf = ShardedMarginClassifier(num_classes, **classifier_kwargs(cfg, ctx))
        opt = ShardOptimizer(clf, name=cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                             weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas, rounding=rounding)
        return clf, opt
    return build


def _run(cfg_dict: dict, weight_dtype: str, rounding: str, out: Path, seed: int) -> dict:
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import components, run_training

    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict["loss"]["weight_dtype"] = weight_dtype
    cfg_dict["train"]["output_dir"] = str(out)
    cfg_dict["train"]["seed"] = seed
    components.build_classifier = _build_with(rounding)
    summary = run_training(Config.from_dict(cfg_dict), init_distributed(device="cpu"))
    trainer = json.loads((Path(summary["checkpoint"]) / "trainer.json").read_text())
    return {"summary": summary, "loss_history": trainer["loss_history"]}


def _synth_config(out: Path, steps: int) -> dict:
    from distrib_face.data.synthetic import write_synthetic

    data = out / "synth"
    if not (data / "manifest.json").exists():
        write_synthetic(data, num_identities=1000, image_size=32, holdout_identities=100, num_pairs=1000,
                        min_images=4, max_images=40)
    return {
        "data": {"source": "shards", "shards": str(data), "decoder": "dali", "image_size": 32, "batch_size": 64,
                 "num_workers": 0, "dali_threads": 1},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 64},
        "loss": {"margin": "cosface", "scale": 32.0, "additive_margin": 0.3},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"kind": "poly", "warmup_steps": 20},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": steps, "log_every": max(1, steps // 10), "eval_every": 0,
                  "eval_pairsets": [str(data / "holdout_pairs.npz")], "eval_at_start": True,
                  "export_onnx": False, "resume": "never", "seed": 0},
        "tracking": {"enabled": False},
        "device": "cpu",
    }


def _faces_config(out: Path, steps: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from distrib_face.data.pack import pack
    from tests.integration.test_real_faces import _holdout_pairs, _train_tree

    shared = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data"
    for candidate in (shared, Path("/work/shared/data")):
        if (candidate / "orl_faces").is_dir():
            shared = candidate
            break
    else:
        raise SystemExit(f"no ORL / Extended Yale B under {shared} or /work/shared/data")
    shards = out / "faces_shards"
    if not (shards / "manifest.json").exists():
        pack(_train_tree(shared, out), shards, image_size=64, workers=1, progress=False)
    pairs = out / "orl_holdout.npz"
    if not pairs.exists():
        _holdout_pairs(shared, pairs)
    return {
        "data": {"source": "shards", "shards": str(shards), "decoder": "dali", "image_size": 64, "batch_size": 32,
                 "num_workers": 0, "dali_threads": 1},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 64},
        "loss": {"margin": "cosface", "scale": 32.0, "additive_margin": 0.2},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"kind": "poly", "warmup_steps": 10},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"total_steps": steps, "log_every": max(1, steps // 8), "eval_every": 0,
                  "eval_pairsets": [str(pairs)], "eval_at_start": True, "export_onnx": False, "resume": "never",
                  "seed": 0},
        "tracking": {"enabled": False},
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["synth", "faces"])
    parser.add_argument("--out", required=True, help="work folder (data and runs)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (synth 600, faces 400)")
    parser.add_argument("--seeds", default="0", help="comma list of training seeds (each variant runs each)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (600 if args.dataset == "synth" else 400)
    cfg = _synth_config(out, steps) if args.dataset == "synth" else _faces_config(out, steps)
    seeds = [int(v) for v in args.seeds.split(",")]
    results = {}
    for seed in seeds:
        for name, (dtype, rounding) in VARIANTS.items():
            run_dir = out / f"run_{args.dataset}_{name.replace(' ', '_')}_seed{seed}"
            results[f"{name} / seed {seed}"] = _run(cfg, dtype, rounding, run_dir, seed)
    (out / f"precision_{args.dataset}.json").write_text(json.dumps(results, indent=1, default=str))
    history = {name: dict((int(s), l) for s, l in r["loss_history"]) for name, r in results.items()}
    marks = sorted(next(iter(history.values())))
    print(f"| {args.dataset}: variant | " + " | ".join(f"loss @{s}" for s in marks)
          + " | verification before | after |")
    print("|---|" + "---|" * (len(marks) + 2))
    for name, r in results.items():
        before = next(iter(r["summary"]["verification_before"].values()))
        after = next(iter(r["summary"]["verification_after"].values()))
        print(f"| {name} | " + " | ".join(f"{history[name].get(s, float('nan')):.3f}" for s in marks)
              + f" | {before:.4f} | {after:.4f} |")
    for name in VARIANTS:
        finals = [history[f"{name} / seed {s}"][marks[-1]] for s in seeds]
        afters = [next(iter(results[f"{name} / seed {s}"]["summary"]["verification_after"].values())) for s in seeds]
        print(f"| {name}, mean over {len(seeds)} seed(s) | final loss {sum(finals) / len(finals):.3f} | "
              f"verification {sum(afters) / len(afters):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
