"""A ZeRO-1 engine on 2 gloo ranks: DeepSpeed's untested-optimizer notice and torch's deprecation warning for the
collective DeepSpeed calls are heard without :func:`quiet_known_notices` and silenced with it."""

from __future__ import annotations

import logging
import warnings

from tests.spawn import run_world


def _engine_step(cfg, quiet: bool) -> tuple[list[str], list[str]]:
    import torch

    from distrib_face.train import engine as engine_module

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(handler)
    saved_quiet = engine_module.quiet_known_notices
    if not quiet:
        engine_module.quiet_known_notices = lambda: None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            backbone = engine_module.build_backbone(cfg)
            bundle = engine_module.build_engine(cfg, backbone, 0.1, torch.device("cpu"), 2)
            out = bundle.engine(torch.randn(4, 3, 32, 32))
            bundle.engine.backward(out.pow(2).mean())
            bundle.engine.step()  # ZeRO-1 all-gathers the updated parameter partitions here
    finally:
        engine_module.quiet_known_notices = saved_quiet
        ds_logger.removeHandler(handler)
    return records, [str(w.message) for w in caught]


def _worker(rank: int, world_size: int) -> dict:
    from distrib_face.config import Config

    cfg = Config.from_dict({
        "data": {"source": "random", "image_size": 32, "batch_size": 4},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 8},
        "optim": {"name": "sgd", "lr": 0.1},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "train": {"total_steps": 1},
    })
    loud = _engine_step(cfg, quiet=False)
    warnings.resetwarnings()
    quiet = _engine_step(cfg, quiet=True)
    return {"loud": loud, "quiet": quiet}


def _count(messages: list[str], needle: str) -> int:
    return sum(needle in m for m in messages)


def test_known_notices_are_silenced(tmp_path):
    for rank, out in enumerate(run_world(_worker, 2, tmp_path)):
        (loud_logs, loud_warnings), (quiet_logs, quiet_warnings) = out["loud"], out["quiet"]
        if rank == 0:  # the precondition: DeepSpeed does say it (on global rank 0 only)
            assert _count(loud_logs, "untested optimizer") == 1
        assert _count(loud_warnings, "all_gather_into_tensor` is deprecated") >= 1
        assert _count(quiet_logs, "untested optimizer") == 0
        assert _count(quiet_warnings, "is deprecated") == 0, quiet_warnings
