"""The two augmented views of DrasCLR pretraining, and one shared augmentation of the neighbour patches."""

from __future__ import annotations

import math
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, RandAdjustContrast, RandAffine, RandGaussianNoise, Randomizable

# the scale of patches in [-1, 1]: (HU + 1024) / 632 - 1
HU_PER_UNIT = 632.0


def patch_augmentation(
    translate: float = 12.0,
    rotate_degrees: float = 10.0,
    scale: float = 0.1,
    noise_prob: float = 0.25,
    noise_std_hu: float = 50.0,
    contrast_prob: float = 0.25,
    contrast_gamma: tuple[float, float] = (0.7, 1.5),
) -> Compose:
    """The augmentation of REFERENCE.md for one view: random affine (always), Gaussian noise, contrast."""
    rotate = math.radians(rotate_degrees)
    return Compose(
        [
            RandAffine(
                prob=1.0,
                rotate_range=(rotate, rotate, rotate),
                translate_range=(translate, translate, translate),
                scale_range=(scale, scale, scale),
                mode="bilinear",
                padding_mode="border",
            ),
            RandGaussianNoise(prob=noise_prob, std=noise_std_hu / HU_PER_UNIT),
            RandAdjustContrast(prob=contrast_prob, gamma=contrast_gamma),
        ]
    )


class ContrastiveViewsd(Randomizable, MapTransform):
    """Make two independently augmented views ``image_q`` and ``image_k`` of each patch.

    The neighbour patches (k, 1, 32, 32, 32) get one augmentation shared by all k of them, as in the reference.

    Args:
        keys: the patch key (C, 32, 32, 32).
        view_keys: output keys of the two views.
        neighbour_key: key of the neighbour patches, augmented in place when present.
        allow_missing_keys: don't fail when ``keys`` are absent.
        augmentation_kwargs: arguments of :func:`patch_augmentation`.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        view_keys: tuple[str, str] = ("image_q", "image_k"),
        neighbour_key: str | None = "neighbour_images",
        allow_missing_keys: bool = False,
        **augmentation_kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.view_keys = view_keys
        self.neighbour_key = neighbour_key
        self.augment = patch_augmentation(**augmentation_kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.augment.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            patch = torch.as_tensor(d[key], dtype=torch.float32)
            d[self.view_keys[0]] = torch.as_tensor(self.augment(patch)).float()
            d[self.view_keys[1]] = torch.as_tensor(self.augment(patch)).float()
        if self.neighbour_key is not None and self.neighbour_key in d:
            neighbours = torch.as_tensor(d[self.neighbour_key], dtype=torch.float32)
            k = neighbours.shape[0]
            shared = torch.as_tensor(self.augment(neighbours.reshape(k, *neighbours.shape[2:]))).float()
            d[self.neighbour_key] = shared.reshape(neighbours.shape)
        return d
