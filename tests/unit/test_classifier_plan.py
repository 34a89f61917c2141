"""The memory plan (``bench classifier --plan``) against closed forms and against the peak measured here."""

from __future__ import annotations

import math

import pytest

from distrib_face.parallel.plan import PlanSpec, format_plan, make_plan, parse_bytes


def test_sizes_parse_with_units():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6 and parse_bytes("1234") == 1234
    with pytest.raises(ValueError, match="not a memory size: '80 parsecs'"):
        parse_bytes("80 parsecs")


def test_bytes_per_class_follow_the_storage_and_the_rows_in_use():
    dense = make_plan(PlanSpec(classes=1_000_000, embedding=512, weight_dtype="fp32"))
    per = {c.name: c.device_bytes / dense.local_classes for c in dense.components if c.per_class}
    # fp32: weights, momentum and the dense gradient are 4 x 512 bytes per class each; step counts 8.
    assert per == {"weights": 2048, "optimizer state (momentum / moments)": 2048, "per-class step counts": 8,
                   "weight gradient": 2048}
    bf16 = make_plan(PlanSpec(classes=1_000_000, embedding=512, weight_dtype="bf16", sample_rate=0.1, batch=64))
    per = {c.name: c.device_bytes / bf16.local_classes for c in bf16.components if c.per_class}
    assert per["weights"] == per["optimizer state (momentum / moments)"] == 1024
    assert per["row buffer (rows in use)"] == per["gradient of the rows in use"] == pytest.approx(102.4)
    adamw = make_plan(PlanSpec(classes=1_000_000, embedding=512, optimizer="adamw"))
    assert adamw.components[1].device_bytes == 2 * 2048 * 1_000_000
    host = make_plan(PlanSpec(classes=1_000_000, embedding=512, weight_dtype="bf16", sample_rate=0.1, offload="host"))
    assert host.components[0].device_bytes == 0 and host.components[0].host_bytes == 1024 * 1_000_000


def test_the_goal_32m_classes_at_rate_01_fit_one_80gb_device_in_bf16():
    spec = PlanSpec(classes=32_000_000, embedding=512, batch=256, sample_rate=0.1, weight_dtype="bf16")
    plan = make_plan(spec, device_memory=parse_bytes("80GB"))
    assert plan.device_total <= 80e9 and plan.max_classes >= 32_000_000
    fp32 = make_plan(PlanSpec(**{**spec.__dict__, "weight_dtype": "fp32"}), device_memory=parse_bytes("80GB"))
    assert fp32.max_classes < 20_000_000  # what bf16 buys
    # The largest C is the boundary: one rank's worth more does not fit.
    over = make_plan(PlanSpec(**{**spec.__dict__, "classes": plan.max_classes + 2}), parse_bytes("80GB"))
    assert over.device_total > 80e9
    # Independently: bf16 weights + momentum (2 x 1024 B), step counts 8, marker 4, per class; at rate 0.1
    # the row buffer, its gradient and the momentum rows (3 x 1024 x 0.1) and the sampler's draws (about
    # -ln(0.9) per class, 6 int64 vectors each); fixed: two [256, 65536] float32 logit blocks and three float32
    # copies of a 65536 x 512 chunk (bf16), and the marker's extra entry.
    fixed = 2 * 256 * 65536 * 4 + 3 * 65536 * 512 * 4 + 4
    per_class = 2 * 1024 + 8 + 4 + 3 * 1024 * 0.1 - math.log(0.9) * 6 * 8
    assert plan.max_classes == pytest.approx((80e9 - fixed) / per_class, rel=1e-4)  # 33.5M
    assert f"the largest class count that fits is **{plan.max_classes:,}** (33.5M)" in format_plan(plan)


CASES = [  # (sample rate, weight dtype, offload)
    (1.0, "fp32", "none"),
    (0.1, "fp32", "none"),
    (0.1, "bf16", "none"),
    (0.1, "fp32", "host"),
]
SMALL, LARGE, DIM, BATCH = 4_000, 600_000, 128, 64


def _measure(rank: int, world: int) -> list[tuple[float, float]]:
    """Peak resident growth (bytes) of three training steps per case and size, in this fresh process."""
    import gc

    import torch

    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    def rss(field: str) -> int:
        with open("/proc/self/status") as handle:
            line = next(l for l in handle if l.startswith(field))
        return int(line.split()[1]) * 1024

    def run(classes: int, rate: float, dtype: str, offload: str) -> float:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = rss("VmRSS:")
        clf = ShardedMarginClassifier(classes, DIM, margin="arcface", sample_rate=rate, offload=offload,
                                      dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, equal_batches=True)
        opt = ShardOptimizer(clf, "sgd", lr=0.1)
        emb = torch.randn(BATCH, DIM, requires_grad=True)
        for _ in range(3):
            clf(emb, torch.randint(0, classes, (BATCH,))).backward()
            opt.step()
            opt.zero_grad()
        peak = rss("VmHWM:") - before
        del clf, opt, emb
        return float(peak)

    run(SMALL, 0.1, "fp32", "none")  # warm the runtime (thread pools, BLAS buffers) before measuring
    return [(run(SMALL, *case), run(LARGE, *case)) for case in CASES]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_plan_matches_the_peak_measured_on_this_machine(tmp_path):
    """The class-dependent part of the plan (LARGE minus SMALL classes) within 10% of the measured one."""
    from tests.spawn import run_world

    measured = run_world(_measure, 1, tmp_path)[0]
    for (rate, dtype, offload), (small, large) in zip(CASES, measured):
        plans = [make_plan(PlanSpec(classes=c, embedding=DIM, batch=BATCH, sample_rate=rate, weight_dtype=dtype,
                                    offload=offload)) for c in (SMALL, LARGE)]
        planned = sum(p.device_total + p.host_total for p in plans[1:]) - (plans[0].device_total + plans[0].host_total)
        assert 0.9 < (large - small) / planned < 1.1, (rate, dtype, offload, large - small, planned)
