"""The one importance interface: scores per channel group, checked against hand-computed values."""

from __future__ import annotations

import torch

from snncompress.compress.importance import (CriticalityImportance, GammaImportance, MagnitudeImportance,
                                             PCAImportance, per_group_mean)
from snncompress.models import build_model


def _convnet(batchnorm: bool = False):
    torch.manual_seed(0)
    return build_model("convnet", 3, (1, 4, 4), 2, features=[2, "A"], classifier=[2], batchnorm=batchnorm)


def test_magnitude_scores_are_the_squared_weights_producing_each_channel():
    model = _convnet()
    groups = model.channel_groups()
    assert [g.name for g in groups] == ["features.0", "classifier.0"]
    with torch.no_grad():
        model.features[0].weight.fill_(0.0)
        model.features[0].weight[0, 0, 0, :] = torch.tensor([1.0, 2.0, 0.0])  # 1 + 4
        model.features[0].weight[1, 0, 1, 1] = -3.0                            # 9
    scores = MagnitudeImportance()(model, groups)
    assert scores["features.0"].tolist() == [5.0, 9.0]
    assert scores["features.0"].dtype == torch.float64 and scores["classifier.0"].shape == (2,)


def test_gamma_scores_only_groups_with_batchnorm():
    model = _convnet(batchnorm=True)
    with torch.no_grad():
        model.features[1].weight.copy_(torch.tensor([-0.5, 0.25]))
    scores = GammaImportance()(model, model.channel_groups())
    assert scores["features.0"].tolist() == [0.5, 0.25]
    assert set(scores) == {"features.0"}  # the classifier has no BatchNorm: not scored
    assert GammaImportance()(_convnet(batchnorm=False), _convnet().channel_groups()) == {}


def test_layer_scores_average_over_a_groups_spiking_layers():
    groups = _convnet().channel_groups()
    out = per_group_mean(groups, {"features.1": torch.tensor([0.2, 0.6]), "elsewhere": torch.ones(5)})
    assert list(out) == ["features.0"] and torch.allclose(out["features.0"], torch.tensor([0.2, 0.6], dtype=torch.float64))


def test_activity_scorers_give_one_score_per_channel_of_every_spiking_group():
    model = _convnet()
    images = torch.rand(8, 1, 4, 4)
    for scorer in (CriticalityImportance(images, chunk=4), PCAImportance(images, chunk=4)):
        scores = scorer(model, model.channel_groups())
        assert {k: tuple(v.shape) for k, v in scores.items()} == {"features.0": (2,), "classifier.0": (2,)}
        assert all(bool(torch.isfinite(v).all()) and bool((v >= 0).all()) for v in scores.values())
