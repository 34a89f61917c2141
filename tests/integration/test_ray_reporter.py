"""The checkpoint-file split of RayReporter on two gloo ranks (no Ray needed): every file is uploaded once."""

from __future__ import annotations

from pathlib import Path

from tests.spawn import run_world


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _stage_both_layouts(rank: int, world_size: int, root: str) -> dict:
    from distrib_face.parallel import barrier, init_distributed
    from distrib_face.train.ray_backend import STAGING_PREFIX, _list_files, _stage_own_files

    ctx = init_distributed(device="cpu")
    out = {}
    # "shared": one folder for both ranks (one machine / a shared file system);
    # "private": a folder per rank (node-local disks), each holding the shared config too.
    for layout in ("shared", "private"):
        folder = Path(root) / layout / ("step_2" if layout == "shared" else f"node{rank}/step_2")
        _write(folder / "classifier" / f"classifier-{rank:05d}-of-00002.pt", f"shard {rank}")
        _write(folder / "config.yaml", "same on every rank")
        if rank == 0:
            _write(folder / "trainer.json", "{}")
        barrier(ctx.group)
        staged = _stage_own_files(folder, ctx)
        out[layout] = {
            "staged_is_folder": staged == folder,
            "files": None if staged is None else _list_files(staged),
            "is_staging": staged is not None and staged.name.startswith(STAGING_PREFIX),
        }
    out["no_checkpoint"] = _stage_own_files(None, ctx)  # a report without a checkpoint still runs the exchange
    return out


def test_every_checkpoint_file_is_uploaded_once(tmp_path):
    rank0, rank1 = run_world(_stage_both_layouts, 2, tmp_path, (str(tmp_path / "ckpt"),))

    # One folder seen by both ranks: rank 0 uploads all of it, rank 1 nothing.
    assert rank0["shared"] == {"staged_is_folder": True, "is_staging": False, "files": [
        "classifier/classifier-00000-of-00002.pt", "classifier/classifier-00001-of-00002.pt", "config.yaml",
        "trainer.json"]}
    assert rank1["shared"]["files"] is None

    # A folder per rank: rank 0 uploads its folder; rank 1 its shard from a staging folder of hard links,
    # without the config that rank 0 already uploads.
    assert rank0["private"]["staged_is_folder"] and rank0["private"]["files"] == [
        "classifier/classifier-00000-of-00002.pt", "config.yaml", "trainer.json"]
    assert rank1["private"]["is_staging"] and rank1["private"]["files"] == ["classifier/classifier-00001-of-00002.pt"]
    assert rank0["no_checkpoint"] is None and rank1["no_checkpoint"] is None
