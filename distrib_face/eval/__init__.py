"""Face verification, identification and IJB template evaluation; pair-set readers; ROC plots.

Main entry points::

    from distrib_face.eval import verification_metrics, embed_images, evaluate_pairset, plot_roc

Only numpy and PIL are imported here; torch and ONNX Runtime are imported when a model is used.
"""

from distrib_face.eval.embed import (
    OnnxEmbedder,
    TorchEmbedder,
    embed_images,
    evaluate_pairset,
    load_model,
    preprocess,
)
from distrib_face.eval.ijb import (
    IjbProtocol,
    embed_ijb,
    evaluate_templates,
    read_ijb_protocol,
    template_features,
)
from distrib_face.eval.metrics import (
    DEFAULT_FAR_TARGETS,
    IdentificationResult,
    RocCurve,
    VerificationResult,
    cosine_scores,
    equal_error_rate,
    feature_norm_stats,
    identification_metrics,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    verification_metrics,
    verification_metrics_from_scores,
)
from distrib_face.eval.plots import plot_cmc, plot_roc
from distrib_face.eval.readers import load_any_pairs, read_bin, read_lfw_pairs, restricted_loads, write_bin

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "IdentificationResult",
    "IjbProtocol",
    "OnnxEmbedder",
    "RocCurve",
    "TorchEmbedder",
    "VerificationResult",
    "cosine_scores",
    "embed_ijb",
    "embed_images",
    "equal_error_rate",
    "evaluate_pairset",
    "evaluate_templates",
    "feature_norm_stats",
    "identification_metrics",
    "kfold_accuracy",
    "load_any_pairs",
    "load_model",
    "plot_cmc",
    "plot_roc",
    "preprocess",
    "read_bin",
    "read_ijb_protocol",
    "read_lfw_pairs",
    "restricted_loads",
    "roc_curve",
    "tar_at_far",
    "template_features",
    "verification_metrics",
    "verification_metrics_from_scores",
    "write_bin",
]
