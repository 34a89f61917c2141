"""distrib_face: distributed face-recognition training with a class-sharded margin-softmax classifier."""

__version__ = "0.1.0"
