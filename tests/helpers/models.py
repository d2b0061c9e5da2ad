"""Small models the tests build, and that Ray actors import by factory string (``tests.helpers.models:<name>``)."""
from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(num_classes: int = 3) -> nn.Module:
    """A random-init CNN for pipeline runs; Ray actors import it as ``tests.helpers.models:tiny_cnn``."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )


def patch_detector(num_classes: int = 2) -> nn.Module:
    """A CNN with known weights that responds to bright patches only: class 0's logit is 32 x the mean of
    relu(3x3x3 local mean - 0.5), so on a dark image only pixels of a bright patch carry evidence.
    Also the model of the end-to-end tests (``tests.helpers.models:patch_detector``)."""
    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(1, num_classes))
    with torch.no_grad():
        model[0].weight.fill_(1 / 27)
        model[0].bias.fill_(-0.5)
        model[4].weight.copy_(torch.tensor([[32.0]] + [[-32.0]] * (num_classes - 1)))
        model[4].bias.zero_()
    return model.eval()
