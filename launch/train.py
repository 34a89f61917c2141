"""torchrun / deepspeed-launcher entry point for clusters without Ray: ``distrib-face train``, one rank each.

    torchrun --nproc-per-node 2 launch/train.py --config configs/tiny_cpu.yaml --set train.total_steps=50
    deepspeed --num_gpus 8 launch/train.py --config configs/ms1mv3_r50_arcface.yaml

Each process is one rank: the process group comes from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The deepspeed launcher appends ``--local_rank=N``, which is
accepted and ignored (LOCAL_RANK is read from the environment). Everything else is
``distrib_face.cli.train.train_command``: the same checks, training, summary, one-line errors and exit codes
(0 finished, 1 training failed, 2 bad config or input) as ``distrib-face train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run :func:`distrib_face.cli.train.train_command`; returns the exit code."""
    from distrib_face.cli import configure_logging
    from distrib_face.cli.train import add_train_arguments, train_command

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG adds tracebacks to errors)")
    args, unknown = parser.parse_known_args(argv)  # the deepspeed launcher appends --local_rank=N
    unknown = [a for a in unknown if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.log_level)
    return train_command(args, prog="launch/train.py")


if __name__ == "__main__":
    sys.exit(main())
