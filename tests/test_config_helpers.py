"""The named helpers the bundle configs wire instead of computing: the preprocessing chain, the trainer's handler
list and the rank-0 share."""

from __future__ import annotations

import pytest

from drasclr_ext.atlas import load_atlas
from drasclr_ext.handlers import trainer_handlers
from drasclr_ext.parallel import on_rank0
from drasclr_ext.transforms.chain import ct_preprocessing


def _names(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_the_chain_has_the_steps_each_workflow_asks_for():
    atlas = load_atlas("default")
    assert _names(ct_preprocessing(atlas)) == ["LoadCTd", "LungMaskd", "AtlasRegistrationd"]
    train = ct_preprocessing(atlas, harmonise=True, target_noise_hu=25.0, label_key="label")
    assert _names(train) == ["LoadCTd", "LoadLabelMapd", "LungMaskd", "HarmoniseNoised", "AtlasRegistrationd"]
    assert train.transforms[3].enabled and train.transforms[3].target_noise_hu == 25.0
    measured_only = ct_preprocessing(atlas, harmonise=False)
    assert not measured_only.transforms[2].enabled  # the noise is measured (report, flags), the image kept
    patches = ct_preprocessing(atlas, patches_k=3)
    assert _names(patches)[-1] == "AnatomicalPatchesd"


@pytest.mark.parametrize("rank, validation, expected", [(0, [1], "hrv"), (0, [], "hre"), (1, [1], "h"), (1, [], "h")])
def test_trainer_handlers_follow_the_rank_and_the_validation_data(monkeypatch, rank, validation, expected):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = trainer_handlers(["h"], ["r"], ["v"], ["e"], validation)
    assert "".join(out) == expected


def test_on_rank0_keeps_the_items_only_on_rank_0(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert on_rank0([1, 2]) == [1, 2]
    monkeypatch.setenv("RANK", "1")
    assert on_rank0([1, 2]) == []


ENCODER_SIZES = ("rep_dim", "moco_dim", "num_experts")


def _settings(bundle: str, name: str) -> dict:
    import json

    from tests.bundle_utils import config

    return json.loads(open(config(bundle, name)[0]).read())


def test_the_encoder_sizes_agree_in_every_config_of_both_bundles():
    """Each config is run on its own (the model zoo writes the network in train.json and inference.json alike), so
    the sizes stand in four files: they must describe one encoder, the one whose weights the bundles ship."""
    configs = [
        (b, c) for b in ("drasclr_emphysema_subtype", "drasclr_lung_ct_ssl") for c in ("train.json", "inference.json")
    ]
    sizes = {(b, c): tuple(_settings(b, c)[k] for k in ENCODER_SIZES) for b, c in configs}
    assert len(set(sizes.values())) == 1, sizes
    dense = [_settings("drasclr_emphysema_subtype", c) for c in ("train.json", "inference.json")]
    assert dense[0]["decoder_channels"] == dense[1]["decoder_channels"]
    assert dense[0]["num_classes"] == dense[1]["num_classes"] == 4
