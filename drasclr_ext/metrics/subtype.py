"""Scores of dense emphysema subtype maps against voxel ground truth (validation and ``evaluate.json``).

Per class c (normal, centrilobular, paraseptal, panlobular), over all subjects together:

- **Dice** (voxels): ``2 TP / (2 TP + FP + FN)`` over the voxels that either map calls lung, summed over subjects
  (a class absent from one subject still counts where it is present elsewhere). ``mean_dice`` averages the classes
  that occur; ``mean_emphysema_dice`` the three subtypes only.
- **F1 and AUC** (lung zones): each lung's upper, middle and lower third (``lung_regions`` of the predicted lung
  mask) is one sample per subject. Class c is *present* in a zone when it covers at least ``presence_fraction`` of
  the zone's lung voxels: in the ground truth (among the label map's lung voxels in the zone) and in the
  prediction (among the predicted lung voxels). F1 compares the two; AUC ranks zones by the mean predicted
  probability of c. A class present in every zone or in none has no AUC (``None``).
- **LAA-950 and subtype-fraction errors** (subjects): LAA-950 inside the bundle's lung mask against LAA-950 inside
  the ground-truth lung; each class's share of the lung in the predicted map against the label map.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from drasclr_ext.geometry import array_and_affine
from drasclr_ext.metrics.emphysema import SUBTYPE_NAMES, laa950_percent, lung_regions

__all__ = ["SubtypeMetric", "SubtypeScores"]

CLASSES = tuple(SUBTYPE_NAMES.values())
ZONES = tuple(f"{side}_{zone}" for side in ("right", "left") for zone in ("upper", "middle", "lower"))


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (ties count half); None without both positives and negatives."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    pos, neg = np.asarray(scores)[positive], np.asarray(scores)[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (n_pos * n_neg)


class SubtypeScores:
    """Accumulates subjects with :meth:`add`; :meth:`compute` gives the scores of the module docstring."""

    def __init__(self, presence_fraction: float = 0.01) -> None:
        self.presence_fraction = float(presence_fraction)
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros((len(CLASSES), 3), dtype=np.int64)  # tp, fp, fn per class
        self.zone_truth: list[np.ndarray] = []  # (C,) present in the ground truth
        self.zone_pred: list[np.ndarray] = []  # (C,) present in the prediction
        self.zone_score: list[np.ndarray] = []  # (C,) mean predicted probability
        self.subjects: list[dict[str, Any]] = []

    def add(
        self,
        subject: str,
        pred_label: Any,
        pred_prob: Any,
        true_label: Any,
        hu: Any,
        lung_mask: Any,
        affine: Any,
    ) -> dict[str, Any]:
        """Score one subject (all volumes on one grid: (X, Y, Z), probabilities (C, X, Y, Z)); returns its row."""
        pred = np.asarray(pred_label).reshape(np.shape(true_label)[-3:])
        truth = np.asarray(true_label).reshape(pred.shape)
        lung = np.asarray(lung_mask).reshape(pred.shape)
        prob = np.asarray(pred_prob, dtype=np.float32)
        hu = np.asarray(hu).reshape(pred.shape)
        considered = (pred > 0) | (truth > 0)
        p, t = pred[considered], truth[considered]
        dice = {}
        for i, value in enumerate(SUBTYPE_NAMES):
            tp = int(np.count_nonzero((p == value) & (t == value)))
            fp = int(np.count_nonzero((p == value) & (t != value)))
            fn = int(np.count_nonzero((t == value) & (p != value)))
            self.counts[i] += (tp, fp, fn)
            dice[CLASSES[i]] = _ratio(2 * tp, 2 * tp + fp + fn)
        regions = lung_regions(lung, affine)
        for zone in ZONES:
            region = regions[zone]
            n_pred = int(np.count_nonzero(region))
            truth_zone = truth[region]
            n_true = int(np.count_nonzero(truth_zone))
            if not n_pred or not n_true:
                continue
            pred_zone = pred[region]
            self.zone_truth.append(
                np.array([np.count_nonzero(truth_zone == v) / n_true >= self.presence_fraction for v in SUBTYPE_NAMES])
            )
            self.zone_pred.append(
                np.array([np.count_nonzero(pred_zone == v) / n_pred >= self.presence_fraction for v in SUBTYPE_NAMES])
            )
            self.zone_score.append(prob[:, region].mean(axis=1))
        lung_pred, lung_true = pred > 0, truth > 0
        row = {
            "subject": subject,
            "laa950_percent": laa950_percent(hu, lung) if lung.any() else None,
            "laa950_percent_truth": laa950_percent(hu, lung_true) if lung_true.any() else None,
            "subtype_fractions": {
                c: _ratio(np.count_nonzero(pred == v), np.count_nonzero(lung_pred)) for v, c in SUBTYPE_NAMES.items()
            },
            "subtype_fractions_truth": {
                c: _ratio(np.count_nonzero(truth == v), np.count_nonzero(lung_true)) for v, c in SUBTYPE_NAMES.items()
            },
            "dice": dice,
        }
        self.subjects.append(row)
        return row

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subjects_scored": len(self.subjects)}
        tp, fp, fn = self.counts.T
        dice = [_ratio(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn)]
        truth = np.array(self.zone_truth).reshape(-1, len(CLASSES))
        pred = np.array(self.zone_pred).reshape(-1, len(CLASSES))
        score = np.array(self.zone_score).reshape(-1, len(CLASSES))
        f1, auc = [], []
        for i, name in enumerate(CLASSES):
            z_tp = int(np.count_nonzero(truth[:, i] & pred[:, i]))
            z_fp = int(np.count_nonzero(~truth[:, i] & pred[:, i]))
            z_fn = int(np.count_nonzero(truth[:, i] & ~pred[:, i]))
            f1.append(_ratio(2 * z_tp, 2 * z_tp + z_fp + z_fn))
            auc.append(roc_auc(score[:, i], truth[:, i]))
            out[f"dice_{name}"], out[f"f1_{name}"], out[f"auc_{name}"] = dice[i], f1[-1], auc[-1]
        out["mean_dice"] = _mean(dice)
        out["mean_emphysema_dice"] = _mean(dice[1:])
        out["mean_f1"] = _mean(f1)
        out["mean_auc"] = _mean(auc)
        out["zones_scored"] = len(truth)
        laa = [(s["laa950_percent"], s["laa950_percent_truth"]) for s in self.subjects]
        laa = np.array([(a, b) for a, b in laa if a is not None and b is not None], dtype=np.float64).reshape(-1, 2)
        out["laa950_mae_pp"] = float(np.abs(laa[:, 0] - laa[:, 1]).mean()) if len(laa) else None
        out["laa950_bias_pp"] = float((laa[:, 0] - laa[:, 1]).mean()) if len(laa) else None
        for name in CLASSES:
            errors = [
                abs(s["subtype_fractions"][name] - s["subtype_fractions_truth"][name])
                for s in self.subjects
                if s["subtype_fractions"][name] is not None and s["subtype_fractions_truth"][name] is not None
            ]
            out[f"fraction_mae_{name}"] = float(np.mean(errors)) if errors else None
        return out


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def subject_output(output: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(inferer result, ground-truth label map) from a :class:`~monai.engines.SupervisedEvaluator` output."""
    return output["pred"], output["label"]


class SubtypeMetric(Metric):
    """Ignite metric over subjects of the dense workflow (see the module docstring).

    Each engine output holds ``pred``: the dense inferer's data dict (``subtype_label``, ``subtype_prob``,
    ``image``, ``lung_mask``, ``subject``) and ``label``: the ground-truth label map on the same grid.

    Args:
        key: return only this score (e.g. ``"mean_dice"`` for a key metric); None returns every score, with
            ``prefix``. The per-subject rows stay in ``scores.subjects``.
        prefix: prefix of the score names when ``key`` is None or ``all_scores`` is set.
        presence_fraction: share of a zone's lung that makes a class present (F1 and AUC).
        output_transform: engine output -> (pred dict, label).
        all_scores: with ``key``, also put every score (with ``prefix``) into ``engine.state.metrics`` when the
            epoch completes: one key metric that scores each subject once and reports everything.
    """

    def __init__(
        self,
        key: Optional[str] = None,
        prefix: str = "",
        presence_fraction: float = 0.01,
        output_transform: Callable[[Any], Any] = subject_output,
        all_scores: bool = False,
    ) -> None:
        self.key, self.prefix, self.all_scores = key, prefix, bool(all_scores)
        self.scores = SubtypeScores(presence_fraction)
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.scores.reset()

    def update(self, output: tuple[dict[str, Any], Any]) -> None:
        pred, truth = output
        # LAA-950 on the raw scan, as in the report (the model may have seen it noise-harmonised)
        hu, affine = array_and_affine(pred.get("image_raw", pred["image"]))
        lung, _ = array_and_affine(pred["lung_mask"], affine, "lung mask")
        label, prob, truth = (_numpy(x) for x in (pred["subtype_label"], pred["subtype_prob"], truth))
        self.scores.add(str(pred.get("subject", len(self.scores.subjects))), label, prob, truth, hu, lung, affine)

    def _named_scores(self) -> dict[str, float]:
        # undefined scores are NaN here (ignite, the stats handlers and TensorBoard want numbers; JSON gets null)
        return {f"{self.prefix}{k}": (math.nan if v is None else v) for k, v in self.scores.compute().items()}

    def compute(self) -> Any:
        if self.key is not None:
            value = self.scores.compute()[self.key]
            return math.nan if value is None else value
        return self._named_scores()

    def completed(self, engine: Engine, name: str) -> None:
        if self.key is None or not self.all_scores:
            super().completed(engine, name)
            return
        scores = self._named_scores()  # computed once for the key metric and every other score
        engine.state.metrics.update(scores)
        engine.state.metrics[name] = scores[f"{self.prefix}{self.key}"]
