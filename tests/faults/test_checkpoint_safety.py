"""Checkpoints are safe to load and only ever hold a finite state.

- Poisoned checkpoints: every ``.pt`` of a real checkpoint (written by the real trainer) is replaced by a
  pickle whose ``__reduce__`` would create a marker file; every entry point that reads checkpoints refuses
  it with the file named, and the marker never appears.
- A non-finite state (NaN on one rank only) is never published: every rank raises the same
  NonFiniteStateError naming the tensor and the rank, ``latest`` keeps naming the last good checkpoint.
- A live, already-trained engine / classifier / optimiser set reloads a checkpoint exactly: training on
  from the reloaded state repeats the original continuation bit for bit (ZeRO 0, 1, 2; fp32 and bf16),
  which is what ``train.on_divergence: rollback`` relies on.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.spawn import run_world

NUM_CLASSES, DIM, IMAGE, BATCH = 12, 16, 32, 4


class Exploit:
    """Pickles to ``os.system("touch MARKER")``: an unrestricted unpickler runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(path: Path, marker: Path, zip_format: bool = True) -> None:
    """Replace ``path`` by a pickle that would create ``marker`` (torch's zip format or a raw pickle)."""
    if zip_format:
        torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Exploit(marker)))


def _quiet() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _components(ctx, zero_stage: int, precision: str, seed: int = 0, auxiliary: bool = True):
    """A DeepSpeed engine (iresnet_tiny), a Partial-FC class shard with its optimiser and a centre loss, built
    as the trainer builds them (distrib_face.train.engine, parallel, losses), without the training loop."""
    from distrib_face.config import Config
    from distrib_face.losses.auxiliary import build_auxiliary_losses
    from distrib_face.losses.margins import create_margin
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer
    from distrib_face.train.engine import build_backbone, build_engine

    cfg = Config.from_dict({
        "data": {"source": "random", "image_size": IMAGE, "batch_size": BATCH},
        "model": {"backbone": "iresnet_tiny", "embedding_size": DIM},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "train": {"total_steps": 1},
    })
    torch.manual_seed(seed)
    bundle = build_engine(cfg, build_backbone(cfg), 0.05, ctx.device, ctx.world_size)
    classifier = ShardedMarginClassifier(
        NUM_CLASSES, DIM, margin=create_margin("cosface", scale=16.0, additive_margin=0.2), sample_rate=0.5,
        group=ctx.group, device=ctx.device, seed=seed, embedding_grad_scale=float(ctx.world_size))
    shard_optimizer = ShardOptimizer(classifier, name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    aux = aux_optimizer = None
    if auxiliary:
        aux = build_auxiliary_losses([{"name": "center", "weight": 0.1}], num_classes=NUM_CLASSES,
                                     embedding_size=DIM, group=ctx.group, device=ctx.device,
                                     embedding_grad_scale=float(ctx.world_size), seed=seed)
        aux_optimizer = torch.optim.SGD([p for p in aux.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    return bundle, classifier, shard_optimizer, aux, aux_optimizer


def _batch(step: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(dtype), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def _train(steps: range, ctx, bundle, classifier, shard_optimizer, aux, aux_optimizer) -> list[float]:
    """The trainer's step written out: engine forward, class shard + centre loss, engine backward / step, shard step."""
    engine, losses = bundle.engine, []
    for step in steps:
        images, labels = _batch(step, ctx.rank, bundle.input_dtype)
        embeddings = engine(images).float()
        loss = classifier(embeddings, labels)
        if aux is not None:
            loss = loss + aux(embeddings, labels, classifier=classifier)[0]
        engine.backward(loss)
        engine.step()
        shard_optimizer.step()
        shard_optimizer.zero_grad()
        if aux_optimizer is not None:
            aux_optimizer.step()
            aux_optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _state(bundle, classifier, shard_optimizer, aux) -> dict[str, torch.Tensor]:
    """Everything that shapes the next steps, as CPU copies: module, optimiser (through our plain capture), shard, centres."""
    from distrib_face.train import engine_state

    snapshot = engine_state.capture(bundle.engine, 0, bundle.engine.dp_world_size)
    out = {name: t.detach().float().cpu().clone() for name, t in snapshot.named_tensors()}
    out.update({f"classifier {k}": v.detach().float().cpu().clone() for k, v in classifier.state_dict().items()})
    out.update({f"shard optimizer {k}": v.detach().float().cpu().clone()
                for k, v in shard_optimizer.state_dict()["buffers"].items()})
    if aux is not None:
        out.update({f"aux {k}": v.detach().float().cpu().clone() for k, v in aux.state_dict().items()})
    return out


def _save(root: Path, step: int, ctx, bundle, classifier, shard_optimizer, aux, aux_optimizer) -> Path:
    from distrib_face.train.checkpoint import TrainerState, save_checkpoint

    return save_checkpoint(
        root, ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
        trainer_state=TrainerState(step=step, world_size=ctx.world_size), loader_state=None, config={},
        ds_config=bundle.ds_config, backbone_file=None, auxiliary=(aux, aux_optimizer))


def _live_reload_worker(rank: int, world_size: int, root: str, configs: list) -> dict:
    _quiet()
    from distrib_face.parallel import init_distributed
    from distrib_face.train.checkpoint import load_checkpoint

    ctx = init_distributed(device="cpu")
    out = {}
    for zero_stage, precision in configs:
        key = f"zero{zero_stage}-{precision}"
        parts = _components(ctx, zero_stage, precision)
        _train(range(0, 2), ctx, *parts)
        ckpt = _save(Path(root) / key, 2, ctx, *parts)
        at_checkpoint = _state(*parts[:3], parts[3])
        continued = _train(range(2, 4), ctx, *parts)
        after = _state(*parts[:3], parts[3])
        bundle, classifier, shard_optimizer, aux, aux_optimizer = parts
        load_checkpoint(ckpt, ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
                        auxiliary=(aux, aux_optimizer))
        reloaded = _state(*parts[:3], parts[3])
        again = _train(range(2, 4), ctx, *parts)
        out[key] = {
            "continued": continued, "again": again,
            "reload_differs": sorted(n for n in at_checkpoint if not torch.equal(at_checkpoint[n], reloaded[n])),
            "end_differs": sorted(n for n in after if not torch.equal(after[n], _state(*parts[:3], parts[3])[n])),
            "moved": sorted(n for n in after if not torch.equal(after[n], at_checkpoint[n])),
        }
    return out


CONFIGS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]


def test_a_live_engine_reloads_a_checkpoint_exactly(tmp_path):
    results = run_world(_live_reload_worker, 2, tmp_path, (str(tmp_path / "ckpt"), CONFIGS))
    for rank, out in enumerate(results):
        for key, r in out.items():
            # The reference is the run itself: the two steps after the checkpoint, taken first without a reload.
            assert r["again"] == r["continued"], (rank, key, r["continued"], r["again"])
            assert r["reload_differs"] == [], (rank, key)
            assert r["end_differs"] == [], (rank, key)
            # The check has teeth: the continuation moved the weights, the momentum and the centres.
            assert any("optimizer" in n for n in r["moved"]) and any(n.startswith("classifier") for n in r["moved"]), key
            assert any(n.startswith("aux") for n in r["moved"]) and any(n.startswith("backbone conv") or
                                                                        n.startswith("backbone layer") for n in r["moved"]), key
