"""Exports torchvision-sized VGG-16, ResNet-50 and DenseNet-121 with random weights (and random
BatchNorm statistics) to bench-models/ (not committed), for `relprop bench` and bench.py."""
import os
import sys
import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "bench-models")


def build(name):
    torch.manual_seed(0)
    m = {"vgg16": torchvision.models.vgg16, "resnet50": torchvision.models.resnet50, "densenet121": torchvision.models.densenet121}[name]()
    models.randomize_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in sys.argv[1:] or ["resnet50", "vgg16", "densenet121"]:
        m = build(name)
        path = os.path.join(OUT, f"{name}.onnx")
        torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), path, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=13, dynamo=False)
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
