"""zennit 0.5.1 attributions for the CNN fixture models (called by make_fixtures.py).

Seeds follow relprop's convention: LRP composites start from one_hot(target) * output, the plain
gradient from one_hot(target)."""
import os
import numpy as np
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import NamedMergeBatchNorm, SequentialMergeBatchNorm
from zennit.composites import (DeconvNet, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat,
                               ExcitationBackprop, GuidedBackprop, LayerMapComposite, layer_map_base)
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer
from zennit.types import Convolution

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
COMPOSITES = ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat", "epsilon_plus",
              "excitation_backprop", "guided_backprop", "deconvnet", "epsilon", "gradient"]


def densenet_canonizable(model):
    """torchvision's DenseNet with its functional head (F.relu, F.adaptive_avg_pool2d) as modules,
    so that zennit's rules apply there too; same function."""
    return nn.Sequential(model.features, nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), model.classifier)


def densenet_canonizer(model):
    """Merge only the truly sequential Conv→BN pairs (stem conv0→norm0 and each dense layer's
    conv1→norm2); every other BatchNorm stays and gets Pass from zennit's base layer map."""
    pairs = [(["0.conv0"], "0.norm0")]
    for name, _ in model.named_modules():
        if name.endswith(".conv1") and "denselayer" in name:
            pairs.append(([name], name[:-len("conv1")] + "norm2"))
    return [NamedMergeBatchNorm(pairs)]


def composite(name, canonizers):
    low = (0 - MEAN) / STD
    high = (1 - MEAN) / STD
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    if name == "epsilon_alpha2_beta1_flat":
        return EpsilonAlpha2Beta1Flat(canonizers=canonizers)
    if name == "epsilon_plus":
        return EpsilonPlus(canonizers=canonizers)
    if name == "excitation_backprop":
        return ExcitationBackprop(canonizers=canonizers)
    if name == "guided_backprop":
        return GuidedBackprop(canonizers=canonizers)
    if name == "deconvnet":
        return DeconvNet(canonizers=canonizers)
    if name == "epsilon":
        eps = Epsilon(epsilon=1e-9)
        return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, eps), (nn.Linear, eps)], canonizers=canonizers)
    raise ValueError(name)


def attributions(kind, model, x, out_dir):
    """Writes zennit_<composite>.npy and targets.npy for `model` (already in eval mode)."""
    if kind == "densenet":
        model = densenet_canonizable(model)
    with torch.no_grad():
        logits = model(x)
    order = logits.argsort(dim=1, descending=True)
    # Sample 0 explains its top class, sample 1 its runner-up: both the default and a given target.
    targets = torch.tensor([order[0, 0].item(), order[1, 1].item()])
    np.save(os.path.join(out_dir, "targets.npy"), targets.numpy().astype(np.int64))
    one_hot = torch.zeros_like(logits)
    one_hot[torch.arange(len(targets)), targets] = 1.0
    for name in COMPOSITES:
        if kind == "resnet":
            canon = [ResNetCanonizer()]
        elif kind == "densenet":
            canon = densenet_canonizer(model)
        else:
            canon = [SequentialMergeBatchNorm()]
        comp = None if name == "gradient" else composite(name, canon)
        xi = x.clone().requires_grad_(True)
        with Gradient(model=model, composite=comp) as attributor:
            if name == "gradient":
                out, rel = attributor(xi, one_hot)
            else:
                out, rel = attributor(xi, lambda y: one_hot * y)
        np.save(os.path.join(out_dir, f"zennit_{name}.npy"), rel.detach().numpy().astype(np.float32))
        s = rel.sum(dim=(1, 2, 3)) / logits[torch.arange(2), targets]
        print(f"  zennit {name}: sum R / logit = {s.detach().numpy()}")


def palettes(out_dir):
    """zennit's 8-bit palettes of every built-in colour map at three levels: [cmap, level, 256, 3]."""
    from zennit.image import CMAPS, palette
    names = ["bwr", "coldnhot", "seismic", "gray", "hot", "cold", "wred", "wblue", "france", "coolio", "coleus"]
    levels = [1.0, 0.5, 2.0]
    arr = np.stack([np.stack([palette(n, lv).reshape(256, 3) for lv in levels]) for n in names])
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "zennit_palettes.npy"), arr.astype(np.uint8))
    with open(os.path.join(out_dir, "zennit_palettes.txt"), "w") as f:
        f.write("order of axis 0: " + ",".join(names) + "\norder of axis 1 (level): " + ",".join(map(str, levels)) + "\n")
        for n in names:
            f.write(f"{n}: {CMAPS._sources[n]}\n")


def quantus_region_perturbation(model, x, out_dir):
    """Quantus's RegionPerturbation curves for a fixed random attribution on the VGG fixture (patch 4,
    20 regions, replacement value 0, MoRF and LeRF): relprop's evaluate module must give the same."""
    import quantus
    rng = np.random.default_rng(3)
    a = rng.standard_normal(tuple(x.shape)).astype(np.float32)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "attribution.npy"), a)
    np.save(os.path.join(out_dir, "targets.npy"), y.astype(np.int64))
    for order in ["morf", "lerf"]:
        metric = quantus.RegionPerturbation(patch_size=4, order=order, regions_evaluation=20, perturb_baseline=0.0,
                                            normalise=False, abs=False, disable_warnings=True)
        res = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, softmax=False, device="cpu")
        np.save(os.path.join(out_dir, f"quantus_{order}.npy"), np.asarray(res, dtype=np.float64))
        print(f"  quantus {order}: first steps {np.asarray(res)[0][:3]}")
