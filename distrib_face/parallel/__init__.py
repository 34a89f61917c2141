"""The only package that imports torch.distributed: process context, collectives with autograd, the
class-sharded classifier and its optimizer, shard arithmetic, checkpoints and resharding."""

from distrib_face.parallel.classifier import ShardedMarginClassifier
from distrib_face.parallel.context import ProcessContext, barrier, init_distributed

__all__ = ["ProcessContext", "ShardedMarginClassifier", "barrier", "init_distributed"]
