"""Linear probe: how much emphysema information do frozen DrasCLR patient embeddings carry?

Fits ridge regression on patient embeddings (mean of the patch embeddings) of held-out phantoms to predict
LAA-950 and the per-subtype volume fractions (R^2 of out-of-fold predictions, k-fold cross-validation with the
ridge penalty chosen inside each training fold), and scores emphysema present/absent (any labelled emphysema) with
the same linear model (AUC). It compares the given weights with a randomly initialised encoder.

    drasclr phantom --out probe_phantoms --n 40 --seed 5000
    drasclr preprocess --datalist probe_phantoms/datalist.json --out probe_pre
    python scripts/linear_probe.py --preprocessed probe_pre --phantoms probe_phantoms \
        --weights bundles/drasclr_lung_ct_ssl/models/model.pt --json probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from drasclr_ext.checkpoint import encoder_config, load_encoder
from drasclr_ext.data.patch_store import finished_subjects
from drasclr_ext.inference.embeddings import PatchEmbeddingInferer
from drasclr_ext.networks import DrasCLRFeatures

TARGETS = ("laa950_percent", "centrilobular", "paraseptal", "panlobular")
ALPHAS = np.logspace(-3, 4, 15)


def load_truth(phantoms: Path, subject: str) -> dict[str, float]:
    case = subject[: -len("_image")] if subject.endswith("_image") else subject
    info = json.loads((phantoms / f"{case}.json").read_text())
    fractions = info["subtype_fractions"]
    return {
        "laa950_percent": float(info["laa950_percent"]),
        **{name: float(fractions[name]) for name in TARGETS[1:]},
        "emphysema_present": float(fractions["normal"] < 1.0),
    }


def patient_embeddings(network: torch.nn.Module, preprocessed: Path, subjects: list[str]) -> np.ndarray:
    inferer = PatchEmbeddingInferer(network, batch_size=32)
    rows = []
    for name in subjects:
        patches = np.load(preprocessed / name / "patches.npy").astype(np.float32)
        rows.append(inferer.embed(patches, np.load(preprocessed / name / "locations.npy")).mean(axis=0))
    return np.stack(rows)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return w, mean_y - mean_x @ w


def loo_error(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Leave-one-out squared error of ridge regression in closed form (hat-matrix shortcut)."""
    xc = np.hstack([x - x.mean(0), np.ones((len(x), 1))])
    penalty = alpha * np.eye(xc.shape[1])
    penalty[-1, -1] = 0.0
    hat = xc @ np.linalg.solve(xc.T @ xc + penalty, xc.T)
    residual = (y - hat @ y) / np.clip(1 - np.diag(hat), 1e-6, None)
    return float(np.mean(residual**2))


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(y))
    prediction = np.zeros_like(y)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        xt, xf = (x[train] - mean) / std, (x[fold] - mean) / std
        alpha = min(ALPHAS, key=lambda a: loo_error(xt, y[train], a))
        w, b = ridge_fit(xt, y[train], alpha)
        prediction[fold] = xf @ w + b
    return prediction


def r2(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(1 - np.sum((y - prediction) ** 2) / np.sum((y - y.mean()) ** 2))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (probability that a positive outscores a negative, ties counted half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def probe(x: np.ndarray, truth: dict[str, np.ndarray], folds: int, seed: int) -> dict[str, float]:
    scores = {f"r2_{name}": r2(truth[name], out_of_fold(x, truth[name], folds, seed)) for name in TARGETS}
    present = truth["emphysema_present"]
    scores["auc_emphysema_present"] = auc(present, out_of_fold(x, present, folds, seed))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", type=Path, required=True, help="output of drasclr preprocess")
    parser.add_argument("--phantoms", type=Path, required=True, help="output of drasclr phantom (ground truth)")
    parser.add_argument("--weights", type=Path, required=True, help="encoder weights (bundle model.pt)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder and of the folds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    subjects = finished_subjects(args.preprocessed)
    truth_rows = [load_truth(args.phantoms, s) for s in subjects]
    truth = {k: np.array([row[k] for row in truth_rows]) for k in truth_rows[0]}
    pretrained = DrasCLRFeatures(**encoder_config(load_encoder(args.weights).state_dict()))
    pretrained.load_state_dict(load_encoder(args.weights).state_dict())
    torch.manual_seed(args.seed)
    random_init = DrasCLRFeatures()
    results = {"subjects": len(subjects), "emphysema_present": int(truth["emphysema_present"].sum())}
    for name, network in (("pretrained", pretrained), ("random_init", random_init)):
        results[name] = probe(patient_embeddings(network, args.preprocessed, subjects), truth, args.folds, args.seed)
    header = f"{'':14s}" + "".join(f"{k:>26s}" for k in results["pretrained"])
    print(f"linear probe on {len(subjects)} held-out phantoms ({results['emphysema_present']} with emphysema)")
    print(header)
    for name in ("pretrained", "random_init"):
        print(f"{name:14s}" + "".join(f"{v:26.3f}" for v in results[name].values()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
