"""Atlas registration: recovery of a known affine, RAS/LPS geometry, JSON round trip, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.atlas import load_atlas
from drasclr_ext.errors import RegistrationError
from drasclr_ext.geometry import apply_affine
from drasclr_ext.transforms import registration
from drasclr_ext.transforms.registration import (
    AtlasRegistration,
    AtlasRegistrationd,
    RegistrationResult,
    _itk_image,
    block_average,
)


def _known_affine() -> np.ndarray:
    theta = np.deg2rad(7.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.08, 0.95, 1.05])
    matrix[:3, 3] = [12.0, -6.0, 25.0]
    return matrix


def _subject_from_atlas(atlas, atlas_to_subject: np.ndarray, spacing=(2.0, 2.0, 3.0)):
    """The atlas mask moved by ``atlas_to_subject`` onto an LPS-ordered grid (as DICOM series are read)."""
    box = np.array(np.meshgrid(*[[0, s - 1] for s in atlas.mask.shape], indexing="ij")).reshape(3, -1).T
    world = apply_affine(atlas_to_subject @ atlas.affine, box)
    lo, hi = world.min(0) - 15, world.max(0) + 15
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [hi[0], hi[1], lo[2]]
    shape = tuple(np.ceil((hi - lo) / np.array(spacing)).astype(int))
    m = np.linalg.inv(atlas.affine) @ np.linalg.inv(atlas_to_subject) @ affine
    mask = ndimage.affine_transform(atlas.mask, m[:3, :3], m[:3, 3], output_shape=shape, order=0)
    return mask * np.uint8(2), affine


@pytest.fixture(scope="module")
def registered():
    atlas = load_atlas("default")
    truth = _known_affine()
    mask, affine = _subject_from_atlas(atlas, truth)
    subject = MetaTensor(torch.from_numpy(mask[None]), affine=torch.from_numpy(affine))
    data = AtlasRegistrationd(keys="lung_mask", atlas=atlas)({"lung_mask": subject})
    return atlas, truth, data["registration"]


def test_registration_recovers_known_affine_at_landmarks(registered):
    atlas, truth, result = registered
    centres = apply_affine(atlas.affine, atlas.centres_voxel)
    error = np.linalg.norm(apply_affine(result.atlas_to_subject, centres) - apply_affine(truth, centres), axis=1)
    assert error.max() < 2.0


def test_registration_reports_high_dice(registered):
    _, _, result = registered
    assert result.dice > 0.9 and result.iterations > 0 and result.seconds > 0
    np.testing.assert_allclose(result.subject_to_atlas @ result.atlas_to_subject, np.eye(4), atol=1e-9)


def test_itk_image_geometry_is_the_ras_affine_in_lps():
    affine = np.array([[-0.7, 0.0, 0.0, 120.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.8, 0.0, 30.0], [0, 0, 0, 1]])
    image = _itk_image(np.zeros((5, 6, 7), np.float32), affine)
    assert tuple(image.GetLargestPossibleRegion().GetSize()) == (5, 6, 7)
    for index in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = apply_affine(affine, index)
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-5)


def test_result_json_round_trip(tmp_path):
    result = RegistrationResult(_known_affine(), dice=0.93, metric=0.01, iterations=12, seconds=1.5, atlas_name="x")
    loaded = RegistrationResult.load(result.save(tmp_path / "transform.json"))
    np.testing.assert_allclose(loaded.atlas_to_subject, result.atlas_to_subject)
    np.testing.assert_allclose(loaded.subject_to_atlas, np.linalg.inv(result.atlas_to_subject))
    assert (loaded.dice, loaded.iterations, loaded.atlas_name) == (0.93, 12, "x")


def test_empty_mask_raises_registration_error():
    with pytest.raises(RegistrationError, match="empty"):
        AtlasRegistration("default")(np.zeros((20, 20, 20), np.uint8), np.eye(4))


def test_mask_unlike_lungs_raises_registration_error():
    mask = np.zeros((60, 60, 60), np.uint8)
    mask[28:32, 5:55, 5:55] = 1  # a thin plate: no affine maps the lungs onto it
    with pytest.raises(RegistrationError, match="diverged|failed"):
        AtlasRegistration("default", iterations=50)(mask, np.diag([3.0, 3.0, 3.0, 1.0]))


def test_per_class_itk_wrappers_register_exactly_as_the_itk_namespace(monkeypatch, registered):
    atlas, truth, result = registered
    mask, affine = _subject_from_atlas(atlas, truth)
    per_class = registration._itk_classes
    monkeypatch.setattr(registration, "_itk_classes", lambda: per_class(per_class=False))
    namespace = AtlasRegistration(atlas)(mask, affine)
    assert per_class() is not per_class(per_class=False)
    np.testing.assert_array_equal(namespace.atlas_to_subject, result.atlas_to_subject)
    assert (namespace.metric, namespace.iterations) == (result.metric, result.iterations)


def test_block_average_does_not_depend_on_the_memory_order():
    mask = (np.random.default_rng(0).random((31, 22, 17)) < 0.4).astype(np.uint8) * 2
    affine = np.diag([0.7, 0.8, 1.5, 1.0])
    c, c_affine = block_average(mask, affine, 3.0)
    f, f_affine = block_average(np.asfortranarray(mask), affine, 3.0)
    np.testing.assert_array_equal(c, f)
    np.testing.assert_array_equal(c_affine, f_affine)
    assert c.shape == (7, 5, 8) and np.isclose(c.mean(), 0.4, atol=0.05)


def test_moments_method_recovers_a_scaling_and_shift_without_itk(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "itk", None)  # `import itk` fails: the moments method must not need it
    registration._itk_classes.cache_clear()
    atlas = load_atlas("default")
    truth = np.diag([1.08, 0.93, 1.05, 1.0])
    truth[:3, 3] = [12.0, -6.0, 25.0]
    mask, affine = _subject_from_atlas(atlas, truth)
    result = AtlasRegistration(atlas, method="moments")(mask, affine)
    centres = apply_affine(atlas.affine, atlas.centres_voxel)
    error = np.linalg.norm(apply_affine(result.atlas_to_subject, centres) - apply_affine(truth, centres), axis=1)
    assert error.max() < 2.0 and result.dice > 0.9 and result.stop_condition == "moments"
    with pytest.raises(RegistrationError):
        AtlasRegistration(atlas)(mask, affine)  # the ITK method reports the missing ITK as our error
    registration._itk_classes.cache_clear()


def test_moments_method_agrees_with_itk_on_a_phantom():
    from drasclr_ext.data.phantom import generate_phantom

    phantom = generate_phantom(3, resolution_scale=3.0)
    atlas = load_atlas("default")
    itk_result = AtlasRegistration(atlas)(phantom["lung_mask"], phantom["affine"])
    moments = AtlasRegistration(atlas, method="moments")(phantom["lung_mask"], phantom["affine"])
    points = apply_affine(atlas.affine, np.argwhere(atlas.mask[::4, ::4, ::4]) * 4)
    gap = np.linalg.norm(
        apply_affine(itk_result.atlas_to_subject, points) - apply_affine(moments.atlas_to_subject, points), axis=1
    )
    assert gap.mean() < 1.5, gap.mean()


def test_unknown_registration_method_is_refused():
    with pytest.raises(ValueError, match="moments"):
        AtlasRegistration("default", method="demons")
