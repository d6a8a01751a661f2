"""ResNet-50 (torchvision size, random weights, random BN statistics) explained by zennit and by
`relprop explain` on the ONNX export; prints relative L2, cosine and Σ R / logit per composite.
Run after export_bench_models.py: python tools/reference/parity_resnet50.py [path/to/relprop]"""
import os
import subprocess
import sys
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import export_bench_models  # noqa: E402
import zennit_refs  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "bench-models")


def main():
    relprop = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "relprop")
    torch.set_num_threads(2)
    model = export_bench_models.build("resnet50")
    x = (torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5)) - zennit_refs.MEAN) / zennit_refs.STD
    np.save(os.path.join(OUT, "resnet50_input.npy"), x.numpy())
    with torch.no_grad():
        logits = model(x)
    target = int(logits.argmax())
    one_hot = torch.zeros_like(logits)
    one_hot[0, target] = 1
    for name in ["epsilon_plus_flat", "epsilon_gamma_box"]:
        comp = zennit_refs.composite(name, [ResNetCanonizer()])
        with Gradient(model=model, composite=comp) as attributor:
            _, ref = attributor(x.clone().requires_grad_(True), lambda y: one_hot * y)
        ref = ref.detach().numpy().astype(np.float64)
        out = os.path.join(OUT, f"resnet50_relprop_{name}.npy")
        cmd = [relprop, "explain", os.path.join(OUT, "resnet50.onnx"), "--input", os.path.join(OUT, "resnet50_input.npy"),
               "--composite", name, "--canonize", "minimal", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
               "--target", str(target), "--out-npy", out]
        subprocess.run(cmd, check=True, capture_output=True)
        ours = np.load(out).astype(np.float64)
        rl2 = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        cos = (ours * ref).sum() / (np.linalg.norm(ours) * np.linalg.norm(ref))
        lg = float(logits[0, target])
        print(f"{name}: relative L2 {rl2:.2e}, cosine {cos:.7f}, ΣR/logit relprop {ours.sum() / lg:.5f} zennit {ref.sum() / lg:.5f}")
    print("command:", " ".join(cmd))


if __name__ == "__main__":
    main()
