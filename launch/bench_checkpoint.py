"""Benchmark: the backbone engine's checkpoint, DeepSpeed's own save/load_checkpoint against
``distrib_face.train.engine_state`` (the format that loads without unpickling), and the finiteness check.

    python launch/bench_checkpoint.py iresnet50 1 fp32     # backbone, ZeRO stage, precision; world 1, CPU

Both saves are followed by the ``fsync_tree`` that ``save_checkpoint`` runs on the whole folder before it
publishes it, so the times compare what a checkpoint really costs. Prints the best of 5.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str]) -> int:
    """Run the benchmark for ``argv = [backbone, zero_stage, precision]``."""
    import torch

    from distrib_face.atomic import fsync_tree
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import engine_state
    from distrib_face.train.divergence import find_non_finite
    from distrib_face.train.engine import build_backbone, build_engine

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    backbone, zero, precision = argv[0], int(argv[1]), argv[2]
    cfg = Config.from_dict({"data": {"source": "random", "image_size": 112, "batch_size": 4},
                            "model": {"backbone": backbone}, "deepspeed": {"zero_stage": zero, "precision": precision},
                            "train": {"total_steps": 1}})
    ctx = init_distributed(device="cpu")
    bundle = build_engine(cfg, build_backbone(cfg), 0.1, ctx.device, 1)
    engine = bundle.engine
    loss = engine(torch.randn(4, 3, 112, 112, dtype=bundle.input_dtype)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()  # creates the momentum
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    rows = []
    try:
        for rep in range(5):
            start = time.perf_counter()
            engine.save_checkpoint(str(root / f"ds{rep}"), tag="engine", save_latest=False)
            fsync_tree(root / f"ds{rep}")
            ds_save = time.perf_counter() - start
            start = time.perf_counter()
            snapshot = engine_state.capture(engine, 0, 1)
            engine_state.save(root / f"ours{rep}", snapshot)
            fsync_tree(root / f"ours{rep}")
            our_save = time.perf_counter() - start
            start = time.perf_counter()
            assert find_non_finite(snapshot.named_tensors(), ctx) == {}
            check = time.perf_counter() - start
            start = time.perf_counter()
            engine.load_checkpoint(str(root / f"ds{rep}"), tag="engine", load_lr_scheduler_states=False)
            ds_load = time.perf_counter() - start
            start = time.perf_counter()
            engine_state.load(root / f"ours{rep}", engine, 0, 1)
            our_load = time.perf_counter() - start
            rows.append((ds_save, our_save, check, ds_load, our_load))
        best = [min(row[i] for row in rows) for i in range(5)]
        params = sum(p.numel() for p in engine.module.parameters())
        print(f"{backbone} ({params / 1e6:.1f}M params), ZeRO {zero}, {precision}, world 1, CPU; best of 5, seconds")
        print(f"  save: DeepSpeed {best[0]:.2f}, engine_state {best[1]:.2f}; finite check {best[2]:.3f}")
        print(f"  load: DeepSpeed {best[3]:.2f}, engine_state {best[4]:.2f}")
        print(f"  size: DeepSpeed {_size_mib(root / 'ds0'):.1f} MiB, engine_state {_size_mib(root / 'ours0'):.1f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
