"""train.components: the config's loss section becomes the classifier the trainer runs."""

from __future__ import annotations

import torch

from distrib_face.config import Config
from distrib_face.parallel import ProcessContext
from distrib_face.train.components import build_classifier, classifier_kwargs

BASE = {"data": {"source": "random"}, "train": {"total_steps": 10, "seed": 4}, "model": {"embedding_size": 16}}


def _cfg(**loss) -> Config:
    return Config.from_dict({**BASE, "loss": {"margin": "cosface", "scale": 30.0, **loss}})


def test_defaults_build_what_the_current_trainer_builds():
    from distrib_face.train.components import build_classifier as loop_build

    cfg, ctx = _cfg(sample_rate=0.5), ProcessContext()
    clf, opt = build_classifier(cfg, 40, ctx)
    ref, ref_opt = loop_build(cfg, 40, ctx)
    assert torch.equal(clf.weight, ref.weight) and clf.weight.dtype == torch.float32
    assert (clf.sample_rate, clf.margin.spec, clf.embedding_grad_scale) == (ref.sample_rate, ref.margin.spec, 1.0)
    assert clf.equal_batches and clf.offload == "none" and (clf.kernel, clf.grad_filter) == (ref.kernel, ref.grad_filter)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] and opt.name == ref_opt.name


def test_bf16_storage_and_host_offload_come_from_the_loss_section():
    cfg = _cfg(weight_dtype="bf16", offload="host", sample_rate=0.1, chunk_size=64, compute_dtype="bf16")
    kwargs = classifier_kwargs(cfg, ProcessContext(), equal_batches=False)
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["offload"] == "host" and kwargs["chunk_size"] == 64
    assert kwargs["compute_dtype"] == torch.bfloat16 and kwargs["equal_batches"] is False
    clf, opt = build_classifier(cfg, 100, ProcessContext())
    assert clf.weight.dtype == torch.bfloat16 and clf.storage_device == torch.device("cpu")
    assert opt.buffers["momentum_buffer"].dtype == torch.bfloat16
    loss = clf(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
