"""Patch and patient embeddings of the DrasCLR encoder, and their writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from drasclr_ext import __version__
from drasclr_ext.fileio import atomic_save_npy, atomic_write_json
from drasclr_ext.quality import scan_quality


class PatchEmbeddingInferer:
    """Encode a subject's anatomical patches: ``patch_embeddings`` (L, rep_dim) and their mean ``patient_embedding``.

    Args:
        network: a :class:`~drasclr_ext.networks.DrasCLRFeatures` (``forward(x, loc) -> h``).
        device: where the network runs.
        batch_size: patches per forward pass.
        patches_key: key of the (L, 32, 32, 32) patches in [-1, 1].
        locations_key: key of the (L, 3) normalised locations.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        device: str | torch.device = "cpu",
        batch_size: int = 128,
        patches_key: str = "patches",
        locations_key: str = "locations",
    ) -> None:
        self.network = network
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.patches_key = patches_key
        self.locations_key = locations_key

    @torch.no_grad()
    def embed(self, patches: np.ndarray, locations: np.ndarray) -> np.ndarray:
        self.network.eval()
        x = torch.as_tensor(np.asarray(patches), dtype=torch.float32)
        loc = torch.as_tensor(np.asarray(locations), dtype=torch.float32)
        if x.ndim == 4:
            x = x[:, None]
        out = [
            self.network(x[i : i + self.batch_size].to(self.device), loc[i : i + self.batch_size].to(self.device))
            for i in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(out).float().cpu().numpy()

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d["patch_embeddings"] = self.embed(d[self.patches_key], d[self.locations_key])
        d["patient_embedding"] = d["patch_embeddings"].mean(axis=0)
        return d


class EmbeddingWriter:
    """Write a subject's embeddings as .npy files and describe them in ``manifest.json`` (written last).

    Args:
        model_info: facts about the model to record (e.g. bundle version, weights sha256).
    """

    FILES = {
        "patch_embeddings": "encoder representation h of each landmark patch (L, rep_dim)",
        "patient_embedding": "mean of the patch embeddings (rep_dim,)",
        "locations": "normalised atlas coordinate of each landmark (L, 3)",
        "centres_world": "patch centres in the scan's RAS world coordinates, mm (L, 3)",
    }

    def __init__(self, model_info: Mapping[str, Any] | None = None) -> None:
        self.model_info = dict(model_info or {})

    def __call__(self, data: Mapping[str, Any], subject_dir: Path) -> Path:
        subject_dir = Path(subject_dir)
        files = {}
        for key, description in self.FILES.items():
            if key not in data:
                continue
            array = np.asarray(data[key], dtype=np.float32)  # atomic_save_npy refuses NaN or infinite values
            atomic_save_npy(subject_dir / f"{key}.npy", array)
            files[key] = {"file": f"{key}.npy", "shape": list(array.shape), "dtype": "float32"}
            files[key]["description"] = description
        registration = data.get("registration")
        image = data.get("image")
        manifest = {
            "subject": data.get("subject", subject_dir.name),
            "input": str(getattr(image, "meta", {}).get("filename_or_obj", data.get("image_path", ""))),
            "files": files,
            "quality": scan_quality(image) if hasattr(image, "affine") else [],
            "registration_dice": getattr(registration, "dice", None),
            "drasclr_ext_version": __version__,
            "model": self.model_info,
        }
        return atomic_write_json(subject_dir / "manifest.json", manifest)
