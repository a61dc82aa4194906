"""Raw [0, 1] images passed where the model expects normalised input: one warning per model,
and none on normalised zoo images."""

from __future__ import annotations

import warnings

import pytest
import torch

import patchlens as pl
from patchlens.model.preprocess import looks_unnormalised
from patchlens.zoo.clutter_digits import generate


@pytest.fixture(scope="module")
def zoo_model():
    return pl.HookedViT.from_pretrained("clutter-digits-vit")


def test_no_false_warnings_on_normalised_zoo_images(zoo_model):
    """Every image of three zoo sets, checked alone: none flagged once normalised; every one
    flagged raw."""
    for shortcut in (None, "on", "conflict"):
        data = generate(200, split="test", seed=11, shortcut=shortcut)
        x = zoo_model.preprocess(data.images)
        assert not any(looks_unnormalised(zoo_model.cfg, x[i:i + 1]) for i in range(len(x)))
        assert all(looks_unnormalised(zoo_model.cfg, data.images[i:i + 1])
                   for i in range(len(x)))


def test_warns_once_per_model(zoo_model):
    data = generate(2, split="test", seed=0)
    model = pl.HookedViT.from_state_dict(zoo_model.cfg, zoo_model.state_dict())
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        model(model.preprocess(data.images))
        assert not caught
        model(data.images)
        model(data.images)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "model.preprocess" in msgs[0] and "(0.5, 0.5, 0.5)" in msgs[0]


def test_ambiguous_inputs_are_not_flagged(zoo_model):
    cfg = zoo_model.cfg
    assert not looks_unnormalised(cfg, torch.zeros(1, 3, 64, 64))        # the mean image
    assert not looks_unnormalised(cfg, torch.full((1, 3, 64, 64), 0.7))  # constant
    identity = cfg.replace(data_mean=(0.0, 0.0, 0.0), data_std=(1.0, 1.0, 1.0))
    assert not looks_unnormalised(identity, torch.rand(1, 3, 64, 64))    # expects [0, 1]
