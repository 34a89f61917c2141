"""Preprocessing, flip TTA, and the torch / ONNX Runtime embedding paths."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.data.pairset import PairSet
from distrib_face.eval import (
    OnnxEmbedder,
    embed_images,
    evaluate_pairset,
    load_model,
    preprocess,
    verification_metrics,
)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_net(seed: int = 0, embedding_size: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 27 * 27, embedding_size),
    ).eval()


def _export(module: torch.nn.Module, path, dynamic: bool = True, batch: int = 1) -> None:
    torch.onnx.export(
        module,
        torch.zeros(batch, 3, 112, 112),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None,
        dynamo=False,
    )


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_preprocess_decodes_normalises_and_converts_grey():
    rgb = _images(1)[0]
    x = preprocess([_png(rgb)])
    np.testing.assert_allclose(x[0], (rgb.transpose(2, 0, 1).astype(np.float32) - 127.5) / 127.5)
    grey = rgb[..., 0]
    g = preprocess([_png(grey)])
    assert g.shape == (1, 3, 112, 112)
    for c in range(3):
        np.testing.assert_allclose(g[0, c], (grey.astype(np.float32) - 127.5) / 127.5)
    # arrays and bytes agree; other sizes are resized (a constant image stays constant)
    np.testing.assert_allclose(preprocess(rgb[None]), x)
    small = preprocess([_png(np.full((50, 40), 255, np.uint8))])
    assert small.shape == (1, 3, 112, 112) and np.allclose(small, 1.0)


def test_preprocess_names_undecodable_image():
    with pytest.raises(ValueError, match="image 1: cannot decode 5 bytes"):
        preprocess([_png(_images(1)[0]), b"junk!"])


def test_flip_tta_is_sum_of_image_and_mirror():
    net = _tiny_net()
    images = _images(5)
    x = torch.from_numpy((images.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        reference = (net(x) + net(torch.flip(x, dims=[3]))).numpy()
        plain = net(x).numpy()
    np.testing.assert_allclose(embed_images(net, images, batch_size=2, flip=True), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed_images(net, images, batch_size=3, flip=False), plain, rtol=1e-5, atol=1e-5)


def test_torch_module_mode_is_restored():
    net = _tiny_net().train()
    embed_images(net, _images(2), flip=False)
    assert net.training


def test_onnx_matches_torch(tmp_path):
    net = _tiny_net(1)
    _export(net, tmp_path / "m.onnx")
    images = [_png(a) for a in _images(7, seed=1)]
    from_onnx = embed_images(str(tmp_path / "m.onnx"), images, batch_size=4)
    from_torch = embed_images(net, images, batch_size=4)
    np.testing.assert_allclose(from_onnx, from_torch, rtol=1e-4, atol=1e-4)
    # a static-batch export still takes any number of images
    _export(net, tmp_path / "static.onnx", dynamic=False, batch=3)
    model = load_model(tmp_path / "static.onnx")
    assert isinstance(model, OnnxEmbedder) and model.fixed_batch == 3
    np.testing.assert_allclose(embed_images(model, images, batch_size=4), from_torch, rtol=1e-4, atol=1e-4)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="must hold backbone.pt"):
        load_model(tmp_path)
    (tmp_path / "latest").write_text("step_000000009\n")
    with pytest.raises(FileNotFoundError, match="step_000000009, which holds no backbone.pt"):
        load_model(tmp_path)
    (tmp_path / "latest").unlink()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="manifest.json: not a backbone file"):
        load_model(tmp_path / "manifest.json")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="broken.onnx: cannot load ONNX model"):
        load_model(tmp_path / "broken.onnx")


def test_backbone_checkpoint_folder(tmp_path):
    models = pytest.importorskip("distrib_face.models")
    if "mobilefacenet_tiny" not in models.list_backbones():
        pytest.skip("mobilefacenet_tiny backbone not registered")
    kwargs = {"embedding_size": 32, "input_size": 112}
    net = models.create_backbone("mobilefacenet_tiny", **kwargs).eval()
    models.save_backbone(tmp_path / "ckpt" / "backbone.pt", net, "mobilefacenet_tiny", kwargs)
    images = _images(3, seed=2)
    np.testing.assert_allclose(
        embed_images(load_model(tmp_path / "ckpt"), images), embed_images(net, images), rtol=1e-5, atol=1e-5
    )
    # a checkpoints folder (or a run folder holding one) whose `latest` names the checkpoint
    models.save_backbone(tmp_path / "run" / "checkpoints" / "step_2" / "backbone.pt", net, "mobilefacenet_tiny", kwargs)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_2\n")
    for folder in (tmp_path / "run" / "checkpoints", tmp_path / "run"):
        np.testing.assert_allclose(embed_images(load_model(folder), images), embed_images(net, images),
                                   rtol=1e-5, atol=1e-5)


def test_evaluate_pairset_equals_metrics_on_embeddings():
    net = _tiny_net(2)
    rng = np.random.default_rng(3)
    images = _images(40, seed=3)
    pairs = PairSet("toy", [_png(a) for a in images], rng.random(20) < 0.5, folds=np.arange(20) % 4)
    result = evaluate_pairset(net, pairs, batch_size=16)
    emb = embed_images(net, images)
    reference = verification_metrics(emb[0::2], emb[1::2], pairs.issame, folds=pairs.folds)
    assert result.name == "toy" and len(result.fold_accuracies) == 4
    assert result.accuracy == pytest.approx(reference.accuracy)
    assert result.auc == pytest.approx(reference.auc)
