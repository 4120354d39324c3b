"""Train the dense emphysema model in one timed run on a GPU machine, from phantoms generated there.

Made for a lent GPU machine (no ITK, no network, one command of at most 10 minutes): worker processes generate
full-resolution phantoms and resample them onto their 1 mm atlas grids while the GPU trains on the grids that are
ready, so the cohort grows during the run. Everything else is the bundle's own: ``train.json``'s network, loss,
crops and augmentation, the pretrained encoder, sliding-window validation. Registration uses
``AtlasRegistration(method="moments")`` (no ITK), which agrees with the ITK registration to 0.2 mm mean on phantoms.

- Grids as ``train.json`` makes them (lung mask, noise harmonisation, atlas grid), without ITK.
- Training seeds: from ``--train-start`` on, balanced by subtype mix (see :func:`training_seeds`).
- Validation seeds: ``--val-seeds`` (by default 1900-1999, chosen so every subtype appears), never trained on.
- The held-out test phantoms (9000-9015) are never generated here: evaluate the result with ``evaluate.json``.

Outputs in ``--out``: ``model_best_<i>.pt`` (the state dict of the best validation, in shards under 16 MB for the
device's file limit; ``--merge`` joins them), ``train_log.json`` (settings, seeds, per-validation scores, speed).

GPU run:       python scripts/train_dense_device.py --out $OUT --minutes 9
Thick slices:  python scripts/train_dense_device.py --out $OUT --minutes 9 --init bundle --lr 5e-4 \
                   --thick-every 3 --thick-mm 5   # fine-tune the shipped model with every third phantom at 5 mm
CPU rehearsal: python scripts/train_dense_device.py --out /tmp/dev --minutes 2 --resolution-scale 2.5 \
                   --gen-workers 1 --load-workers 1 --batch-size 2 --min-ready 2 --val-per-mix 1
Join shards:   python scripts/train_dense_device.py --merge /path/to/out --to bundles/.../models/model.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's drasclr_ext, installed or not
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "drasclr_emphysema_subtype"
MIXES = ("centrilobular", "paraseptal", "panlobular", "centrilobular+paraseptal", "centrilobular+panlobular")
SHARD_BYTES = 14 * 2**20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def training_seeds(start: int, count: int, max_healthy: float = 0.15, max_cle: float = 0.3) -> list[int]:
    """``count`` seeds from ``start`` on, skipping healthy subjects beyond ``max_healthy`` of those kept and pure
    centrilobular ones beyond ``max_cle``, so paraseptal and panlobular subjects are common."""
    from drasclr_ext.data.phantom import draw_subject

    kept: list[int] = []
    healthy = cle = 0
    seed = start
    while len(kept) < count:
        s = draw_subject(seed, resolution_scale=1.0)
        is_healthy, is_cle = s.emphysema_fraction == 0, s.subtype_mix == "centrilobular"
        if not (is_healthy and healthy + 1 > max_healthy * (len(kept) + 1)) and not (
            is_cle and cle + 1 > max_cle * (len(kept) + 1)
        ):
            kept.append(seed)
            healthy += is_healthy
            cle += is_cle
        seed += 1
    return kept


def validation_seeds(start: int, per_mix: int) -> list[int]:
    """``per_mix`` non-healthy seeds of every subtype mix, from ``start`` on."""
    from drasclr_ext.data.phantom import draw_subject

    found: dict[str, list[int]] = {m: [] for m in MIXES}
    seed = start
    while any(len(v) < per_mix for v in found.values()):
        s = draw_subject(seed, resolution_scale=1.0)
        if s.emphysema_fraction > 0 and len(found[s.subtype_mix]) < per_mix:
            found[s.subtype_mix].append(seed)
        seed += 1
        if seed > start + 10_000:
            raise RuntimeError("could not find validation seeds of every subtype mix")
    return sorted(s for v in found.values() for s in v)


def thick_slices(seed: int, every: int, mm: float) -> Optional[float]:
    """The slice spacing forced on phantom ``seed``: ``mm`` for every ``every``-th seed (0: never), else None (the
    subject's drawn spacing, 0.625-2.5 mm slices)."""
    return float(mm) if every > 0 and seed % every == 0 else None


def build_grid(
    seed: int, folder: str, resolution_scale: float, window: int, deadline: float, slice_mm: Optional[float] = None
) -> Optional[str]:
    """Generate phantom ``seed`` (with ``slice_mm`` slices when given, its drawn in-plane spacing kept), compute its
    lung mask and (moments) registration, and save its 1 mm atlas grid under ``folder/phantom_<seed>``
    (:func:`~drasclr_ext.data.labelled.save_grid`). Skipped after ``deadline``."""
    out = Path(folder) / f"phantom_{seed:05d}"
    if (out / "done.json").is_file():
        return out.name
    if time.time() > deadline:
        return None
    torch.set_num_threads(1)
    from monai.data import MetaTensor

    from drasclr_ext.data.labelled import labelled_grid, save_grid
    from drasclr_ext.data.phantom import draw_subject, generate_phantom
    from drasclr_ext.transforms.harmonise import HarmoniseNoised
    from drasclr_ext.transforms.lung_mask import LungMask
    from drasclr_ext.transforms.registration import AtlasRegistration

    start = time.time()
    spacing = None
    if slice_mm is not None:
        drawn = draw_subject(seed, resolution_scale=resolution_scale).spacing
        spacing = (drawn[0], drawn[1], slice_mm)
    phantom = generate_phantom(seed, resolution_scale=resolution_scale, spacing=spacing)
    affine = torch.as_tensor(phantom["affine"], dtype=torch.float64)
    image = MetaTensor(torch.from_numpy(phantom["image"])[None], affine=affine)
    label = MetaTensor(torch.from_numpy(phantom["label"])[None], affine=affine)
    lung = LungMask()(image)
    image = HarmoniseNoised("image")({"image": image, "lung_mask": lung})["image"]  # as train.json and inference
    registration = AtlasRegistration("default", method="moments", threads=1)(lung)
    grid = labelled_grid(
        {"image": image, "label": label, "lung_mask": lung, "registration": registration}, "default", min_size=window
    )
    subject = phantom["info"]["subject"]
    info = {k: subject[k] for k in ("seed", "severity", "subtype_mix", "kernel", "spacing")}
    info.update(seconds=round(time.time() - start, 1), registration_dice=round(registration.dice, 4))
    save_grid(out, grid, info)
    return out.name


class GridStream(torch.utils.data.IterableDataset):
    """Endless random crops of the grids in ``folder`` (rescanned every ``rescan_s`` seconds, so grids written
    during training join in), through ``transform`` (``train.json``'s crops and augmentation)."""

    def __init__(self, folder: Path, names: set[str], transform: Any, seed: int = 0, rescan_s: float = 15.0) -> None:
        self.folder, self.names, self.transform = Path(folder), names, transform
        self.seed, self.rescan_s = int(seed), float(rescan_s)

    def _scan(self, items: dict[str, dict]) -> None:
        from monai.transforms import ClassesToIndicesd

        from drasclr_ext.data.labelled import load_grid

        indices = ClassesToIndicesd("label", num_classes=5, max_samples_per_class=100_000)
        for done in sorted(self.folder.glob("phantom_*/done.json")):
            name = done.parent.name
            if name in self.names and name not in items:
                items[name] = indices(load_grid(done.parent))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, worker])
        self.transform.set_random_state(seed=self.seed * 1000 + worker)
        items: dict[str, dict] = {}
        scanned = 0.0
        while True:
            if time.time() - scanned > self.rescan_s:
                self._scan(items)
                scanned = time.time()
            if not items:
                time.sleep(1.0)
                continue
            item = dict(items[list(items)[rng.integers(len(items))]])
            item["image"] = item["image"].float()
            for crop in self.transform(item):
                yield {"image": crop["image"].as_tensor(), "label": crop["label"].as_tensor().to(torch.uint8)}


def bundle_parts(window: int, crops: int) -> dict[str, Any]:
    """Network (pretrained encoder loaded), loss and training transforms, parsed from the bundle's ``train.json``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["window"] = int(window)
    parser["crops_per_subject"] = int(crops)
    return {
        "parser": parser,
        "network": parser.get_parsed_content("network_def"),
        "loss": parser.get_parsed_content("loss"),
        "transform": Compose(parser.get_parsed_content("train#transforms")),
    }


@torch.no_grad()
def validate(network: torch.nn.Module, grids: list[dict], device: torch.device, settings: dict) -> dict[str, Any]:
    """Sliding-window labels of each validation grid vs its truth: per-class Dice pooled over the grids."""
    from monai.inferers import sliding_window_inference

    from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES
    from drasclr_ext.transforms.atlas_grid import AtlasLocationd

    network.eval()
    inter, pred_n, true_n = np.zeros(4), np.zeros(4), np.zeros(4)
    for grid in grids:
        x = AtlasLocationd("image")({**grid, "image": grid["image"].float()})["image"].as_tensor()[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"]):
            logits = sliding_window_inference(
                x,
                (settings["window"],) * 3,
                settings["sw_batch_size"],
                network,
                overlap=settings["overlap"],
                mode="gaussian",
                sigma_scale=settings["sigma_scale"],
            )
        truth = grid["label"].as_tensor()[0].to(device).long()
        pred = logits[0].float().argmax(0) + 1
        inside = truth > 0
        for c in range(4):
            p, t = (pred == c + 1) & inside, truth == c + 1
            inter[c] += float((p & t).sum())
            pred_n[c] += float(p.sum())
            true_n[c] += float(t.sum())
    network.train()
    dice = {
        name: float(2 * inter[c] / (pred_n[c] + true_n[c])) if pred_n[c] + true_n[c] > 0 else float("nan")
        for c, name in enumerate(SUBTYPE_CLASSES)
    }
    return {"dice": dice, "mean_dice": float(np.nanmean(list(dice.values())))}


def save_shards(state: dict[str, torch.Tensor], folder: Path, stem: str) -> list[str]:
    """``state`` as ``<stem>_<i>.pt`` files of at most :data:`SHARD_BYTES` each (written atomically)."""
    from drasclr_ext.checkpoint import save_atomic

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value.detach().cpu().clone()
        size += nbytes
    for old in folder.glob(f"{stem}_*.pt"):
        old.unlink()
    names = []
    for i, shard in enumerate(shards):
        save_atomic(shard, folder / f"{stem}_{i}.pt")
        names.append(f"{stem}_{i}.pt")
    return names


def merge_shards(folder: Path, stem: str = "model_best") -> dict[str, torch.Tensor]:
    """The state dict split by :func:`save_shards` (loaded with ``weights_only=True``)."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(folder).glob(f"{stem}_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise FileNotFoundError(f"no {stem}_<i>.pt shards in {folder}")
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay with the run's elapsed share of its time."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(args: argparse.Namespace) -> dict[str, Any]:
    from drasclr_ext.data.labelled import load_grid
    from drasclr_ext.engines.finetune import initialise, param_groups

    t0 = time.time()
    deadline = t0 + 60.0 * args.minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grids = Path(args.work) / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    val = validation_seeds(args.val_start, args.val_per_mix)
    train_seeds = training_seeds(args.train_start, args.max_train)
    overlap = sorted(set(val) & set(train_seeds))
    if overlap:
        raise RuntimeError(f"validation seeds {overlap} are also training seeds")
    record: dict[str, Any] = {"args": vars(args), "validation_seeds": val, "validations": [], "speed": []}
    log(f"validation seeds {val}; up to {len(train_seeds)} training seeds from {train_seeds[0]}")

    import multiprocessing as mp

    gen_deadline = deadline - args.gen_stop_s
    pool = ProcessPoolExecutor(args.gen_workers, mp_context=mp.get_context("spawn"))
    # the first training grids, then the validation grids, then the rest: training starts as soon as it can
    order = train_seeds[: args.gen_workers] + val + train_seeds[args.gen_workers :]
    futures = {
        s: pool.submit(
            build_grid,
            s,
            str(grids),
            args.resolution_scale,
            args.window,
            gen_deadline,
            thick_slices(s, args.thick_every, args.thick_mm),
        )
        for s in order
    }

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = bundle_parts(args.window, args.crops)
    parser = parts["parser"]
    network = initialise(
        parts["network"],
        args.init,
        BUNDLE / "models" / "pretrained_encoder.pt",
        BUNDLE / "models" / "model.pt",
        str(BUNDLE),
    ).to(device)
    loss_fn = parts["loss"]
    optimizer = torch.optim.AdamW(
        param_groups(network, args.lr, parser["encoder_lr_scale"]), lr=args.lr, weight_decay=parser["weight_decay"]
    )
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    settings = {
        "window": args.window,
        "overlap": float(parser["overlap"]),
        "sigma_scale": float(parser["sigma_scale"]),
        "sw_batch_size": args.sw_batch_size,
        "bf16": device.type == "cuda",
    }
    record["settings"] = settings

    val_items: list[dict] = []  # loaded at the first validation

    def validation_grids() -> list[dict]:
        if not val_items:
            for s in val:
                futures[s].exception()  # waits
                name = _name(futures[s])
                if name is None:
                    log(f"validation phantom {s} failed or came too late; left out")
                    continue
                val_items.append(load_grid(grids / name))
        return val_items

    train_names = {f"phantom_{s:05d}" for s in train_seeds}
    while sum(futures[s].done() for s in train_seeds) < args.min_ready and time.time() < gen_deadline:
        time.sleep(2.0)
    log(f"{sum(futures[s].done() for s in train_seeds)} training grids ready after {time.time() - t0:.0f} s")

    stream = GridStream(grids, train_names, parts["transform"], seed=args.seed)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=args.batch_size,
        num_workers=args.load_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.load_workers > 0 else None,
        persistent_workers=args.load_workers > 0,
    )
    train_end = deadline - args.final_s
    train_start = time.time()
    best = -1.0
    step, windows, loss_sum, loss_n = 0, 0, 0.0, 0
    last_val = last_speed = time.time()
    speed_windows, waited, step_end = 0, 0.0, time.time()
    network.train()
    for batch in loader:
        now = time.time()
        waited += now - step_end
        progress = (now - train_start) / max(train_end - train_start, 1.0)
        if progress >= 1.0:
            break
        factor = lr_factor(step, progress, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"]):
            logits = network(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        windows += x.shape[0]
        speed_windows += x.shape[0]
        loss_sum += float(loss.detach())  # also waits for the GPU: the step's time is real
        loss_n += 1
        step_end = time.time()
        if now - last_speed >= 30.0:
            ready = sum(f.done() for f in futures.values())
            rate = speed_windows / (now - last_speed)
            wait_share = waited / (now - last_speed)
            record["speed"].append(
                {
                    "t": round(now - t0),
                    "windows_per_s": round(rate, 1),
                    "data_wait": round(wait_share, 3),
                    "grids": ready,
                }
            )
            log(
                f"step {step} windows {windows} loss {loss_sum / loss_n:.4f} {rate:.0f} windows/s "
                f"(waiting for data {100 * wait_share:.0f} %), grids {ready}"
            )
            last_speed, speed_windows, loss_sum, loss_n, waited = now, 0, 0.0, 0, 0.0
        if now - last_val >= args.val_every_s:
            best = _validate_and_keep(
                network, validation_grids(), device, settings, record, step, windows, t0, best, out
            )
            last_val = step_end = time.time()
    best = _validate_and_keep(network, validation_grids(), device, settings, record, step, windows, t0, best, out)
    done = sorted(n for n in (_name(futures[s]) for s in train_seeds) if n)
    pool.shutdown(wait=False, cancel_futures=True)
    record.update(
        steps=step,
        windows=windows,
        train_seconds=round(time.time() - train_start),
        training_subjects=[json.loads((grids / n / "done.json").read_text()) for n in done],
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        total_seconds=round(time.time() - t0),
    )
    _write_json(out / "train_log.json", record)
    log(f"done: {step} steps, {windows} windows, {len(done)} training grids, best mean Dice {best:.3f}")
    return record


def _name(future: Any) -> Optional[str]:
    """The grid name of a finished :func:`build_grid` job; None if it is not done, failed (logged) or was skipped."""
    if not future.done() or future.cancelled():
        return None
    if future.exception() is not None:
        log(f"a phantom failed: {future.exception()!r}")
        return None
    return future.result()


def _validate_and_keep(network, val_items, device, settings, record, step, windows, t0, best, out) -> float:
    scores = validate(network, val_items, device, settings)
    scores.update(step=step, windows=windows, t=round(time.time() - t0))
    record["validations"].append(scores)
    dice = " ".join(f"{k[:4]} {v:.3f}" for k, v in scores["dice"].items())
    log(f"validation at step {step}: mean {scores['mean_dice']:.3f} ({dice})")
    if scores["mean_dice"] > best:
        best = scores["mean_dice"]
        record["best"] = scores
        save_shards(network.state_dict(), out, "model_best")
    _write_json(out / "train_log.json", record)
    return best


def _write_json(path: Path, content: dict) -> None:
    from drasclr_ext.fileio import atomic_write_json

    atomic_write_json(path, content)


def merge(args: argparse.Namespace) -> None:
    """Join the shards into the bundle's ``model.pt`` (the bundle's ``large_files.yml`` records its hash) after
    checking they load into the network."""
    from drasclr_ext.handlers import WeightsExporter

    network = bundle_parts(64, 1)["network"]
    network.load_state_dict(merge_shards(Path(args.merge)), strict=True)
    target = Path(args.to).resolve()
    bundle_root = str(BUNDLE) if target.is_relative_to(BUNDLE.resolve()) else None
    WeightsExporter(network, str(target), bundle_root=bundle_root)()
    log(f"wrote {target}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="device_out", help="results (weights shards, train_log.json)")
    ap.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/drasclr_device", help="grid folder")
    ap.add_argument("--minutes", type=float, default=9.0, help="the whole run's time")
    ap.add_argument("--gen-stop-s", type=float, default=150.0, help="no new phantom starts this long before the end")
    ap.add_argument("--final-s", type=float, default=40.0, help="training stops this long before the end")
    ap.add_argument("--resolution-scale", type=float, default=1.0)
    ap.add_argument("--train-start", type=int, default=1000)
    ap.add_argument("--max-train", type=int, default=400)
    ap.add_argument("--val-start", type=int, default=1900)
    ap.add_argument("--val-per-mix", type=int, default=2)
    ap.add_argument("--gen-workers", type=int, default=9)
    ap.add_argument("--load-workers", type=int, default=6)
    ap.add_argument("--min-ready", type=int, default=9, help="training grids to wait for before training starts")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--crops", type=int, default=8, help="crops per subject draw")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per step")
    ap.add_argument("--sw-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--val-every-s", type=float, default=75.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--init",
        default="pretrained",
        choices=("pretrained", "bundle", "scratch"),
        help="start from the pretrained encoder, the bundle's model.pt (fine-tune), or random weights",
    )
    ap.add_argument(
        "--thick-every",
        type=int,
        default=0,
        help="every N-th seed (training and validation) is generated with --thick-mm slices (0: none)",
    )
    ap.add_argument("--thick-mm", type=float, default=5.0, help="slice spacing of the thick-slice phantoms")
    ap.add_argument("--merge", default=None, help="join the shards in this folder into --to and exit")
    ap.add_argument("--to", default=str(BUNDLE / "models" / "model.pt"))
    args = ap.parse_args(argv)
    if args.merge:
        merge(args)
        return
    torch.manual_seed(args.seed)
    train(args)


if __name__ == "__main__":
    main()
