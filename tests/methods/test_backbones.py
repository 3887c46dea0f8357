"""MobileNet v1 against the paper's own figures (Howard et al. 2017: Table 1's layers and
sizes, Table 8's 4.2 M parameters and 569 M multiply-adds), and its local-weights loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastassoc.methods import backbones


def _multiply_adds(net: nn.Module, size: tuple[int, int]) -> int:
    """Multiply-adds of every convolution and fully connected layer for one image."""
    total = 0

    def conv(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in net.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, *size))
    for hook in hooks:
        hook.remove()
    return total


def test_mobilenet_v1_has_the_papers_size_and_cost():
    net = backbones.MobileNetV1(num_classes=1000)
    parameters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    # Table 8: 4.2 million parameters, 569 million mult-adds at 224 x 224.
    assert round(parameters / 1e6, 1) == 4.2, parameters
    assert round(_multiply_adds(net, (224, 224)) / 1e6) == pytest.approx(569, abs=1), _multiply_adds(net, (224, 224))


def test_mobilenet_v1_layers_follow_table_1():
    net = backbones.MobileNetV1()
    convs = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)]
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].kernel_size, convs[0].stride) == (3, 32, (3, 3),
                                                                                                      (2, 2))
    depthwise, pointwise = convs[1::2], convs[2::2]
    assert len(depthwise) == len(pointwise) == 13
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in depthwise)
    assert all(c.kernel_size == (1, 1) and c.groups == 1 for c in pointwise)
    assert [c.out_channels for c in pointwise] == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert [c.stride[0] for c in depthwise] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    # Every convolution is followed by BatchNorm and ReLU (Fig. 3).
    kinds = [type(m) for m in net.features.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU))]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 27
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 224, 224)).shape == (1, 1024, 7, 7)   # Table 1's last sizes
        assert net.features(torch.zeros(1, 3, 256, 128)).shape == (1, 1024, 8, 4)   # re-id frames
        assert net(torch.zeros(2, 3, 256, 128)).shape == (2, net.out_dim) == (2, 1024)


def test_mobilenet_v1_builder_loads_local_weights_and_drops_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = backbones.MobileNetV1(num_classes=1000)
    path = tmp_path / "mobilenet_v1.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    net = backbones.build_backbone("mobilenet_v1", weights=str(path))
    loaded = net.state_dict()
    assert net.classifier is None and net.out_dim == 1024
    for name, value in source.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(loaded[name], value), f"{name} not loaded"
    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold mobilenet_v1 weights"):
        backbones.build_backbone("mobilenet_v1", weights=str(tmp_path / "bad.pth"))
    assert "mobilenet_v1" in backbones.BACKBONES
