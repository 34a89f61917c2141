"""The backbone file: round trip, atomic write, wrappers, and errors that name the file."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from distrib_face.models import (
    BackboneFileError,
    create_backbone,
    load_backbone,
    save_backbone,
)
from distrib_face.models.io import read_backbone_file


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained_like(name="iresnet_tiny", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs)
    with torch.no_grad():  # move every parameter and buffer off its initial value
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(torch.randn_like(tensor) * 0.01)
    return model


def test_round_trip_rebuilds_the_same_function(tmp_path):
    kwargs = {"embedding_size": 128, "input_size": 48, "dropout": 0.2}
    model = _trained_like(**kwargs).eval()
    path = save_backbone(tmp_path / "sub" / "backbone.pt", model, "iresnet_tiny", kwargs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.pt"]  # no temp file left behind

    loaded = load_backbone(path)
    assert not loaded.training
    assert type(loaded) is type(model) and loaded.fc.out_features == 128
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

    header = read_backbone_file(path)
    assert header["name"] == "iresnet_tiny" and header["kwargs"] == kwargs and header["version"] == 1


def test_file_holds_only_plain_types(tmp_path):
    path = save_backbone(tmp_path / "b.pt", _trained_like("vit_tiny", input_size=27), "vit_tiny", {"input_size": 27})
    payload = torch.load(path, weights_only=True)  # would raise on any non-allow-listed object
    assert set(payload) == {"name", "kwargs", "state_dict", "version"}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in payload["state_dict"].values())


def test_overwrite_is_atomic_replace(tmp_path):
    path = tmp_path / "b.pt"
    save_backbone(path, _trained_like(input_size=32), "iresnet_tiny", {"input_size": 32})
    second = _trained_like(input_size=32, embedding_size=64)
    save_backbone(path, second, "iresnet_tiny", {"input_size": 32, "embedding_size": 64})
    assert load_backbone(path).fc.out_features == 64
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]


def test_wrappers_are_unwrapped(tmp_path):
    model = _trained_like(input_size=32)

    class Engine(nn.Module):  # the shape of a DeepSpeed engine / DDP: the model under ``.module``
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = torch.compile(Engine(model))  # not run: only its state_dict keys ("_orig_mod.module.") matter
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.module.")
    path = save_backbone(tmp_path / "b.pt", compiled, "iresnet_tiny", {"input_size": 32})
    assert set(read_backbone_file(path)["state_dict"]) == set(model.state_dict())


def test_prefixed_state_dict_still_loads(tmp_path):
    model = _trained_like(input_size=32)
    payload = {"name": "iresnet_tiny", "kwargs": {"input_size": 32},
               "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(payload, tmp_path / "b.pt")
    loaded = load_backbone(tmp_path / "b.pt")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_unknown_name_names_the_file(tmp_path):
    path = tmp_path / "renamed.pt"
    save_backbone(path, _trained_like(input_size=32), "iresnet_tiny", {"input_size": 32})
    payload = torch.load(path, weights_only=True)
    payload["name"] = "resnet9000"
    torch.save(payload, path)
    with pytest.raises(BackboneFileError, match=r"renamed\.pt.*unknown backbone name 'resnet9000'"):
        load_backbone(path)


def test_state_dict_that_does_not_fit_names_the_file(tmp_path):
    path = tmp_path / "mismatch.pt"
    save_backbone(path, _trained_like(input_size=32), "iresnet_tiny", {"input_size": 32})
    payload = torch.load(path, weights_only=True)
    payload["kwargs"] = {"input_size": 64}  # the FC would need 128 * 4 * 4 inputs, the file has 128 * 2 * 2
    torch.save(payload, path)
    with pytest.raises(BackboneFileError, match=r"(?s)mismatch\.pt.*does not fit.*fc\.weight"):
        load_backbone(path)
    del payload["state_dict"]["features.running_mean"]
    payload["kwargs"] = {"input_size": 32}
    torch.save(payload, path)
    with pytest.raises(BackboneFileError, match=r"(?s)mismatch\.pt.*Missing key.*features\.running_mean"):
        load_backbone(path)


def test_bad_kwargs_name_the_file(tmp_path):
    path = tmp_path / "kw.pt"
    save_backbone(path, _trained_like(input_size=32), "iresnet_tiny", {"input_size": 32})
    payload = torch.load(path, weights_only=True)
    payload["kwargs"] = {"input_size": 32, "no_such_option": 1}
    torch.save(payload, path)
    with pytest.raises(BackboneFileError, match=r"kw\.pt.*do not build backbone 'iresnet_tiny'"):
        load_backbone(path)


class _Evil:
    def __reduce__(self):
        # os.getenv pickles as the global os.getenv (builtins such as print can be replaced at run time, e.g.
        # Ray swaps print for its own when imported, which would change the global the file asks for).
        return (os.getenv, ("unpickled arbitrary code",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"name": "iresnet_tiny", "kwargs": {}, "state_dict": {}, "x": _Evil()}, path)
    with pytest.raises(BackboneFileError, match=r"evil\.pt: refused to load: .*\(it asks for the global os\.getenv\); .*could run code"):
        load_backbone(path)
    whole = tmp_path / "whole_model.pt"
    torch.save(create_backbone("iresnet_tiny", input_size=32), whole)  # a pickled module, not a backbone file
    with pytest.raises(BackboneFileError, match=r"whole_model\.pt"):
        load_backbone(whole)


def test_not_a_backbone_file(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(BackboneFileError, match=r"text\.pt"):
        load_backbone(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(BackboneFileError, match=r"other\.pt: expected keys name, kwargs, state_dict"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_backbone(tmp_path / "absent.pt")


def test_save_refuses_unknown_names_and_non_plain_kwargs(tmp_path):
    model = _trained_like(input_size=32)
    with pytest.raises(ValueError, match="'nope'"):
        save_backbone(tmp_path / "b.pt", model, "nope", {})
    with pytest.raises(TypeError, match=r"kwargs\.widths"):
        save_backbone(tmp_path / "b.pt", model, "iresnet_tiny", {"widths": torch.tensor([1, 2])})
    assert not list(tmp_path.iterdir())


def test_map_location_and_channels_last_kwarg(tmp_path):
    model = _trained_like(input_size=32, channels_last=True)
    path = save_backbone(tmp_path / "b.pt", model, "iresnet_tiny", {"input_size": 32, "channels_last": True})
    loaded = load_backbone(path, map_location=torch.device("cpu"))
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded.conv1.weight.device.type == "cpu"
