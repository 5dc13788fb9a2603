"""Teacher networks."""

from __future__ import annotations

from torch import nn

from kdsec.models.catalog import MODELS


@MODELS.register("teacher_cnn")
class TeacherCNN(nn.Module):
    """The seed document's TeacherNet (conv-ReLU-pool ×2, fc, fc), with widths from config.

    With ``channels=[64, 128], fc=256`` on 32×32×3 it is the reference CIFAR-10 teacher; the
    digits default is ``[32, 64], 128`` on 8×8×1.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (64, 128),
                 fc: int = 256) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * height * width, fc), nn.ReLU(), nn.Linear(fc, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("student_cnn")
class StudentCNN(TeacherCNN):
    """The seed document's StudentNet: the TeacherNet layout at half width (32/64 channels, fc 128)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (32, 64),
                 fc: int = 128) -> None:
        super().__init__(input_shape, num_classes, channels, fc)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images (as for CIFAR): a 3×3 stride-1 stem and no
    max-pool, so 32×32 inputs keep 4×4 maps before global pooling; ``width`` scales every stage."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(num_classes=num_classes) if width == 64 else _scaled_resnet(width, num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _scaled_resnet(width: int, num_classes: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    class ScaledResNet(ResNet):
        def __init__(self):
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(BasicBlock, width, 2)
            self.layer2 = self._make_layer(BasicBlock, width * 2, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, width * 4, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, width * 8, 2, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width * 8, num_classes)

    return ScaledResNet()
