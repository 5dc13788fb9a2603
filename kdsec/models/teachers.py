"""Teacher networks."""

from __future__ import annotations

from torch import nn

from kdsec.models.registry import MODELS


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
