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
        ("loss", {"kernel": "cuda"}, "loss.kernel must be one of ['auto', 'torch', 'triton'], got 'cuda'"),
        ("loss", {"grad_filter": 1.5}, "loss.grad_filter must be 'auto', a probability in [0, 1) or null, got 1.5"),
        ("loss", {"grad_filter": "on"}, "loss.grad_filter must be"),
        ("loss", {"kernel": "torch", "grad_filter": "auto"}, "loss.grad_filter filters the fused triton backward"),
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


def test_kernel_choice_defaults_and_round_trips():
    cfg = Config.from_dict(BASE)
    assert (cfg.loss.kernel, cfg.loss.grad_filter) == ("auto", None)
    cfg = Config.from_dict(_with("loss", kernel="triton", grad_filter="auto"))
    assert Config.from_dict(cfg.to_dict()).loss.grad_filter == "auto"
    assert Config.from_dict(_with("loss", grad_filter=0)).loss.grad_filter == 0.0


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


# ---------------------------------------------------------------- non-finite numbers anywhere


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with("optim", lr=float("inf")), "optim.lr must be a finite number, got inf"),
        (_with("loss", scale=float("inf")), "loss.scale must be a finite number, got inf"),
        (_with("optim", momentum=float("nan")), "optim.momentum must be a finite number, got nan"),
        (_with("optim", betas=[0.9, float("nan")]), "optim.betas[1] must be a finite number, got nan"),
        (_with("loss", options={"interclass_filtering_threshold": float("nan")}),
         "loss.options.interclass_filtering_threshold must be a finite number, got nan"),
        (_with("loss", auxiliary=[{"name": "center", "weight": float("inf")}]),
         "loss.auxiliary[0].weight must be a finite number, got inf"),
        (_with("deepspeed", extra={"zero_optimization": {"reduce_bucket_size": float("-inf")}}),
         "deepspeed.extra.zero_optimization.reduce_bucket_size must be a finite number, got -inf"),
        (_with("schedule", kind="steps", milestone_epochs=[1.0, float("inf")]),
         "schedule.milestone_epochs[1] must be a finite number, got inf"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere(data, message):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(data)
    assert message in str(err.value)


def test_non_finite_numbers_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: random}\ntrain: {total_steps: 5}\nloss: {scale: .inf}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: loss.scale must be a finite number, got inf"):
        load_config(path)
    path.write_text("data: {source: random}\ntrain: {total_steps: 5}\n")
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number, got nan"):
        load_config(path, ["optim.lr=.nan"])


def test_non_finite_numbers_are_refused_in_directly_built_sections():
    from distrib_face.config import DataConfig, OptimConfig, TrainConfig

    # +inf passes "lr > 0"; the whole-config check still catches it when sections are built by hand.
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number, got inf"):
        Config(data=DataConfig(source="random"), optim=OptimConfig(lr=float("inf")), train=TrainConfig(total_steps=1))


# ---------------------------------------------------------------- everything checked before any worker starts


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with("model", backbone="resnet50"), "model.backbone must be a registered backbone (iresnet100, "),
        (_with("model", backbone="iresnet_tiny", kwargs={"width": [8, 8, 8, 8]}),
         "model.kwargs.width is not an option of backbone 'iresnet_tiny', got [8, 8, 8, 8] "
         "(accepted: gradient_checkpointing, input_size, widths)"),
        (_with("model", backbone="vit_tiny", kwargs={"heads": 2}),
         "model.kwargs.heads is not an option of backbone 'vit_tiny', got 2 (accepted: depth, dim, drop_path_rate, "
         "gradient_checkpointing, input_size, mask_ratio, mlp_ratio, num_heads, patch_size)"),
        (_with("model", kwargs={"embedding_size": 128}),
         "model.kwargs.embedding_size is set by model.embedding_size, got 128"),
        (_with("model", backbone="mbf", gradient_checkpointing=True),
         "model.gradient_checkpointing is not supported by backbone 'mbf', got True"),
        (_with("loss", margin="arcface", options={"easy": True}),
         "loss.options {'easy': True} (loss.margin 'arcface'): margin 'arcface': unknown options ['easy']; known: "
         "['easy_margin', 'fallback', 'interclass_filtering_threshold']"),
        (_with("loss", margin="cosface", options={"interclass_filtering_threshold": 1.5}),
         "interclass_filtering_threshold must be in [0, 1], got 1.5"),
        (_with("loss", auxiliary=[{"name": "triplet", "options": {"margine": 0.2}}]),
         "loss.auxiliary[0]: auxiliary loss 'triplet': unknown options ['margine']"),
        (_with("loss", auxiliary=[{"name": "center"}, {"name": "center", "weight": 0.1}]),
         "loss.auxiliary[1]: auxiliary loss 'center' is already loss.auxiliary[0]"),
        (_with("data", augment={"flipp": True}), "data.augment: unknown fields ['flipp'] (known: ['blur_prob', "),
        (_with("data", augment={"color_jitter": 1.5}), "data.augment.color_jitter must be in [0, 1), got 1.5"),
        (_with("data", augment={"random_resized_crop": [0.9, 0.5]}),
         "data.augment.random_resized_crop must satisfy 0 < min <= max <= 1, got (0.9, 0.5)"),
        (_with("deepspeed", extra={"zero_optimization": {"elastic_checkpoint": True}}),
         "deepspeed.extra.zero_optimization.elastic_checkpoint is not supported, got True: every rank checkpoints"),
        (_with("train", on_divergence="retry"),
         "train.on_divergence must be one of ['abort', 'rollback'], got 'retry'"),
        (_with("train", rollback_lr_factor=1.5), "train.rollback_lr_factor must be in (0, 1], got 1.5"),
        (_with("train", on_divergence="rollback", max_rollbacks=0), "train.max_rollbacks must be > 0 when"),
    ],
)
def test_components_are_checked_by_their_own_rules(data, message):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("extra", "key", "owner"),
    [
        ({"train_micro_batch_size_per_gpu": 32}, "train_micro_batch_size_per_gpu", "data.batch_size"),
        ({"train_batch_size": 256}, "train_batch_size", "data.batch_size"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "optim.grad_accum"),
        ({"gradient_clipping": 1.0}, "gradient_clipping", "optim.grad_clip"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "deepspeed.zero_stage"),
        ({"bf16": {"enabled": True}}, "bf16", "deepspeed.precision"),
        ({"fp16": {"enabled": True}}, "fp16", "deepspeed.precision"),
        ({"amp": {"enabled": True}}, "amp", "deepspeed.precision"),
        ({"optimizer": {"type": "Adam"}}, "optimizer", "optim.name"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "schedule"),
        ({"data_types": {"buffer_dtype": "fp32"}}, "data_types.buffer_dtype", "deepspeed.precision"),
    ],
)
def test_deepspeed_extra_must_not_override_our_keys(extra, key, owner):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(_with("deepspeed", extra=extra))
    text = str(err.value)
    assert text.startswith(f"deepspeed.extra.{key} is not allowed, got "), text
    assert f"the trainer sets it from {owner}" in text, text


def test_accepted_options_pass_and_reach_the_deepspeed_config():
    from distrib_face.train.engine import deepspeed_config

    cfg = Config.from_dict({
        **_with("deepspeed", zero_stage=1, extra={"zero_optimization": {"reduce_bucket_size": 1000},
                                                  "data_types": {"grad_accum_dtype": "fp32"}}),
        "model": {"backbone": "iresnet_tiny", "kwargs": {"widths": [8, 8, 16, 16], "input_size": 32}},
        "loss": {"margin": "arcface", "options": {"easy_margin": True},
                 "auxiliary": [{"name": "triplet", "options": {"margin": 0.3}}]},
        "data": {"source": "random", "augment": {"flip": True, "color_jitter": 0.2}},
    })
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg.train.on_divergence == "abort" and cfg.train.rollback_lr_factor == 0.5 and cfg.train.max_rollbacks == 3


def test_backbone_options_follow_the_factory_signature():
    from distrib_face.models import create_backbone
    from distrib_face.models.registry import backbone_options

    # Every accepted option is really accepted by the factory (a wrong list would let a bad key through to a
    # worker, or refuse a good one).
    for name, value in (("widths", (8, 8, 16, 16)), ("input_size", 32)):
        assert name in backbone_options("iresnet_tiny")
        create_backbone("iresnet_tiny", **{name: value})
    with pytest.raises(TypeError):
        create_backbone("iresnet_tiny", width=(8, 8, 16, 16))
