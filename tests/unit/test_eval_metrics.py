"""Verification and identification metrics against hand-computed cases, scikit-learn and brute force."""

import math

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import KFold

from distrib_face.eval import (
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
from distrib_face.eval.metrics import roc_auc


def _scores(seed: int, n: int = 2000, ties: bool = True):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.4
    scores = rng.normal(issame * 1.2, 1.0)
    return (np.round(scores, 1) if ties else scores), issame


# ------------------------------------------------------------------------------------------------ ROC


@pytest.mark.parametrize("seed,ties", [(0, True), (1, False)])
def test_roc_curve_matches_sklearn(seed, ties):
    scores, issame = _scores(seed, ties=ties)
    roc = roc_curve(scores, issame)
    fpr, tpr, thr = sk_roc_curve(issame, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc.fpr, fpr)
    np.testing.assert_allclose(roc.tpr, tpr)
    np.testing.assert_allclose(roc.thresholds[1:], thr[1:])
    assert roc_auc(roc) == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)


def test_roc_needs_both_kinds():
    with pytest.raises(ValueError, match="0 impostor"):
        roc_curve([0.1, 0.2], [True, True])


# -------------------------------------------------------------------------------------------- TAR@FAR


def test_tar_at_far_hand_case():
    # 10 impostors: FAR 0.1 allows one accepted impostor, FAR 0.2 two.
    impostor = [0.95, 0.85, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    genuine = [0.99, 0.9, 0.8, 0.6]
    scores = np.array(genuine + impostor)
    issame = np.array([True] * 4 + [False] * 10)
    tars, notes = tar_at_far(scores, issame, far_targets=(0.2, 0.1, 0.01))
    # FAR 0.2: threshold just above 0.5 -> genuine 0.99, 0.9, 0.8, 0.6 accepted = 4/4
    assert tars[0.2] == 1.0
    # FAR 0.1: threshold just above 0.85 -> 0.99 and 0.9 accepted = 2/4
    assert tars[0.1] == 0.5
    # FAR 0.01 needs 100 impostors: not measurable, reported as None with a note naming the FAR
    assert tars[0.01] is None
    assert len(notes) == 1 and "1e-02" in notes[0] and "10 impostor" in notes[0]


@pytest.mark.parametrize("seed", [2, 3])
def test_tar_at_far_matches_sklearn_roc(seed):
    scores, issame = _scores(seed, n=5000)
    fpr, tpr, _ = sk_roc_curve(issame, scores, drop_intermediate=False)
    tars, _ = tar_at_far(scores, issame, far_targets=(0.3, 1e-1, 1e-2, 1e-3))
    for far, tar in tars.items():
        assert tar == pytest.approx(tpr[fpr <= far].max(), abs=1e-12), far


# ------------------------------------------------------------------------------------------------ EER


def test_eer_hand_cases():
    # at threshold 0.6: FAR = 1/4 (0.6), FRR = 1/4 (0.4) -> EER exactly 0.25 at a ROC point
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
    issame = np.array([True] * 4 + [False] * 4)
    eer, thr = equal_error_rate(roc_curve(scores, issame))
    assert eer == pytest.approx(0.25) and thr == pytest.approx(0.6)
    # genuine {0.9, 0.5}, impostor {0.6, 0.1}: ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FNR = FPR = 0.5 at t = 0.6
    eer, _ = equal_error_rate(roc_curve([0.9, 0.5, 0.6, 0.1], [True, True, False, False]))
    assert eer == pytest.approx(0.5)
    # between ROC points: genuine {0.9, 0.8, 0.3}, impostor {0.7, 0.2}:
    # (fpr, fnr) goes (0, 1/3) at t=0.8 -> (1/2, 1/3) at t=0.7; the crossing on that segment is fpr = 1/3
    eer, thr = equal_error_rate(roc_curve([0.9, 0.8, 0.3, 0.7, 0.2], [True, True, True, False, False]))
    assert eer == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.8 + (2 / 3) * (0.7 - 0.8))


def test_eer_matches_brentq_reference():
    scores, issame = _scores(4, ties=False)
    fpr, tpr, _ = sk_roc_curve(issame, scores)
    reference = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert equal_error_rate(roc_curve(scores, issame))[0] == pytest.approx(reference, abs=1e-9)


# ------------------------------------------------------------------------------------- 10-fold accuracy


def test_separable_scores_give_accuracy_one():
    rng = np.random.default_rng(5)
    issame = rng.random(600) < 0.5
    scores = np.where(issame, rng.uniform(0.5, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    result = verification_metrics_from_scores(scores, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert len(result.fold_accuracies) == 10
    assert result.auc == 1.0 and result.eer == 0.0
    for thr in result.fold_thresholds:  # every threshold separates the two groups
        assert scores[~issame].max() < thr < scores[issame].min()


def test_kfold_constructed_case_with_known_thresholds():
    # 10 folds of 4 pairs: genuine 0.8, 0.6 and impostor 0.4, 0.2; fold 0's second genuine is a hard 0.3.
    fold = [0.8, 0.6, 0.4, 0.2]
    scores = np.array([[0.8, 0.3, 0.4, 0.2]] + [fold] * 9).reshape(-1)
    issame = np.tile([True, True, False, False], 10)
    accs, thrs = kfold_accuracy(scores, issame, nfolds=10)
    # Any training set: thresholds in (0.4, 0.6) make at most the one 0.3 error, the best possible; the
    # lowest best candidate is the midpoint 0.5. Fold 0 then misses its 0.3 genuine: 3/4; the others: 4/4.
    assert thrs == pytest.approx([0.5] * 10)
    assert accs == pytest.approx([0.75] + [1.0] * 9)
    result = verification_metrics_from_scores(scores, issame)
    assert result.accuracy == pytest.approx(0.975)
    assert result.accuracy_std == pytest.approx(0.25 * math.sqrt(0.1 * 0.9))  # population std of {0.75, 1 x 9}
    assert result.threshold == pytest.approx(0.5)


def _brute_force_kfold(scores, issame, splits):
    """Reference: for each split try every midpoint threshold on the training pairs, keep the first best."""
    accs = []
    for train, test in splits:
        distinct = np.unique(scores[train])
        cands = np.r_[distinct[0] - 1, (distinct[:-1] + distinct[1:]) / 2, distinct[-1] + 1]
        train_acc = [np.mean((scores[train] >= t) == issame[train]) for t in cands]
        best = cands[int(np.argmax(train_acc))]
        accs.append(np.mean((scores[test] >= best) == issame[test]))
    return accs


@pytest.mark.parametrize("seed", [6, 7])
def test_kfold_matches_brute_force_with_sklearn_kfold(seed):
    scores, issame = _scores(seed, n=605)  # 605 pairs: uneven folds (first five have 61)
    accs, _ = kfold_accuracy(scores, issame, nfolds=10)
    reference = _brute_force_kfold(scores, issame, KFold(n_splits=10, shuffle=False).split(scores))
    np.testing.assert_allclose(accs, reference)


def test_kfold_honours_given_folds():
    scores, issame = _scores(8, n=400)
    folds = np.random.default_rng(8).integers(0, 5, 400)
    accs, _ = kfold_accuracy(scores, issame, folds=folds)
    splits = [(np.nonzero(folds != f)[0], np.nonzero(folds == f)[0]) for f in range(5)]
    np.testing.assert_allclose(accs, _brute_force_kfold(scores, issame, splits))


def test_kfold_rejects_bad_inputs():
    with pytest.raises(ValueError, match="nfolds"):
        kfold_accuracy([0.1, 0.2, 0.3], [True, False, True], nfolds=10)
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy([0.1, 0.2], [True, False], folds=[0, 0])
    with pytest.raises(ValueError, match="not finite"):
        kfold_accuracy([0.1, np.nan], [True, False], nfolds=2)


# -------------------------------------------------------------------------------- embeddings in, result out


def test_verification_metrics_from_embeddings():
    rng = np.random.default_rng(9)
    emb1 = rng.normal(size=(300, 16)) * rng.uniform(0.5, 3, (300, 1))
    emb2 = emb1 + rng.normal(size=(300, 16)) * 1.5
    issame = np.arange(300) % 2 == 0
    emb2[~issame] = rng.normal(size=(150, 16))
    reference = np.diag(cosine_similarity(emb1, emb2))
    np.testing.assert_allclose(cosine_scores(emb1, emb2), reference, atol=1e-12)
    result = verification_metrics(emb1, emb2, issame, name="toy")
    assert result.auc == pytest.approx(roc_auc_score(issame, reference))
    assert result.num_genuine == 150 and result.num_impostor == 150 and result.name == "toy"
    assert result.tar_at_far[1e-3] is None and any("1e-03" in n for n in result.notes)
    norms = np.linalg.norm(np.concatenate([emb1, emb2]), axis=1)
    assert result.norm_stats["mean"] == pytest.approx(norms.mean())
    summary = result.to_dict()
    assert summary["tar_at_far"]["1e-03"] is None and "roc" not in summary


def test_feature_norm_stats_closed_form():
    emb = np.array([[3.0, 4.0], [6.0, 8.0], [9.0, 12.0]])  # norms 5, 10, 15
    stats = feature_norm_stats(emb)
    assert stats["count"] == 3 and stats["mean"] == pytest.approx(10.0)
    assert stats["std"] == pytest.approx(math.sqrt(50 / 3))
    assert (stats["min"], stats["p50"], stats["max"]) == pytest.approx((5.0, 10.0, 15.0))
    assert stats["p25"] == pytest.approx(7.5)  # linear interpolation between 5 and 10


# ------------------------------------------------------------------------------------------- identification


def test_cmc_on_constructed_gallery():
    eye = np.eye(6)
    # identity 0 has two gallery images; identities 1..5 one each (basis vectors)
    gallery = np.vstack([eye[0], eye[0] + 0.1 * eye[5], eye[1], eye[2], eye[3], eye[4], eye[5]])
    gallery_labels = np.array([0, 0, 1, 2, 3, 4, 5])
    probe = np.vstack(
        [
            eye[2] + 0.1 * eye[0],  # identity 2: best is 2 -> rank 1
            0.9 * eye[0] + 0.5 * eye[1] + 0.3 * eye[3],  # identity 3: 0 (0.9) and 1 (0.5) beat it -> rank 3
            eye[0] * 0.2 + eye[1] * 0.3 + eye[2] * 0.4 + eye[3] * 0.5 + eye[4] * 0.6 + eye[5] * 0.1,  # id 5: rank 6
            eye[4],  # identity 4: rank 1
            eye[1],  # identity 9: not in the gallery -> skipped
        ]
    )
    probe_labels = np.array([2, 3, 5, 4, 9])
    result = identification_metrics(gallery, gallery_labels, probe, probe_labels)
    # ranks 1, 3, 6, 1 over 4 probes
    np.testing.assert_allclose(result.cmc, [0.5, 0.5, 0.75, 0.75, 0.75, 1.0])
    assert result.rank1 == 0.5 and result.rank5 == 0.75
    assert result.num_probes == 4 and result.num_skipped == 1


def test_cmc_ties_count_against_the_probe():
    gallery = np.eye(3)
    probe = np.array([[1.0, 1.0, 0.0]])  # identities 0 and 1 tie
    assert identification_metrics(gallery, [0, 1, 2], probe, [1]).rank1 == 0.0
    assert identification_metrics(gallery, [0, 1, 2], probe, [1]).cmc[1] == 1.0


def test_cmc_matches_plain_loop_in_chunks():
    rng = np.random.default_rng(10)
    gallery, gallery_labels = rng.normal(size=(60, 8)), rng.integers(0, 25, 60)
    probe, probe_labels = rng.normal(size=(40, 8)), rng.choice(np.unique(gallery_labels), 40)
    result = identification_metrics(gallery, gallery_labels, probe, probe_labels, chunk_size=7)
    ids = np.unique(gallery_labels)
    sims = cosine_similarity(probe, gallery)
    ranks = []
    for p in range(40):
        best = {i: max(sims[p, g] for g in range(60) if gallery_labels[g] == i) for i in ids}
        ranks.append(sum(1 for i in ids if best[i] >= best[probe_labels[p]]))
    np.testing.assert_allclose(result.cmc, [np.mean(np.array(ranks) <= k) for k in range(1, ids.size + 1)])


def test_unmeasurable_far_note_is_logged_once_per_process(caplog):
    import logging
    import uuid

    from distrib_face.eval.metrics import verification_metrics_from_scores

    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0  # 20 impostor pairs: FAR 1e-2 and below cannot be measured
    scores = rng.normal(issame.astype(float), 1.0)
    name = f"set-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.INFO, logger="distrib_face.eval.metrics"):
        results = [verification_metrics_from_scores(scores, issame, name=name) for _ in range(3)]
    notes = [r for r in caplog.records if "not measurable" in r.getMessage() and r.levelno == logging.INFO]
    assert len(notes) == 1 and name in notes[0].getMessage()
    assert all(any("not measurable" in n for n in r.notes) for r in results)  # every result keeps its note


def test_the_unmeasurable_far_note_is_logged_once_per_process(caplog, monkeypatch):
    import logging

    import distrib_face.eval.metrics as metrics

    monkeypatch.setattr(metrics, "_logged_notes", set())  # what earlier tests in this process logged
    rng = np.random.default_rng(3)
    emb1, emb2 = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    issame = np.arange(40) % 2 == 0
    num_impostor = int(np.count_nonzero(~issame))  # 20: FAR 1e-3 needs 1000 impostor pairs, 1e-1 only 10
    with caplog.at_level(logging.DEBUG, logger="distrib_face.eval.metrics"):
        first = verification_metrics(emb1, emb2, issame, far_targets=(1e-1, 1e-3), name="tiny")
        second = verification_metrics(emb1, emb2, issame, far_targets=(1e-1, 1e-3), name="tiny")
    notes = [r for r in caplog.records if "not measurable" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.INFO, logging.DEBUG]  # one INFO line, the repeat at DEBUG
    assert notes[0].getMessage().startswith("tiny: TAR@FAR=1e-03 not measurable")
    assert f"{num_impostor} impostor pairs" in notes[0].getMessage()
    # The results keep their note each time, and the measurable FAR is measured.
    assert first.notes == second.notes and len(first.notes) == 1
    assert first.tar_at_far[1e-3] is None and second.tar_at_far[1e-3] is None
    assert first.tar_at_far[1e-1] is not None
