"""Config validation, YAML loading and overrides; every preset in configs/ loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib_face.config import Config, ConfigError, apply_overrides, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = {"data": {"source": "random"}, "train": {"total_steps": 10}}


def _with(section: str, **values) -> dict:
    out = {k: dict(v) for k, v in BASE.items()}
    out.setdefault(section, {}).update(values)
    return out


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("optim", {"lr": -1.0}, "optim.lr must be > 0, got -1.0"),
        ("optim", {"lr": "fast"}, "optim.lr must be a number, got 'fast'"),
        ("optim", {"name": "lamb"}, "optim.name must be one of ['sgd', 'adamw'], got 'lamb'"),
        ("optim", {"grad_accum": 0}, "optim.grad_accum must be > 0, got 0"),
        ("loss", {"sample_rate": 0.0}, "loss.sample_rate must be in (0, 1], got 0.0"),
        ("loss", {"sample_rate": 1.5}, "loss.sample_rate must be in (0, 1], got 1.5"),
        ("loss", {"margin": "triplet"}, "loss.margin must be one of"),
        ("loss", {"weight_dtype": "fp16"}, "loss.weight_dtype must be one of ['fp32', 'bf16'], got 'fp16'"),
        ("loss", {"offload": "disk"}, "loss.offload must be one of ['none', 'host'], got 'disk'"),
        ("loss", {"offload": "host", "auxiliary": [{"name": "uploss", "weight": 1.0}]},
         "loss.offload must be 'none' with the auxiliary loss 'uploss'"),
        ("deepspeed", {"zero_stage": 4}, "deepspeed.zero_stage must be one of 0, 1, 2, 3, got 4"),
        ("deepspeed", {"precision": "fp8"}, "deepspeed.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'"),
        ("data", {"batch_size": 0}, "data.batch_size must be > 0, got 0"),
        ("data", {"image_size": 8}, "data.image_size must be in [16, 1024], got 8"),
        ("data", {"rebalance": "log"}, "data.rebalance must be 'sqrt' or 'repeat_factor' or null, got 'log'"),
        ("schedule", {"kind": "steps"}, "schedule.milestones (or schedule.milestone_epochs) must be set"),
        ("schedule", {"milestones": [5, 3]}, "schedule.milestones must be positive and increasing, got [5, 3]"),
        ("train", {"max_bad_steps": 0}, "train.max_bad_steps must be > 0, got 0"),
        ("ray", {"num_workers": 0}, "ray.num_workers must be > 0, got 0"),
    ],
)
def test_bad_values_name_the_field_and_the_value(section, values, message):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(_with(section, **values))
    assert message in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"deepspeed.precision must be 'fp32' or 'bf16' with device 'cpu', got 'fp16'.*"
                                          r"not supported on your device"):
        Config.from_dict(_with("deepspeed", precision="fp16"))
    ok = Config.from_dict({**_with("deepspeed", precision="fp16"), "device": "cuda"})
    assert ok.deepspeed.precision == "fp16"
    with pytest.raises(ConfigError, match="deepspeed.zero_stage must be 0, 1 or 2 for training, got 3"):
        Config.from_dict(_with("deepspeed", zero_stage=3))
    with pytest.raises(ConfigError, match="optim.grad_accum must be 1 when loss.sample_rate < 1, got 2"):
        Config.from_dict({**_with("optim", grad_accum=2), "loss": {"sample_rate": 0.5}})
    with pytest.raises(ConfigError, match="exactly one of train.total_steps and train.epochs"):
        Config.from_dict(_with("train", epochs=2.0))
    with pytest.raises(ConfigError, match="data.shards must name a shard folder"):
        Config.from_dict({"data": {}, "train": {"total_steps": 1}})
    with pytest.raises(ConfigError, match="deepspeed.extra.optimizer is not allowed"):
        Config.from_dict(_with("deepspeed", extra={"optimizer": {"type": "Adam"}}))


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'"):
        Config.from_dict(_with("optim", lrr=0.1))
    with pytest.raises(ConfigError, match=r"unknown config section 'optimiser'"):
        Config.from_dict({**BASE, "optimiser": {}})


def test_round_trip_and_int_to_float():
    cfg = Config.from_dict(_with("optim", lr=1, betas=[0.8, 0.9]))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.8, 0.9)
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_overrides_parse_yaml_scalars():
    assert parse_override("optim.lr=0.05") == (["optim", "lr"], 0.05)
    assert parse_override("train.eval_pairsets=[a.npz, b.npz]") == (["train", "eval_pairsets"], ["a.npz", "b.npz"])
    assert parse_override("tracking.run_name=null") == (["tracking", "run_name"], None)
    assert parse_override("model.channels_last=true") == (["model", "channels_last"], True)
    with pytest.raises(ConfigError, match="override must look like section.key=value, got 'optim.lr'"):
        parse_override("optim.lr")
    data = apply_overrides(BASE, ["model.kwargs.widths=[8, 8, 16, 16]"])
    assert data["model"] == {"kwargs": {"widths": [8, 8, 16, 16]}}


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: random}\ntrain: {total_steps: 5}\noptim: {lr: 0.2}\n")
    cfg = load_config(path, ["optim.lr=0.05", "train.total_steps=7"])
    assert cfg.optim.lr == 0.05 and cfg.train.total_steps == 7
    with pytest.raises(ConfigError, match=r"c.yaml: optim.lr must be > 0, got -0.5"):
        load_config(path, ["optim.lr=-0.5"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(path, []).to_yaml().startswith("data:")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.output_dir


def test_preset_contents():
    wf = load_config(CONFIGS / "webface42m_r100_pfc02.yaml")
    assert (wf.loss.margin, wf.loss.sample_rate, wf.model.backbone) == ("cosface", 0.2, "iresnet100")
    tiny = load_config(CONFIGS / "tiny_cpu.yaml")
    assert tiny.device == "cpu" and tiny.ray.num_workers == 2 and tiny.data.decoder == "dali"
