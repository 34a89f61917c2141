"""The host-sync audit of the training step (distrib_face/train/step.py, docs/training.md), counted.

A CPU has no sync detector (``torch.cuda.set_sync_debug_mode`` is CUDA only), so the test counts the Python
entry points through which a device tensor reaches the host: ``item``, ``__float__``, ``__bool__``,
``__int__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``, ``nonzero`` (also ``torch.nonzero``) and
boolean-mask indexing (``x[mask]``, a hidden ``nonzero``). Each is wrapped with a counter that records
where in distrib_face or DeepSpeed it was called from, while real training steps run (DeepSpeed engine,
class-sharded classifier, shard optimizer, auxiliary losses, built by ``build_components`` and stepped by
:class:`~distrib_face.train.step.StepRunner`, world 1 on gloo). The batches are drawn before the counted
region: the loader's host tensors are not device syncs.

The claim checked (the StepRunner docstring): a non-logging step makes exactly ``grad_accum`` host reads,
each the loss's non-finite verdict in ``forward_backward``; ``finish_step`` makes none.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.test_train import _config, _quiet
from tests.spawn import run_world

_METHODS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero")


def _caller() -> str:
    """``package/path (function)`` of the innermost distrib_face / DeepSpeed frame of the stack.

    Without line numbers, so that the DeepSpeed sites named by the test survive edits around them.
    """
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        if parts[-3:-1] == ("tests", "distributed"):
            continue
        for package in ("distrib_face", "deepspeed"):
            if package in parts:
                where = "/".join(parts[len(parts) - parts[::-1].index(package) - 1:])
                return f"{where} ({frame.name})"
    return "elsewhere"


@contextmanager
def _count_syncs() -> Iterator[Counter]:
    """Count host reads of tensors (see the module docstring) by call site while the block runs."""
    import torch

    counts: Counter = Counter()
    saved: dict[str, Any] = {name: getattr(torch.Tensor, name) for name in _METHODS + ("__getitem__",)}
    saved_nonzero = torch.nonzero

    def wrap(name: str, original: Any) -> Any:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[f"{name} at {_caller()}"] += 1
            return original(self, *args, **kwargs)
        return counted

    def getitem(self: Any, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            counts[f"bool-mask indexing at {_caller()}"] += 1
        return saved["__getitem__"](self, index)

    def nonzero(*args: Any, **kwargs: Any) -> Any:
        counts[f"torch.nonzero at {_caller()}"] += 1
        return saved_nonzero(*args, **kwargs)

    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, wrap(name, saved[name]))
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = nonzero
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.nonzero = saved_nonzero


def _steps(rank: int, world_size: int, cfg_dicts: list[dict], steps: int) -> list[list[dict[str, int]]]:
    """For each config: the counted host reads of ``steps`` non-logging steps after one warm-up step."""
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train.components import build_components, seed_everything
    from distrib_face.train.schedule import set_learning_rates
    from distrib_face.train.step import StepRunner

    ctx = init_distributed(device="cpu")
    results = []
    for cfg_dict in cfg_dicts:
        cfg = Config.from_dict(cfg_dict)
        seed_everything(cfg.train.seed, deterministic=False)
        parts = build_components(cfg, ctx, tracking=False)
        set_learning_rates(parts.optimizers, parts.peaks, 1.0)
        runner = StepRunner(cfg, ctx, parts)
        batches = iter(parts.data.loader)
        per_step = []
        for step in range(1 + steps):
            drawn = [next(batches) for _ in range(cfg.optim.grad_accum)]
            with _count_syncs() as counts:
                for images, labels in drawn:
                    runner.forward_backward(images, labels)
                runner.finish_step()
            if step:  # the first step builds buffers, compiles nothing here, but is not the steady state
                per_step.append(dict(counts))
        results.append(per_step)
    return results


def _cases(tmp_path: Path) -> list[tuple[str, dict, int]]:
    """(name, config, grad_accum) of the step variants audited."""
    small = {"random_num_classes": 40, "random_num_samples": 256}
    aux = [{"name": name, "weight": 0.05} for name in ("triplet", "contrastive", "ring", "magface", "center",
                                                         "intra_angle", "inter_angle")]
    return [
        ("dense", _config(tmp_path, "dense", data=small), 1),
        ("accumulated", _config(tmp_path, "accum", data=small, optim={"grad_accum": 2}), 2),
        ("sampled, clipped", _config(tmp_path, "sampled", data=small, loss={"sample_rate": 0.5},
                                     optim={"grad_clip": 5.0}), 1),
        ("offload", _config(tmp_path, "offload", data=small, loss={"offload": "host", "sample_rate": 0.5}), 1),
        ("auxiliary", _config(tmp_path, "aux", data=small, loss={"auxiliary": aux}), 1),
        ("zero 1", _config(tmp_path, "zero1", data=small, deepspeed={"zero_stage": 1}), 1),
        ("bf16", _config(tmp_path, "bf16", data=small, deepspeed={"precision": "bf16"}), 1),
    ]


def test_counter_sees_each_kind_of_host_read():
    """The counter itself: every wrapped entry point is counted, and nothing stays wrapped after the block."""
    import torch

    x = torch.arange(4.0)
    with _count_syncs() as counts:
        x.sum().item(), float(x[0]), bool(x[1]), int(x[2]), x.tolist(), x.nonzero(), torch.nonzero(x), x[x > 1]
    kinds = sorted({key.split(" at ")[0] for key in counts})
    assert kinds == sorted(["item", "__float__", "__bool__", "__int__", "tolist", "nonzero", "torch.nonzero",
                            "bool-mask indexing"]), counts
    with _count_syncs() as after:
        pass
    x.sum().item()
    assert not after


@pytest.mark.parametrize("steps", [2])
def test_a_step_reads_the_host_once_per_micro_batch(tmp_path, steps):
    cases = _cases(tmp_path)
    results = run_world(_steps, 1, tmp_path, ([cfg for _, cfg, _ in cases], steps))[0]
    from distrib_face.models import create_backbone

    params = sum(p.requires_grad for p in create_backbone("iresnet_tiny", embedding_size=32).parameters())
    for (name, _, grad_accum), per_step in zip(cases, results):
        for counts in per_step:
            ours = {site: n for site, n in counts.items() if "deepspeed" not in site}
            deepspeed = {site: n for site, n in counts.items() if "deepspeed" in site}
            # Ours: exactly the non-finite verdicts, one per micro-batch, at one site in forward_backward.
            assert sum(ours.values()) == grad_accum, (name, counts)
            assert len(ours) == 1 and next(iter(ours)).endswith("train/step.py (forward_backward)"), (name, counts)
            if name == "zero 1":  # DeepSpeed's own: ZeRO >= 1 checks its gradient norm on the host once
                assert deepspeed == {"__bool__ at deepspeed/runtime/utils.py (is_invalid_grad_norm)": 1}, counts
            elif name == "bf16":  # ZeRO 0 bf16: DeepSpeed's FP16_Optimizer tests each parameter's gradient
                assert deepspeed["__bool__ at deepspeed/runtime/utils.py (has_overflow_serial)"] == params, counts
            else:  # fp32, ZeRO 0: DeepSpeed reads nothing
                assert not deepspeed, (name, counts)


def _aux_syncs(specs: list[dict], uploss_novel: bool = True) -> Counter:
    """Host reads of one forward and backward of ``AuxiliaryLosses(specs)`` at world 1 (no process group)."""
    import torch

    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.auxiliary import build_auxiliary_losses

    num_classes, dim = 10, 8
    clf = ShardedMarginClassifier(num_classes, dim, margin="cosface", dtype=torch.float64)
    counts = [3] * num_classes if not uploss_novel else [3, 50] * (num_classes // 2)
    aux = build_auxiliary_losses(specs, num_classes=num_classes, embedding_size=dim, dtype=torch.float64,
                                 class_counts=counts)
    embeddings = torch.randn(12, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                             requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 9])
    with _count_syncs() as counts_seen:
        total, _ = aux(embeddings, labels, classifier=clf)
        total.backward()
    return counts_seen


def test_auxiliary_losses_read_nothing_on_the_host():
    """Every auxiliary term but semi-hard triplet mining is masks and gathers: no host read, forward or backward."""
    names = ("triplet", "contrastive", "ring", "magface", "center", "intra_angle", "inter_angle", "uploss")
    assert not _aux_syncs([{"name": name, "weight": 1.0} for name in names])
    assert not _aux_syncs([{"name": "uploss", "weight": 1.0}], uploss_novel=False)  # no novel class: the 0 branch
    # Semi-hard mining keeps its one documented read: the anchor-positive pairs (nonzero).
    semi = _aux_syncs([{"name": "triplet", "weight": 1.0, "options": {"mining": "semi_hard"}}])
    assert sum(semi.values()) == 1 and "nonzero" in next(iter(semi)), semi
