"""Checkpoints are safe to load and only ever hold a finite state.

- Poisoned checkpoints: every ``.pt`` of a real checkpoint (written by the real trainer) is replaced by a
  pickle whose ``__reduce__`` would create a marker file; every entry point that reads checkpoints refuses
  it with the file named, and the marker never appears.
- A non-finite state (NaN on one rank only) is never published: every rank raises the same
  NonFiniteStateError naming the tensor and the rank, ``latest`` keeps naming the last good checkpoint.
- A live, already-trained engine / classifier / optimiser set reloads a checkpoint exactly: training on
  from the reloaded state repeats the original continuation bit for bit (ZeRO 0, 1, 2; fp32 and bf16),
  which is what ``train.on_divergence: rollback`` relies on.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.spawn import run_world

NUM_CLASSES, DIM, IMAGE, BATCH = 12, 16, 32, 4


class Exploit:
    """Pickles to ``os.system("touch MARKER")``: an unrestricted unpickler runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(path: Path, marker: Path, zip_format: bool = True) -> None:
    """Replace ``path`` by a pickle that would create ``marker`` (torch's zip format or a raw pickle)."""
    if zip_format:
        torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Exploit(marker)))


def _quiet() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


MARGIN_OPTIONS = {"cosface": {"scale": 16.0, "additive_margin": 0.2},
                  "curricularface": {"scale": 16.0, "angular_margin": 0.5}}  # the second has state: its EMA ``t``


def _components(ctx, zero_stage: int, precision: str, seed: int = 0, auxiliary: bool = True, extra: dict | None = None,
                margin: str = "cosface"):
    """A DeepSpeed engine (iresnet_tiny), a Partial-FC class shard with its optimiser and a centre loss, built
    as the trainer builds them (distrib_face.train.engine, parallel, losses), without the training loop."""
    from distrib_face.config import Config
    from distrib_face.parallel.auxiliary import build_auxiliary_losses
    from distrib_face.losses.margins import create_margin
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer
    from distrib_face.train.engine import build_backbone, build_engine

    cfg = Config.from_dict({
        "data": {"source": "random", "image_size": IMAGE, "batch_size": BATCH},
        "model": {"backbone": "iresnet_tiny", "embedding_size": DIM},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision, "extra": extra or {}},
        "train": {"total_steps": 1},
    })
    torch.manual_seed(seed)
    bundle = build_engine(cfg, build_backbone(cfg), 0.05, ctx.device, ctx.world_size)
    classifier = ShardedMarginClassifier(
        NUM_CLASSES, DIM, margin=create_margin(margin, **MARGIN_OPTIONS[margin]), sample_rate=0.5,
        group=ctx.group, device=ctx.device, seed=seed, embedding_grad_scale=float(ctx.world_size))
    shard_optimizer = ShardOptimizer(classifier, name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    aux = aux_optimizer = None
    if auxiliary:
        aux = build_auxiliary_losses([{"name": "center", "weight": 0.1}], num_classes=NUM_CLASSES,
                                     embedding_size=DIM, group=ctx.group, device=ctx.device,
                                     embedding_grad_scale=float(ctx.world_size), seed=seed)
        aux_optimizer = torch.optim.SGD([p for p in aux.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    return bundle, classifier, shard_optimizer, aux, aux_optimizer


def _batch(step: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(dtype)  # [B, 3, S, S]
    return images, torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def _train(steps: range, ctx, bundle, classifier, shard_optimizer, aux, aux_optimizer) -> list[float]:
    """The trainer's step written out: engine forward, class shard + centre loss, engine backward / step, shard step."""
    engine, losses = bundle.engine, []
    for step in steps:
        images, labels = _batch(step, ctx.rank, bundle.input_dtype)
        embeddings = engine(images).float()
        loss = classifier(embeddings, labels)
        if aux is not None:
            loss = loss + aux(embeddings, labels, classifier=classifier)[0]
        engine.backward(loss)
        engine.step()
        shard_optimizer.step()
        shard_optimizer.zero_grad()
        if aux_optimizer is not None:
            aux_optimizer.step()
            aux_optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _state(bundle, classifier, shard_optimizer, aux) -> dict[str, torch.Tensor]:
    """Everything that shapes the next steps, as CPU copies: module, optimiser (our plain capture), shard, centres."""
    from distrib_face.train import engine_state

    snapshot = engine_state.capture(bundle.engine, 0, bundle.engine.dp_world_size)
    out = {name: t.detach().float().cpu().clone() for name, t in snapshot.named_tensors()}
    out.update({f"classifier {k}": v.detach().float().cpu().clone() for k, v in classifier.state_dict().items()})
    out.update({f"shard optimizer {k}": v.detach().float().cpu().clone()
                for k, v in shard_optimizer.state_dict()["buffers"].items()})
    if aux is not None:
        out.update({f"aux {k}": v.detach().float().cpu().clone() for k, v in aux.state_dict().items()})
    return out


def _save(root: Path, step: int, ctx, bundle, classifier, shard_optimizer, aux, aux_optimizer) -> Path:
    from distrib_face.train.checkpoint import TrainerState, save_checkpoint

    return save_checkpoint(
        root, ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
        trainer_state=TrainerState(step=step, world_size=ctx.world_size), loader_state=None, config={},
        ds_config=bundle.ds_config, backbone_file=None, auxiliary=(aux, aux_optimizer))


def _live_reload_worker(rank: int, world_size: int, root: str, configs: list) -> dict:
    _quiet()
    from distrib_face.parallel import init_distributed
    from distrib_face.train.checkpoint import load_checkpoint

    ctx = init_distributed(device="cpu")
    out = {}
    for zero_stage, precision, extra in configs:
        key = f"zero{zero_stage}-{precision}" + ("-" + "-".join(extra) if extra else "")
        parts = _components(ctx, zero_stage, precision, extra=extra)
        out[key + " optimizer"] = type(parts[0].engine.optimizer).__name__
        _train(range(0, 2), ctx, *parts)
        ckpt = _save(Path(root) / key, 2, ctx, *parts)
        at_checkpoint = _state(*parts[:3], parts[3])
        continued = _train(range(2, 4), ctx, *parts)
        after = _state(*parts[:3], parts[3])
        bundle, classifier, shard_optimizer, aux, aux_optimizer = parts
        load_checkpoint(ckpt, ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
                        auxiliary=(aux, aux_optimizer))
        reloaded = _state(*parts[:3], parts[3])
        again = _train(range(2, 4), ctx, *parts)
        out[key] = {
            "continued": continued, "again": again,
            "reload_differs": sorted(n for n in at_checkpoint if not torch.equal(at_checkpoint[n], reloaded[n])),
            "end_differs": sorted(n for n in after if not torch.equal(after[n], _state(*parts[:3], parts[3])[n])),
            "moved": sorted(n for n in after if not torch.equal(after[n], at_checkpoint[n])),
        }
    return out


# Every optimiser DeepSpeed wraps ours in here: the torch one itself, FP16_UnfusedOptimizer (bf16 ZeRO 0),
# DeepSpeedZeroOptimizer (ZeRO 1 / 2) and BF16_Optimizer (bf16 ZeRO 1 with fp32 gradient accumulation).
CONFIGS = [(0, "fp32", None), (0, "bf16", None), (1, "fp32", None), (1, "bf16", None), (2, "fp32", None),
           (2, "bf16", None), (1, "bf16", {"data_types": {"grad_accum_dtype": "fp32"}})]
OPTIMIZERS = {"zero0-fp32": "SGD", "zero0-bf16": "FP16_UnfusedOptimizer", "zero1-fp32": "DeepSpeedZeroOptimizer",
              "zero1-bf16": "DeepSpeedZeroOptimizer", "zero2-fp32": "DeepSpeedZeroOptimizer",
              "zero2-bf16": "DeepSpeedZeroOptimizer", "zero1-bf16-data_types": "BF16_Optimizer"}


def test_a_live_engine_reloads_a_checkpoint_exactly(tmp_path):
    results = run_world(_live_reload_worker, 2, tmp_path, (str(tmp_path / "ckpt"), CONFIGS))
    for rank, out in enumerate(results):
        assert {key: out.pop(f"{key} optimizer") for key in OPTIMIZERS} == OPTIMIZERS
        for key, r in out.items():
            # The reference is the run itself: the two steps after the checkpoint, taken first without a reload.
            assert r["again"] == r["continued"], (rank, key, r["continued"], r["again"])
            assert r["reload_differs"] == [], (rank, key)
            assert r["end_differs"] == [], (rank, key)
            # The check has teeth: the continuation moved the weights, the momentum and the centres.
            moved = r["moved"]
            assert any("optimizer" in n for n in moved) and any(n.startswith("classifier") for n in moved), key
            assert any(n.startswith("aux") for n in moved) and any(n.startswith("backbone layer") for n in moved), key


# ---------------------------------------------------------------- poisoned checkpoints

ROOT = Path(__file__).resolve().parents[2]
STEP = "step_000000002"


def _train_config(output_dir: Path, **train) -> dict:
    return {
        "data": {"source": "random", "random_num_classes": NUM_CLASSES, "random_num_samples": 64, "batch_size": BATCH,
                 "image_size": IMAGE},
        "model": {"backbone": "iresnet_tiny", "embedding_size": DIM},
        "loss": {"margin": "cosface", "scale": 16.0, "additive_margin": 0.2,
                 "auxiliary": [{"name": "center", "weight": 0.1}]},
        "optim": {"name": "sgd", "lr": 0.05},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "train": {"total_steps": 2, "output_dir": str(output_dir), "log_every": 1, "eval_at_start": False,
                  "export_onnx": False, "resume": "auto", **train},
        "tracking": {"enabled": False},
    }


def _trainer_worker(rank: int, world_size: int, cfg_dict: dict) -> dict:
    _quiet()
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    return run_training(Config.from_dict(cfg_dict), init_distributed(device="cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The output folder of a real 2-rank training run (ZeRO 1, a centre loss): one checkpoint at step 2."""
    base = tmp_path_factory.mktemp("trained")
    run_world(_trainer_worker, 2, base / "world", (_train_config(base / "run"),))
    assert (base / "run" / "checkpoints" / "latest").read_text().strip() == STEP
    return base / "run"


def _poisoned_copy(trained: Path, dest: Path, marker: Path, only: str | None = None) -> tuple[Path, list[Path]]:
    """A copy of the run folder whose every checkpoint ``.pt`` (or only the one at relative path ``only``) is a
    marker-creating pickle, alternating torch's zip format and a raw pickle; returns the copy and the files."""
    import shutil

    shutil.copytree(trained, dest)
    step = dest / "checkpoints" / STEP
    files = sorted(step.rglob("*.pt")) if only is None else [step / only]
    for i, path in enumerate(files):
        poison(path, marker, zip_format=i % 2 == 0)
    return dest, files


def test_the_poison_is_armed(tmp_path):
    # The test's payload really runs code under an unrestricted load: a refusal below is a real refusal.
    for zip_format in (True, False):
        marker = tmp_path / f"armed_{zip_format}"
        path = tmp_path / f"p_{zip_format}.pt"
        poison(path, marker, zip_format=zip_format)
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:
            pass  # a raw pickle is taken for torch's legacy format: the payload runs, then the magic number fails
        assert marker.exists()


def test_a_checkpoint_holds_only_plain_data(trained):
    # Every .pt of a real checkpoint loads with weights_only=True; DeepSpeed's pickles (and its zero_to_fp32.py)
    # are gone, and no other pickle hides under another suffix.
    step = trained / "checkpoints" / STEP
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    pts = [f for f in files if f.endswith(".pt")]
    assert set(files) - set(pts) == {
        "trainer.json", "config.yaml", "deepspeed_config.json", "ranks/rank_00000.json", "ranks/rank_00001.json"}
    assert sorted(pts) == sorted([
        "backbone.pt", "engine/module.pt", "engine/buffers-00001-of-00002.pt",
        "engine/optimizer-00000-of-00002.pt", "engine/optimizer-00001-of-00002.pt",
        "classifier/classifier-00000-of-00002.pt", "classifier/classifier-00001-of-00002.pt",
        "ranks/rank_00000_rng.pt", "ranks/rank_00001_rng.pt", "ranks/rank_00000_aux.pt", "ranks/rank_00001_aux.pt"])
    for name in pts:
        torch.load(step / name, weights_only=True)


def _env() -> dict:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return {**env, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distrib_face", *args], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=ROOT)


ENTRY_POINTS = ["train.resume: auto", "--resume DIR", "export --checkpoint", "eval --model", "train.init_backbone",
                "reshard"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_poisoned_checkpoint_is_refused_by_every_entry_point(trained, tmp_path, entry):
    import yaml

    marker = tmp_path / "MARKER"
    run, files = _poisoned_copy(trained, tmp_path / "run", marker)
    step = run / "checkpoints" / STEP
    config = tmp_path / "train.yaml"
    before = _files(tmp_path)
    if entry == "train.resume: auto":
        config.write_text(yaml.safe_dump(_train_config(run, total_steps=4)))
        proc = _cli("train", "--config", str(config))
    elif entry == "--resume DIR":
        config.write_text(yaml.safe_dump(_train_config(tmp_path / "other", total_steps=4)))
        proc = _cli("train", "--config", str(config), "--resume", str(step))
    elif entry == "train.init_backbone":
        config.write_text(yaml.safe_dump(_train_config(tmp_path / "finetune", init_backbone=str(step))))
        proc = _cli("train", "--config", str(config))
    elif entry == "export --checkpoint":
        proc = _cli("export", "--checkpoint", str(step), "--output", str(tmp_path / "model.onnx"))
    elif entry == "eval --model":
        proc = _cli("eval", "--model", str(step), "--pairs", str(tmp_path / "none.npz"))
    else:
        proc = _cli("reshard", str(step / "classifier"), str(tmp_path / "resharded"), "--world-size", "1")
    output = proc.stdout + proc.stderr
    print(entry, "->", output.strip().splitlines()[-1])
    assert proc.returncode == 2, output[-3000:]
    assert not marker.exists()
    named = [path for path in files if str(path) in output]
    assert named, output[-3000:]  # the refusal names the file it refused
    assert "refused to load" in output and "could run code" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]  # one line, not a stack
    # Nothing trained, exported or written after the refusal: no backbone.pt, ONNX file, new checkpoint or
    # resharded state anywhere (a file created or changed shows as a new (path, size, mtime) entry).
    written = sorted(path for path, _, _ in _files(tmp_path) - before if path != config.name)
    assert written == [], written


def _files(root: Path) -> set[tuple[str, int, int]]:
    """``(path relative to root, size, mtime_ns)`` of every file under ``root``."""
    return {(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _poisoned_resume_worker(rank: int, world_size: int, trained: str, work: str) -> list:
    """On live components (2 ranks), poison one checkpoint file at a time and resume from it."""
    _quiet()
    from distrib_face.parallel import init_distributed
    from distrib_face.train.checkpoint import UnsafeCheckpointError, load_checkpoint

    ctx = init_distributed(device="cpu")
    bundle, classifier, shard_optimizer, aux, aux_optimizer = _components(ctx, 1, "fp32")
    step = Path(trained) / "checkpoints" / STEP
    names = sorted(p.relative_to(step).as_posix() for p in step.rglob("*.pt") if p.name != "backbone.pt")
    outcomes = []
    for i, name in enumerate(names):
        copy = Path(work) / f"case{i}"
        marker = Path(work) / f"MARKER{i}"
        if rank == 0:
            _poisoned_copy(Path(trained), copy, marker, only=name)
        from distrib_face.parallel import barrier

        barrier(ctx.group)
        try:
            load_checkpoint(copy / "checkpoints" / STEP, ctx=ctx, engine=bundle.engine, classifier=classifier,
                            shard_optimizer=shard_optimizer, auxiliary=(aux, aux_optimizer))
            outcomes.append((name, None, ""))
        except UnsafeCheckpointError as err:
            outcomes.append((name, type(err).__name__, str(err)))
        barrier(ctx.group)
        outcomes[-1] += (marker.exists(),)
    # A damaged (truncated) file that only rank 1 reads: not "unsafe", but every rank still raises, naming it.
    import shutil

    copy = Path(work) / "damaged"
    name = "engine/optimizer-00001-of-00002.pt"
    if rank == 0:
        shutil.copytree(trained, copy)
        target = copy / "checkpoints" / STEP / name
        target.write_bytes(target.read_bytes()[:200])
    barrier(ctx.group)
    try:
        load_checkpoint(copy / "checkpoints" / STEP, ctx=ctx, engine=bundle.engine, classifier=classifier,
                        shard_optimizer=shard_optimizer, auxiliary=(aux, aux_optimizer))
        damaged = None
    except Exception as err:  # noqa: BLE001 - the type is what the test checks
        damaged = (type(err).__name__, str(err))
    # A checkpoint in DeepSpeed's own format (its pickles under deepspeed/): refused, never unpickled.
    legacy = Path(work) / "legacy"
    if rank == 0:
        shutil.copytree(trained, legacy)
        step = legacy / "checkpoints" / STEP
        (step / "engine").rename(step / "deepspeed")
    barrier(ctx.group)
    try:
        load_checkpoint(legacy / "checkpoints" / STEP, ctx=ctx, engine=bundle.engine, classifier=classifier,
                        shard_optimizer=shard_optimizer, auxiliary=(aux, aux_optimizer))
        old_format = None
    except Exception as err:  # noqa: BLE001 - the type is what the test checks
        old_format = (type(err).__name__, str(err))
    return {"poisoned": outcomes, "damaged": damaged, "old_format": old_format}


def test_each_checkpoint_file_is_refused_on_every_rank(trained, tmp_path):
    # One poisoned file at a time: whichever rank reads it, every rank raises the same error naming it, so no
    # rank is left waiting in a collective.
    results = run_world(_poisoned_resume_worker, 2, tmp_path, (str(trained), str(tmp_path)))
    assert len(results[0]["poisoned"]) == 10
    for rank, result in enumerate(results):
        kind, message = result["damaged"]
        assert kind == "CheckpointError", (rank, kind, message)
        assert f"checkpoints/{STEP}/engine/optimizer-00001-of-00002.pt: not a readable engine-state file" in message
        assert message.endswith("(rank 1)"), message
        kind, message = result["old_format"]
        assert kind == "CheckpointError", message
        assert "engine: missing: this checkpoint holds no engine state (DeepSpeed's own format" in message, message
        for name, kind, message, marker_exists in result["poisoned"]:
            assert kind == "UnsafeCheckpointError", (rank, name, message)
            assert f"checkpoints/{STEP}/{name}: refused to load" in message, (rank, name, message)
            assert not marker_exists, (rank, name)
    assert [m for _, _, m, _ in results[0]["poisoned"]] == [m for _, _, m, _ in results[1]["poisoned"]]


# ---------------------------------------------------------------- a diverged state is never published


def _injections(bundle, classifier, shard_optimizer, aux, aux_optimizer) -> list[tuple[str, torch.Tensor, tuple]]:
    """``(name in the message, live tensor, index)`` for one value of each part of the state: the backbone's
    module, buffers, optimiser state and fp32 master partition, the class shard, its margin's state and its
    optimiser, the centres and their optimiser."""
    from distrib_face.train import engine_state

    snapshot = engine_state.capture(bundle.engine, 0, bundle.engine.dp_world_size)
    named = list(snapshot.named_tensors())
    momentum = [(n, t) for n, t in named if n.endswith("momentum_buffer")][0]
    # bf16 ZeRO 2 keeps this rank's fp32 master partition apart from the bf16 module weights
    master = bundle.engine.optimizer.single_partition_of_fp32_groups[0]
    assert master.dtype == torch.float32 and bundle.engine.module.conv1.weight.dtype == torch.bfloat16
    # (the checkpoint's copy on the last rank is a view without the partition's padding: same storage)
    master_name = [n for n, t in named if t.data_ptr() == master.data_ptr()]
    assert master_name == ["backbone optimizer.single_partition_of_fp32_groups[0]"], master_name
    aux_key, aux_tensor = next(iter(aux.state_dict().items()))
    centres = next(p for group in aux_optimizer.param_groups for p in group["params"])
    margin_state = [f"classifier {k}" for k, v in classifier.state_dict().items()
                    if v.data_ptr() == classifier.margin.t.data_ptr()]
    assert margin_state == ["classifier margin.t"], margin_state
    return [
        ("classifier weight", classifier.weight, (0, 1)),
        (momentum[0], momentum[1], (3,)),  # the live state: capture returns references
        (master_name[0], master, (5,)),
        ("backbone bn1.running_var", bundle.engine.module.bn1.running_var, (2,)),
        (margin_state[0], classifier.margin.t, ()),  # CurricularFace's EMA of the target cosine
        ("classifier optimizer momentum_buffer", shard_optimizer.buffers["momentum_buffer"], (0, 1)),
        ("auxiliary optimizer state[0].momentum_buffer", aux_optimizer.state[centres]["momentum_buffer"], (0, 0)),
        (f"auxiliary {aux_key}", aux_tensor, (0, 0)),
    ]


def _divergence_worker(rank: int, world_size: int, root: str, zero_stage: int, precision: str) -> dict:
    _quiet()
    from distrib_face.config import TrainConfig
    from distrib_face.parallel import barrier, init_distributed
    from distrib_face.train.checkpoint import TrainerState, check_finite_state
    from distrib_face.train.divergence import NonFiniteStateError, rollback_to_last_good

    ctx = init_distributed(device="cpu")
    parts = _components(ctx, zero_stage, precision, margin="curricularface")
    bundle, classifier, shard_optimizer, aux, aux_optimizer = parts
    root = Path(root)
    _train(range(0, 2), ctx, *parts)
    good = _save(root, 2, ctx, *parts)
    continued = _train(range(2, 4), ctx, *parts)
    out: dict = {"refusals": [], "good": str(good)}
    for name, tensor, index in _injections(*parts):
        if rank == 0:  # a stale attempt at this step (a crash mid-write): the refusal removes it too
            (root / "step_000000004.tmp" / "engine").mkdir(parents=True, exist_ok=True)
        saved_value = tensor[index].clone()
        if rank == 1:  # one rank only: the flag must still reach every rank
            with torch.no_grad():
                tensor[index] = float("nan") if "running_var" not in name else float("inf")
        try:
            _save(root, 4, ctx, *parts)
            error = None
        except NonFiniteStateError as err:
            error = err
        out["refusals"].append({
            "expected": name, "message": str(error) if error else None,
            "findings": error.findings if error else None,
            "last_good": str(error.last_good) if error else None,
            "latest": (root / "latest").read_text().strip(),
            "published": sorted(p.name for p in root.iterdir()),
        })
        with torch.no_grad():
            tensor[index] = saved_value
        last_error = error
        barrier(ctx.group)  # every rank has looked at the folder before rank 0 stages the next stale attempt
    # The last injection (a centre) is put back in; poison the class shard again and roll back for real.
    check = dict(ctx=ctx, engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer, step=4,
                 auxiliary=(aux, aux_optimizer))
    check_finite_state(root, **check)  # all finite again: no error
    with torch.no_grad():
        if rank == 1:
            classifier.weight[0, 0] = float("nan")
    try:
        check_finite_state(root, **check)  # the same check on its own, between checkpoints
    except NonFiniteStateError as err:
        out["check_alone"] = str(err)
    try:
        _save(root, 4, ctx, *parts)
    except NonFiniteStateError as err:
        last_error = err
    state = TrainerState(step=4, world_size=ctx.world_size)
    abort = TrainConfig(total_steps=4)
    try:
        rollback_to_last_good(last_error, root, train_cfg=abort, trainer_state=state, ctx=ctx, engine=bundle.engine,
                              classifier=classifier, shard_optimizer=shard_optimizer, auxiliary=(aux, aux_optimizer))
    except NonFiniteStateError as err:
        out["abort_reraises_the_same_error"] = err is last_error
    policy = TrainConfig(total_steps=4, on_divergence="rollback", rollback_lr_factor=0.5, max_rollbacks=1)
    loaded = rollback_to_last_good(last_error, root, train_cfg=policy, trainer_state=state, ctx=ctx,
                                   engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
                                   auxiliary=(aux, aux_optimizer))
    out["rolled_back"] = (str(loaded.path), loaded.trainer_state.step, loaded.trainer_state.rollbacks,
                          loaded.trainer_state.lr_scale)
    out["continued"], out["again"] = continued, _train(range(2, 4), ctx, *parts)
    try:
        rollback_to_last_good(last_error, root, train_cfg=policy, trainer_state=loaded.trainer_state, ctx=ctx,
                              engine=bundle.engine, classifier=classifier, shard_optimizer=shard_optimizer,
                              auxiliary=(aux, aux_optimizer))
    except NonFiniteStateError as err:
        out["gave_up"] = str(err)
    out["saved_after_rollback"] = str(_save(root, 4, ctx, *parts))
    return out


def test_a_non_finite_state_is_never_published(tmp_path):
    # 3 ranks, the bad value on rank 1 only; bf16 ZeRO 2 (bf16 module tensors, a partitioned fp32 master).
    root = tmp_path / "checkpoints"
    results = run_world(_divergence_worker, 3, tmp_path, (str(root), 2, "bf16"))
    injected = [r["expected"] for r in results[0]["refusals"]]
    assert injected[:-1] == [
        "classifier weight", "backbone optimizer.base_optimizer_state.state.0.momentum_buffer",
        "backbone optimizer.single_partition_of_fp32_groups[0]", "backbone bn1.running_var", "classifier margin.t",
        "classifier optimizer momentum_buffer", "auxiliary optimizer state[0].momentum_buffer"], injected
    assert injected[-1].startswith("auxiliary ") and "centers" in injected[-1], injected
    for rank, out in enumerate(results):
        for refusal in out["refusals"]:
            # Every rank raised, and every rank's message names the tensor on rank 1 and the last good checkpoint.
            assert refusal["message"] is not None, (rank, refusal["expected"])
            assert list(refusal["findings"]) == [1], refusal["findings"]
            assert refusal["findings"][1][0].startswith(f"{refusal['expected']} (1 of "), refusal["findings"]
            assert f"rank 1: {refusal['expected']} (1 of " in refusal["message"]
            assert f"checkpoint {root / 'step_000000004'} was not written" in refusal["message"]
            assert f"the last good checkpoint is {out['good']} (`latest` still names it)" in refusal["message"]
            assert refusal["last_good"] == out["good"]
            # Nothing published: `latest` still names step 2, no step_4 folder, no leftover tmp folder.
            assert refusal["latest"] == "step_000000002"
            assert refusal["published"] == ["latest", "step_000000002"], refusal["published"]
        alone = out["check_alone"]
        assert alone.startswith("step 4: the training state is not finite: rank 1: classifier weight (1 of "), alone
        assert out["abort_reraises_the_same_error"] is True
        assert out["rolled_back"] == (out["good"], 2, 1, 0.5)
        # After the rollback the live components repeat the continuation from the good checkpoint exactly.
        assert out["again"] == out["continued"]
        assert "giving up after 1 rollbacks (train.max_rollbacks=1)" in out["gave_up"]
        assert out["saved_after_rollback"] == str(root / "step_000000004")
    assert results[0]["refusals"][0]["message"] == results[-1]["refusals"][0]["message"]
