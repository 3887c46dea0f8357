"""Feature extractors of the trainers: :class:`SmallReidNet` for CPU runs, torchvision's
ResNet-50 / MobileNetV2 (ImageNet weights only from a local file), and :class:`ReidModel`
(backbone + optional embedding head)."""
from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("small", "resnet50", "mobilenet_v2")


class SmallReidNet(nn.Module):
    """A small CNN for CPU runs: conv-BN-ReLU stages of width, 2, 4 and 8 x width channels with
    max-pooling between them, a second conv at the coarsest scale, global average pooling.

    About 12 M multiply-adds per 64 x 32 frame at width 16 (49 M at 32).

    Parameters
    ----------
    width : int
        Channels of the first stage.

    Input [b, 3, H, W] -> output [b, 8 * width] (``out_dim``).
    """

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 8 * w), *block(8 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 8 * w
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _TorchvisionBackbone(nn.Module):
    def __init__(self, body: nn.Module, out_dim: int):
        super().__init__()
        self.body = body
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_backbone(name: str, *, weights: str | None = None, small_width: int = 32) -> nn.Module:
    """A feature extractor [b, 3, H, W] -> [b, out_dim] with an ``out_dim`` attribute.

    Parameters
    ----------
    name : {"small", "resnet50", "mobilenet_v2"}
        ``resnet50`` (2048-d) and ``mobilenet_v2`` (1280-d) are torchvision's, classifier removed.
    weights : str, optional
        A local ``state_dict`` file (torchvision's ImageNet checkpoint) for the torchvision
        backbones; the classifier's keys are ignored. Nothing is ever downloaded.
    small_width : int
        Width of :class:`SmallReidNet`.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if name == "small":
        if weights:
            raise ValueError("weights are for the torchvision backbones (resnet50, mobilenet_v2), not 'small'")
        return SmallReidNet(small_width)
    import torchvision

    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        classifier_prefix, out_dim = "fc.", 2048
    else:
        net = torchvision.models.mobilenet_v2(weights=None)
        classifier_prefix, out_dim = "classifier.", 1280
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(classifier_prefix)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(classifier_prefix)]
        if missing or unexpected:
            raise ValueError(f"{weights} does not hold {name} weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if name == "resnet50":
        net.fc = nn.Identity()
    else:
        net.classifier = nn.Identity()
    return _TorchvisionBackbone(net, out_dim)


class ReidModel(nn.Module):
    """Backbone followed by an optional embedding head; ``forward`` gives the test feature.

    Attributes
    ----------
    backbone : nn.Module with ``out_dim``
    head : nn.Module or None
    out_dim : int
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, out_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.out_dim = out_dim if out_dim is not None else backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)
        return self.head(x) if self.head is not None else x
