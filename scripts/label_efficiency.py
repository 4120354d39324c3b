"""Label efficiency of the emphysema bundle: fine-tune from the pretrained DrasCLR encoder and from scratch with
10 %, 25 %, 50 % and 100 % of the labelled training phantoms, and score each on the same held-out phantoms.

Every run is the bundle's own ``configs/train.json`` (``label_fraction``, ``init_from``) with the same number of
iterations, followed by its ``configs/evaluate.json`` on the test phantoms (per-class voxel Dice, as in
``metrics.json``). The subsets are nested (10 % inside 25 % ...), the same for both initialisations.

    python scripts/label_efficiency.py --workdir /tmp/drasclr_le --n-train 20 --n-test 6 --iterations 100 \\
        --json docs/label_efficiency.json

Prints a Markdown table (test Dice per class and mean, for each fraction and initialisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from drasclr_ext.data.labelled import PreprocessedSubjects, labelled_subjects
from drasclr_ext.data.phantom import write_phantom_cohort
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.metrics.subtype import CLASSES

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "drasclr_emphysema_subtype"


def cohort(workdir: Path, n_train: int, n_test: int, seed: int, resolution_scale: float) -> Path:
    """Phantoms ``seed ..`` split into training (the first ``n_train``) and test; returns the datalist."""
    folder = workdir / "cohort"
    write_phantom_cohort(folder, n=n_train + n_test, seed=seed, resolution_scale=resolution_scale)
    entries = json.loads((folder / "datalist.json").read_text())
    everything = sorted(entries["training"] + entries["validation"] + entries["test"], key=lambda e: e["image"])
    split = {"training": everything[:n_train], "test": everything[n_train:]}
    path = folder / "label_efficiency_datalist.json"
    atomic_write_json(path, split)
    return path


def workflow(files: list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    return wf


def run_one(args, datalist: Path, test_set, init: str, fraction: float) -> dict[str, Any]:
    out = args.workdir / "runs" / f"{init}_{int(fraction * 100):03d}"
    weights = out / "model.pt"
    common = {"dataset_dir": str(datalist), "ckpt_path": str(weights), "cache_dir": str(args.workdir / "cache")}
    start = time.perf_counter()
    train = workflow(
        ["train.json"],
        "train",
        output_dir=str(out),
        label_fraction=fraction,
        init_from=init,
        seed=args.seed,
        max_epochs=1,
        epoch_length=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        **{"validate#subjects": []},
        **common,
    )
    train.run()
    train.finalize()
    train_s = time.perf_counter() - start
    evaluate = workflow(
        ["train.json", "evaluate.json"],
        "infer",
        output_dir=str(out / "test"),
        overlap=args.eval_overlap,
        **{"validate#dataset": test_set},
        **common,
    )
    evaluate.run()
    evaluate.finalize()
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    subjects = len(labelled_subjects(datalist, "training", fraction, args.seed))
    row = {"init": init, "label_fraction": fraction, "training_subjects": subjects, "train_seconds": round(train_s, 1)}
    row.update({f"dice_{c}": metrics[f"dice_{c}"] for c in CLASSES})
    row.update({k: metrics[k] for k in ("mean_dice", "mean_emphysema_dice", "laa950_mae_pp")})
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    head = "| labelled training phantoms | encoder init | " + " | ".join(f"Dice {c}" for c in CLASSES)
    lines = [head + " | mean Dice | mean emphysema Dice |", "|---" * (len(CLASSES) + 4) + "|"]
    for r in sorted(rows, key=lambda r: (r["label_fraction"], r["init"] != "pretrained")):
        cells = [f"{int(r['label_fraction'] * 100)} % ({r['training_subjects']})", r["init"]]
        cells += [fmt(r[f"dice_{c}"]) for c in CLASSES] + [fmt(r["mean_dice"]), fmt(r["mean_emphysema_dice"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/drasclr_label_efficiency"))
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--resolution-scale", type=float, default=2.0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--inits", nargs="+", default=["pretrained", "scratch"])
    parser.add_argument("--iterations", type=int, default=100, help="training iterations of every run")
    parser.add_argument("--batch-size", type=int, default=2, help="subjects per batch (train.json's batch_size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-overlap", type=float, default=0.25, help="window overlap of the test inference")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    datalist = cohort(args.workdir, args.n_train, args.n_test, args.seed, args.resolution_scale)
    parsed = workflow(["train.json"], "train", dataset_dir=str(datalist), output_dir=str(args.workdir / "prep"))
    test_set = PreprocessedSubjects(
        labelled_subjects(datalist, "test"), parsed.parser.get_parsed_content("preprocessing")
    )
    rows = []
    for fraction in args.fractions:
        for init in args.inits:
            rows.append(run_one(args, datalist, test_set, init, fraction))
    result = {
        "command": "python scripts/label_efficiency.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None
        ),
        "rows": rows,
    }
    if args.json:
        atomic_write_json(args.json, result)
    print(markdown(rows))


if __name__ == "__main__":
    main()
