"""Small fixture models in the shapes of VGG, ResNet, DenseNet, MobileNet, a Conv1d stack and an
LSTM text classifier, with random weights and random BatchNorm statistics (so that folding
matters)."""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck


def randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) * 0.8 + 0.4)
            m.weight.data.copy_(torch.rand(c, generator=gen) * 1.2 + 0.3)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


def vgg(bn=False, widths=(8, 8, 16)):
    """A small VGG. The default widths are the `vgg` fixtures'; `vgg_wide`'s (16, 24, 32), on 48×48 inputs, are wide
    enough for relprop's Winograd kernel (16+ channels), which the narrow fixtures never reach."""
    c1, c2, c3 = widths

    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        return layers
    features = nn.Sequential(*block(3, c1), *block(c1, c2), nn.MaxPool2d(2, 2), *block(c2, c3), nn.MaxPool2d(2, 2))
    return nn.Sequential(
        features,
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Linear(4 * c3, 32),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(32, 10),
    )


class SmallResNet(nn.Module):
    """torchvision's ResNet blocks at a small width."""

    def __init__(self, block):
        super().__init__()
        w = 8
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        e = block.expansion
        self.layer1 = block(w, w, downsample=None if e == 1 else nn.Sequential(nn.Conv2d(w, w * e, 1, bias=False), nn.BatchNorm2d(w * e)))
        down = nn.Sequential(nn.Conv2d(w * e, 2 * w * e, 1, 2, bias=False), nn.BatchNorm2d(2 * w * e))
        self.layer2 = block(w * e, 2 * w, stride=2, downsample=down)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * w * e, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet():
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MobileBlockNet(nn.Module):
    """A MobileNetV3-style network: depthwise conv, hard-swish, squeeze-excitation, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.se = SqueezeExcite(16, 4)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.dw2 = nn.Sequential(nn.Conv2d(8, 8, 5, 2, 2, groups=8), nn.ReLU6())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(self.dw2(x))


def conv1d_stack():
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2),
        nn.LeakyReLU(0.1),
        nn.AvgPool1d(2),
        nn.Conv1d(8, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3, 3),
    )


class LstmText(nn.Module):
    """Embedding + (bidirectional) LSTM + Linear on the last time step."""

    def __init__(self, bidirectional=True, layers=1, vocab=50, emb=8, hidden=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, ids):
        out, _ = self.lstm(self.emb(ids))
        return self.fc(out[:, -1, :])
