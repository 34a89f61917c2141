"""Single-process checks of the classifier's pieces: shard arithmetic, initialisation, gradcheck,
the shard optimizer against torch.optim, and checkpoint validation."""

from __future__ import annotations

import pytest
import torch

from distrib_face.parallel import ShardedMarginClassifier
from distrib_face.parallel.checkpoint import load_shard_from_dir, save_shard
from distrib_face.parallel.optim import ShardOptimizer
from distrib_face.parallel.shard import INIT_BLOCK_CLASSES, class_range, init_class_rows


@pytest.mark.parametrize("num_classes,world", [(10, 3), (23, 4), (7, 7), (100, 1), (2 * INIT_BLOCK_CLASSES + 5, 3)])
def test_class_ranges_cover_once_and_differ_by_at_most_one(num_classes, world):
    ranges = [class_range(num_classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_class_range_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError, match=r"num_classes \(3\) must be >= world size \(4\)"):
        class_range(3, 0, 4)


def test_initialisation_is_independent_of_world_size():
    num_classes = 2 * INIT_BLOCK_CLASSES + 77  # ranges straddle block boundaries
    full = init_class_rows(0, num_classes, (4,), seed=11)
    for world in (2, 3, 5):
        parts = [init_class_rows(*class_range(num_classes, r, world), (4,), seed=11) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert abs(float(full.std()) - 0.01) < 5e-4  # N(0, 0.01)
    assert not torch.equal(init_class_rows(0, 10, (4,), seed=12), full[:10])


def test_gradcheck_through_chunked_classifier():
    clf = ShardedMarginClassifier(9, 5, margin="arcface", dtype=torch.float64, chunk_size=2, seed=1)
    clf.margin.scale = 4.0
    labels = torch.tensor([0, 3, 8, 3])
    emb = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weight = clf.weight.detach().clone().requires_grad_(True)

    def loss_fn(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(clf, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(loss_fn, (emb, weight), eps=1e-6, atol=1e-7)


def test_bf16_compute_dtype_stays_close_to_fp32():
    torch.manual_seed(0)
    ref = ShardedMarginClassifier(300, 32, margin="cosface", chunk_size=64)
    low = ShardedMarginClassifier(300, 32, margin="cosface", chunk_size=64, compute_dtype=torch.bfloat16)
    emb, labels = torch.randn(16, 32), torch.randint(0, 300, (16,))
    assert float(low(emb, labels).detach()) == pytest.approx(float(ref(emb, labels).detach()), rel=2e-2)


@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw"])
def test_shard_optimizer_matches_torch_optim_without_sampling(kind):
    torch.manual_seed(0)
    clf = ShardedMarginClassifier(13, 6, margin="cosface", dtype=torch.float64)
    mirror = torch.nn.Parameter(clf.weight.detach().clone())
    if kind == "adamw":
        opt = ShardOptimizer(clf, "adamw", lr=0.01, weight_decay=0.1)
        ref = torch.optim.AdamW([mirror], lr=0.01, weight_decay=0.1)
    else:
        nesterov = kind == "sgd_nesterov"
        opt = ShardOptimizer(clf, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        ref = torch.optim.SGD([mirror], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for _ in range(4):
        emb, labels = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 13, (8,))
        clf(emb, labels).backward()
        mirror.grad = clf.weight.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        torch.testing.assert_close(clf.weight.detach(), mirror.detach(), rtol=1e-12, atol=1e-14)


def test_shard_optimizer_works_with_torch_lr_schedulers():
    clf = ShardedMarginClassifier(5, 4)
    opt = ShardOptimizer(clf, "sgd", lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        clf(torch.randn(2, 4), torch.tensor([0, 1])).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_loading_a_shard_that_does_not_fit_names_both_values(tmp_path):
    save_shard(tmp_path, ShardedMarginClassifier(10, 8))
    with pytest.raises(ValueError, match="num_classes=10, the classifier has num_classes=12"):
        load_shard_from_dir(tmp_path, ShardedMarginClassifier(12, 8))
    with pytest.raises(ValueError, match="embedding_size=8, the classifier has embedding_size=16"):
        load_shard_from_dir(tmp_path, ShardedMarginClassifier(10, 16))


def test_bad_labels_are_counted_on_the_device_and_named_when_checked():
    """No host sync in the forward: an out-of-range label is counted; check_step_errors() raises and resets."""
    clf = ShardedMarginClassifier(10, 8, margin="cosface", dtype=torch.float64)
    emb = torch.randn(3, 8, dtype=torch.float64)
    loss = clf(emb, torch.tensor([1, 10, -3]))
    with pytest.raises(ValueError, match=r"2 label\(s\) outside \[0, 10\) reached the classifier \(e\.g\. 10\)"):
        clf.check_step_errors()
    clf.check_step_errors()  # reset: nothing new to report
    # The bad rows were scored against no class: target logit 0, every class a negative.
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(
        clf.weight.detach(), dim=1).t()  # [3, 10]
    s, m = clf.margin.scale, clf.margin.spec.additive_margin
    good = torch.logsumexp(torch.cat([s * cos[0, :1], s * cos[0, 2:], s * (cos[0, 1:2] - m)]), 0) - s * (cos[0, 1] - m)
    bad = torch.logaddexp(torch.zeros((), dtype=torch.float64), torch.logsumexp(s * cos[1:], dim=1))
    assert float(loss.detach()) == pytest.approx(float((good + bad.sum()) / 3), rel=1e-12)


def test_bad_shapes_are_named():
    clf = ShardedMarginClassifier(10, 8)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 8\], got \(2, 4\)"):
        clf(torch.randn(2, 4), torch.tensor([1, 2]))


@pytest.mark.parametrize("margin", ["normface", "cosface", "arcface", "combined"])
@pytest.mark.parametrize("batch,dim", [(20, 16), (8, 32)])  # row dots from the [c, D] gradient / the [B, c] block
def test_fast_path_equals_generic_autograd_path(margin, batch, dim):
    """Margins with s*cos negatives take the analytic backward; it must equal the autograd-per-chunk path."""
    torch.manual_seed(0)
    clf = ShardedMarginClassifier(301, dim, margin=margin, dtype=torch.float64, chunk_size=37)
    assert clf.margin.linear_scale == clf.margin.scale
    emb = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 301, (batch,))
    results = []
    for fast in (True, False):
        clf.fast_path = fast
        loss = clf(emb, labels)
        loss.backward()
        results.append((loss.detach(), emb.grad.clone(), clf.weight.grad.clone()))
        emb.grad, clf.weight.grad = None, None
    for fast_value, generic_value in zip(*results):
        assert float((fast_value - generic_value).abs().max()) <= 1e-11 * float(generic_value.abs().max())


def test_margins_that_change_negatives_opt_out_of_the_fast_path():
    from distrib_face.losses import create_margin

    assert create_margin("sphereface").linear_scale is None  # the feature norm multiplies
    filtered = create_margin("arcface", options={"interclass_filtering_threshold": 0.4})
    assert filtered.linear_scale is None


def test_bias_column_classifier_round_trips_through_a_checkpoint(tmp_path):
    clf = ShardedMarginClassifier(10, 8, margin="softmax")
    assert clf.weight.shape == (10, 9)
    with torch.no_grad():
        clf.weight[:, -1] = torch.arange(10.0)
    save_shard(tmp_path, clf)
    back = ShardedMarginClassifier(10, 8, margin="softmax", seed=4)
    load_shard_from_dir(tmp_path, back)
    assert torch.equal(back.weight, clf.weight)


def test_stochastic_rounding_is_unbiased_and_keeps_updates_nearest_rounding_loses():
    from distrib_face.parallel.optim import stochastic_round_

    gen = torch.Generator().manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    step = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + 0.3 * step)  # 30% of the way to the next bf16 value
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x.clone(), gen)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + step}
    up = float((out.float() > 1.0).double().mean())
    assert abs(up - 0.3) < 6 * (0.3 * 0.7 / x.numel()) ** 0.5
    neg = torch.empty_like(out)
    stochastic_round_(neg, -x.clone(), gen)
    assert abs(float((neg.float() < -1.0).double().mean()) - 0.3) < 0.01  # symmetric for negatives
    # 1000 additions of 1e-4 (below half a bf16 step): nearest rounding never moves, stochastic does on average.
    w_sr = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    w_rn = w_sr.clone()
    for _ in range(1000):
        stochastic_round_(w_sr, w_sr.float() + 1e-4, gen)
        w_rn.copy_(w_rn.float() + 1e-4)
    assert bool((w_rn == lo).all())
    assert abs(float(w_sr.double().mean()) - 1.1) < 0.005


def test_two_backwards_without_zero_grad_accumulate():
    """The reused gradient buffer must not alias the gradient it is added to."""
    torch.manual_seed(0)
    clf = ShardedMarginClassifier(50, 6, margin="cosface", dtype=torch.float64)
    emb, labels = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 50, (5,))
    clf(emb, labels).backward()
    once = clf.weight.grad.clone()
    clf(emb, labels).backward()
    torch.testing.assert_close(clf.weight.grad, 2 * once, rtol=1e-13, atol=0)


def test_sampled_forward_refuses_an_unconsumed_row_gradient():
    clf = ShardedMarginClassifier(100, 6, sample_rate=0.2)
    clf(torch.randn(4, 6), torch.tensor([1, 2, 3, 4])).backward()
    with pytest.raises(RuntimeError, match="rows of the previous step still hold a gradient"):
        clf(torch.randn(4, 6), torch.tensor([1, 2, 3, 4]))


def test_bf16_and_offloaded_shards_round_trip_through_checkpoints(tmp_path):
    torch.manual_seed(0)
    src = ShardedMarginClassifier(40, 8, margin="cosface", dtype=torch.bfloat16, sample_rate=0.3, offload="host")
    opt = ShardOptimizer(src, "sgd", lr=0.1)
    for _ in range(2):
        src(torch.randn(6, 8), torch.randint(0, 40, (6,))).backward()
        opt.step()
        opt.zero_grad()
    save_shard(tmp_path / "bf16", src, opt)
    back = ShardedMarginClassifier(40, 8, margin="cosface", dtype=torch.bfloat16, sample_rate=0.3, seed=9)
    back_opt = ShardOptimizer(back, "sgd", lr=0.1)
    load_shard_from_dir(tmp_path / "bf16", back, back_opt)
    assert back.weight.dtype == torch.bfloat16 and torch.equal(back.weight, src.weight)
    assert torch.equal(back_opt.buffers["momentum_buffer"], opt.buffers["momentum_buffer"])
    assert back_opt.num_steps == opt.num_steps == 2 and int(back.sample_step) == 2
    # A bf16 checkpoint into an fp32 classifier is exact; fp32 into bf16 rounds to nearest.
    wide = ShardedMarginClassifier(40, 8, margin="cosface", seed=9)
    load_shard_from_dir(tmp_path / "bf16", wide)
    assert torch.equal(wide.weight, src.weight.float())


def test_state_dict_lands_pending_offload_writebacks_first():
    """On CUDA the last step's rows reach host memory only at the next plan or at flush(); a reader of the shard
    (a checkpoint and its finiteness check) must see them. Here the pending write-back a CUDA step leaves is
    queued by hand (a stand-in for its event: the CPU path writes at once), holding a non-finite row."""

    class _Done:
        def synchronize(self) -> None:
            pass

    clf = ShardedMarginClassifier(10, 4, margin="cosface", sample_rate=1.0, offload="host")
    rows = torch.tensor([3])
    staged = torch.full((1, 4), float("nan"))
    clf._pending_writeback.append((clf.weight.data, rows, staged, _Done()))
    state = clf.state_dict()
    assert torch.isnan(state["weight"][3]).all() and torch.isfinite(state["weight"][torch.arange(10) != 3]).all()
    assert clf._pending_writeback == []


def test_online_logsumexp_merges_partial_statistics():
    """Per-split (max, sum) partials, empty ones included, merge to the logsumexp of all columns."""
    from distrib_face.parallel.softmax_stats import OnlineLogSumExp

    torch.manual_seed(0)
    logits = torch.randn(5, 23, dtype=torch.float64) * 20
    logits[1] = float("-inf")  # a row with no column at all
    bounds = [0, 7, 7, 15, 23]  # the second part is empty
    part_max = torch.full((4, 5), float("-inf"), dtype=torch.float64)
    part_sum = torch.zeros(4, 5, dtype=torch.float64)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            m = logits[:, lo:hi].amax(dim=1)
            safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            part_max[k], part_sum[k] = m, torch.exp(logits[:, lo:hi] - safe[:, None]).sum(dim=1)
    stats = OnlineLogSumExp((5,), torch.float64, torch.device("cpu"))
    stats.update(logits[:, :3].clone())  # merging composes with streamed chunks
    stats.merge(part_max, part_sum)
    extra = torch.randn(5, dtype=torch.float64)
    want = torch.logsumexp(torch.cat([logits[:, :3], logits, extra[:, None]], dim=1), dim=1)
    got = stats.logsumexp(None, extra=extra)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_a_nan_weight_row_makes_the_loss_nan_not_zero():
    """A NaN logit must not pass for an empty row (max -inf): the loss has to show the divergence."""
    from distrib_face.parallel.softmax_stats import OnlineLogSumExp

    torch.manual_seed(0)
    for fast in (True, False):
        clf = ShardedMarginClassifier(12, 8, margin="cosface", dtype=torch.float64)
        clf.fast_path = fast
        with torch.no_grad():
            clf.weight[3, 0] = float("nan")
        loss = clf(torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 4, 5]))
        assert torch.isnan(loss), (fast, loss)
    stats = OnlineLogSumExp((2,), torch.float64, torch.device("cpu"))
    stats.update(torch.tensor([[0.0, float("nan")], [float("-inf"), float("-inf")]], dtype=torch.float64))
    lse = stats.logsumexp(None, extra=torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.isnan(lse[0]) and lse[1].item() == 2.0  # an all-masked row is just its target


@pytest.mark.parametrize(("optimizer", "sample_rate"), [("sgd", 0.1), ("adamw", 0.1), ("sgd", 1.0)])
def test_offload_prefetch_stages_the_optimizer_state_rows(optimizer, sample_rate):
    """Host offload: the plan stages the optimizer state's rows with the weights' (one copy stream on CUDA), so
    ShardOptimizer.step stages nothing itself; the trajectory equals the in-device path's bit for bit."""
    torch.manual_seed(0)
    steps = [(torch.randn(6, 8), torch.randint(0, 200, (6,))) for _ in range(3)]
    trajectories = {}
    for offload in ("none", "host"):
        clf = ShardedMarginClassifier(200, 8, margin="cosface", sample_rate=sample_rate, seed=3, offload=offload)
        opt = ShardOptimizer(clf, optimizer, lr=0.5, momentum=0.9, weight_decay=5e-4)
        staged_in_step: list[str] = []
        losses = []
        for emb, labels in steps:
            clf.prefetch(labels)
            if offload == "host":
                row_index = clf.active_row_index()
                for name, host in opt.buffers.items():  # the state rows are on the device before the forward
                    expected = host if row_index is None else host[row_index]
                    assert torch.equal(clf.prefetched_state(name), expected), name
            loss = clf(emb, labels)
            loss.backward()
            stage = clf.stage_rows
            clf.stage_rows = lambda name, *args, _stage=stage, _seen=staged_in_step: _seen.append(name) or _stage(name, *args)
            opt.step()
            clf.stage_rows = stage
            opt.zero_grad()
            losses.append(loss.detach())
        assert staged_in_step == []  # nothing copied to the device on the optimizer's critical path
        clf.flush()
        trajectories[offload] = (losses, clf.weight.detach().clone(), {k: v.clone() for k, v in opt.buffers.items()})
    (loss_a, w_a, state_a), (loss_b, w_b, state_b) = trajectories["none"], trajectories["host"]
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    assert torch.equal(w_a, w_b)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_offload_evaluation_plan_stages_no_state():
    clf = ShardedMarginClassifier(50, 8, margin="cosface", offload="host")
    ShardOptimizer(clf, "sgd", momentum=0.9)
    clf.eval()
    with torch.no_grad():
        clf(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    assert clf.prefetched_state("momentum_buffer") is None
    with pytest.raises(ValueError, match="offload='host'"):
        ShardedMarginClassifier(50, 8).attach_offloaded_state({})


@pytest.mark.parametrize("offload", ["none", "host"])
def test_prefetch_then_forward_equals_forward(offload):
    """prefetch(labels) plans the step early (sampling, the rows' copy); the forward then uses that plan."""
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 8), torch.randint(0, 200, (6,))
    results = []
    for prefetch in (False, True):
        clf = ShardedMarginClassifier(200, 8, margin="cosface", sample_rate=0.1, seed=3, offload=offload)
        if prefetch:
            clf.prefetch(labels)
            assert int(clf.sample_step) == 1  # sampled now, not again in the forward
        loss = clf(emb, labels)
        loss.backward()
        index, rows = clf.active_rows()
        results.append((loss.detach(), index.clone(), rows.grad.clone(), int(clf.sample_step)))
    for a, b in zip(*results):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
