"""Feature extractors of the trainers: :class:`SmallReidNet` for CPU runs, torchvision's
ResNet-50 / MobileNetV2, :class:`MobileNetV1` (Howard et al. 2017; torchvision has none), and
:class:`ReidModel` (backbone + optional embedding head). ImageNet weights come only from a
local file (``weights=PATH``); nothing is ever downloaded."""
from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("small", "resnet50", "mobilenet_v2", "mobilenet_v1")


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


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _DepthwiseSeparable(nn.Sequential):
    """MobileNet v1's Fig. 3 (right): 3 x 3 depthwise conv-BN-ReLU, then 1 x 1 pointwise conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = _conv_bn_relu(cin, cin, stride, groups=cin)
        self.pointwise = _conv_bn_relu(cin, cout, kernel=1)


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks
    for Mobile Vision Applications"), Table 1 at width multiplier ``width`` (1.0: the paper's
    base model, 4.2 M parameters and 569 M multiply-adds at 224 x 224 with its 1000-way classifier).

    A full 3 x 3 convolution (32 channels, stride 2), then 13 depthwise-separable blocks of
    output channels 64, 128, 128, 256, 256, 512, 512 x 5, 1024, 1024 with stride 2 in the 2nd,
    4th, 6th and 12th; every convolution is followed by BatchNorm and ReLU (Fig. 3). Table 1
    prints the last depthwise layer with stride 2, but its input-size column (7 x 7 in and
    out) needs stride 1, as the released model has; this follows the sizes. For re-id inputs
    the fixed 7 x 7 average pool becomes a global one (any H, W; output stride 32, so a
    256 x 128 frame ends as an 8 x 4 map), and the classifier is optional.

    Parameters
    ----------
    width : float
        Width multiplier alpha: every layer has ``round(alpha * channels)`` channels.
    num_classes : int or None
        Size of the final fully connected layer (``classifier``), None for none.

    Input [b, 3, H, W] -> [b, out_dim] (``out_dim`` = 1024 alpha, or ``num_classes``).

    Examples
    --------
    >>> net = MobileNetV1()
    >>> net(torch.zeros(2, 3, 256, 128)).shape
    torch.Size([2, 1024])
    """

    # (output channels, stride) of the 13 depthwise-separable blocks of Table 1.
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, width: float = 1.0, num_classes: int | None = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")

        def channels(count: int) -> int:
            return max(1, int(round(count * width)))

        layers = [_conv_bn_relu(3, channels(32), stride=2)]
        cin = channels(32)
        for cout, stride in self.BLOCKS:
            layers.append(_DepthwiseSeparable(cin, channels(cout), stride))
            cin = channels(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes) if num_classes else None
        self.out_dim = num_classes if num_classes else cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(x) if self.classifier is not None else x


class _TorchvisionBackbone(nn.Module):
    def __init__(self, body: nn.Module, out_dim: int):
        super().__init__()
        self.body = body
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _load_weights(net: nn.Module, weights: str, name: str, classifier_prefixes: tuple[str, ...]) -> None:
    """Load a local ImageNet ``state_dict`` file into ``net``, classifier keys ignored."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights} does not hold {name} weights: a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefixes)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as error:   # shape mismatches
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"{weights} does not hold {name} weights: {reason}") from None
    missing = [k for k in missing if not k.startswith(classifier_prefixes)]
    if missing or unexpected:
        raise ValueError(f"{weights} does not hold {name} weights: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_backbone(name: str, *, weights: str | None = None, small_width: int = 32) -> nn.Module:
    """A feature extractor [b, 3, H, W] -> [b, out_dim] with an ``out_dim`` attribute.

    Parameters
    ----------
    name : {"small", "resnet50", "mobilenet_v2", "mobilenet_v1"}
        ``resnet50`` (2048-d) and ``mobilenet_v2`` (1280-d) are torchvision's, classifier
        removed; ``mobilenet_v1`` (1024-d) is :class:`MobileNetV1` at width 1.0.
    weights : str, optional
        A local ``state_dict`` file of ImageNet weights: torchvision's checkpoint for its two
        backbones; for ``mobilenet_v1`` a state dict with :class:`MobileNetV1`'s parameter
        names (``features.0.0.weight``, ``features.1.depthwise.0.weight``...), which a user
        converts from the checkpoint they trust (no standard PyTorch file exists). Classifier
        keys (``fc.``, ``classifier.``) are ignored. Nothing is ever downloaded.
    small_width : int
        Width of :class:`SmallReidNet`.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if name == "small":
        if weights:
            raise ValueError("weights are for the ImageNet backbones (resnet50, mobilenet_v2, mobilenet_v1), "
                             "not 'small'")
        return SmallReidNet(small_width)
    if name == "mobilenet_v1":
        net = MobileNetV1()
        if weights:
            _load_weights(net, weights, name, ("classifier.", "fc."))
        return net
    import torchvision

    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        classifier_prefix, out_dim = "fc.", 2048
    else:
        net = torchvision.models.mobilenet_v2(weights=None)
        classifier_prefix, out_dim = "classifier.", 1280
    if weights:
        _load_weights(net, weights, name, (classifier_prefix,))
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
