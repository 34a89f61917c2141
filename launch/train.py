"""torchrun / deepspeed-launcher entry point for clusters without Ray.

    torchrun --nproc-per-node 2 launch/train.py --config configs/tiny_cpu.yaml --set train.total_steps=50
    deepspeed --num_gpus 8 launch/train.py --config configs/ms1mv3_r50_arcface.yaml

Each process is one rank: the process group comes from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The deepspeed launcher appends ``--local_rank=N``, which is
accepted and ignored (LOCAL_RANK is read from the environment). A bad config fails on every rank before
any collective, with the field and the value in the message (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate the config, train this rank; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--resume", default=None, help="checkpoint folder to continue from")
    parser.add_argument("--summary-json", default=None, help="rank 0 writes the final summary here")
    parser.add_argument("--log-level", default="INFO")
    args, unknown = parser.parse_known_args(argv)  # the deepspeed launcher appends --local_rank=N
    unknown = [a for a in unknown if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("launch.train")

    from distrib_face.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    from distrib_face.models.io import BackboneFileError
    from distrib_face.parallel import init_distributed
    from distrib_face.train import NonFiniteLossError, run_training
    from distrib_face.train.checkpoint import CheckpointError
    from distrib_face.train.divergence import NonFiniteStateError

    ctx = init_distributed(device=cfg.device)
    try:
        summary = run_training(cfg, ctx, resume_from=args.resume)
    except (NonFiniteLossError, NonFiniteStateError) as err:
        log.error("%s", err)
        return 1
    except (CheckpointError, BackboneFileError) as err:  # a refused, damaged or unfitting checkpoint / backbone
        log.error("%s", err)
        return 2
    if ctx.is_main:
        log.info("summary: %s", json.dumps(summary, default=str))
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
