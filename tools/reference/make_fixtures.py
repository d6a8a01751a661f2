"""Writes tests/fixtures/: small ONNX models with random weights, their inputs, onnxruntime's
outputs (float32) and float64 reference outputs (onnx.reference on a float64 copy of the graph).

Run through tools/reference/regenerate.sh; every number is seeded, so re-runs reproduce the files
up to the exporter's version."""
import os
import sys
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402
import zennit_refs  # noqa: E402
import arras_lstm  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
ASSETS = os.path.join(ROOT, "assets")


def to_double(model):
    """A float64 copy of a float32 graph, for an independent high-precision reference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    decompose_batchnorm(m)
    return m


def decompose_batchnorm(m):
    """Rewrites BatchNormalization as Mul + Add with per-channel factors computed in float64:
    onnx.reference's BatchNormalization disagrees with onnxruntime (and PyTorch) here."""
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    nodes = []
    for k, n in enumerate(g.node):
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (consts[i].astype(np.float64) for i in n.input[1:5])
        s = scale / np.sqrt(var + eps)
        t = bias - mean * s
        shape = (-1, 1, 1)
        sn, tn = f"_bn{k}_scale", f"_bn{k}_shift"
        g.initializer.append(numpy_helper.from_array(s.reshape(shape), sn))
        g.initializer.append(numpy_helper.from_array(t.reshape(shape), tn))
        mid = f"_bn{k}_mid"
        nodes.append(onnx.helper.make_node("Mul", [n.input[0], sn], [mid]))
        nodes.append(onnx.helper.make_node("Add", [mid, tn], [n.output[0]]))
    del g.node[:]
    g.node.extend(nodes)


def references(model_path, inputs, out_dir):
    model = onnx.load(model_path)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    feeds = dict(zip(names, inputs))
    outs = sess.run(None, feeds)
    ref = ReferenceEvaluator(to_double(model))
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    outs64 = ref.run(None, feeds64)
    os.makedirs(out_dir, exist_ok=True)
    for k, x in enumerate(inputs):
        np.save(os.path.join(out_dir, f"input_{k}.npy"), x)
    for k, (y, y64) in enumerate(zip(outs, outs64)):
        np.save(os.path.join(out_dir, f"output_{k}.ort.npy"), y)
        np.save(os.path.join(out_dir, f"output_{k}.f64.npy"), np.asarray(y64, dtype=np.float64))
        d = np.abs(y.astype(np.float64) - y64).max()
        print(f"  output {k} {y.shape}: |ort - f64| = {d:.2e}")


def export(name, model, x, folding=True, input_names=("input",), dynamic=True, axes=None):
    out_dir = os.path.join(FIX, name)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    if axes is None:
        axes = {n: {0: "batch"} for n in input_names} if dynamic else None
    if axes is not None:
        axes["output"] = {0: "batch"}
    torch.onnx.export(model, (x,), path, input_names=list(input_names), output_names=["output"],
                      dynamic_axes=axes, opset_version=13, do_constant_folding=folding, dynamo=False)
    ops = sorted({n.op_type for n in onnx.load(path).graph.node})
    print(f"{name}: {os.path.getsize(path)} bytes, ops {ops}")
    references(path, [x.numpy()], out_dir)


def main():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=gen)
    cases = [
        ("vgg", models.vgg(False), img, True),
        ("vgg_bn", models.vgg(True), img, True),
        ("vgg_bn_unfolded", None, img, False),
        ("resnet_basic", models.SmallResNet(models.BasicBlock), img, True),
        ("resnet_bottleneck", models.SmallResNet(models.Bottleneck), img, True),
        ("densenet", models.densenet(), img, True),
        ("mobilenet_block", models.MobileBlockNet(), img, True),
    ]
    built = {}
    for name, model, x, folding in cases:
        if model is None:
            model = built["vgg_bn"]
        else:
            torch.manual_seed(len(built) + 1)
            for p in model.parameters():
                p.data.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p[0].numel())) ** 0.5 if p.dim() > 1 else torch.randn(p.shape, generator=gen) * 0.1)
            models.randomize_bn(model, gen)
            model.eval()
            built[name] = model
        export(name, model, x, folding)
        kind = "resnet" if name.startswith("resnet") else "densenet" if name == "densenet" else "vgg"
        if name in ("vgg", "vgg_bn", "resnet_basic", "resnet_bottleneck", "densenet"):
            zennit_refs.attributions(kind, model, x, os.path.join(FIX, name))

    zennit_refs.quantus_region_perturbation(built["vgg"], img, os.path.join(FIX, "quantus"))

    c1 = models.conv1d_stack().eval()
    export("conv1d", c1, torch.randn(2, 2, 40, generator=gen))

    for name, kw in [("lstm_bi", dict(bidirectional=True)), ("lstm_fwd", dict(bidirectional=False)), ("lstm_stacked", dict(bidirectional=False, layers=2))]:
        m = models.LstmText(**kw).eval()
        for p in m.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        ids = torch.randint(0, 50, (2, 7), generator=gen)
        export(name, m, ids, input_names=("ids",), axes={"ids": {0: "batch", 1: "seq"}, "output": {0: "batch"}})
    arras_lstm.write_all(FIX)
    print("lstm_reverse:")
    rev = os.path.join(FIX, "lstm_reverse")
    references(os.path.join(rev, "model.onnx"), [np.load(os.path.join(rev, "input_0.npy"))], rev)

    zennit_refs.palettes(os.path.join(FIX, "cmap"))

    # Real models: stored inputs with onnxruntime's outputs.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    print("ppocr_cls:")
    references(os.path.join(ASSETS, "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"), [x], os.path.join(FIX, "ppocr_cls"))
    t = np.arange(4 * 576) / 16000.0
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    state = np.zeros((1, 1, 128), np.float32)
    print("silero_vad:")
    references(os.path.join(ASSETS, "models", "silero_vad_16k_sequence.onnx"), [audio.reshape(4, 576), state, state], os.path.join(FIX, "silero_vad"))

    # Image preprocessing reference (PIL): shorter side 256 bilinear, centre crop 224.
    os.makedirs(os.path.join(FIX, "images"), exist_ok=True)
    for img_name in ["chelsea.png", "coffee.png", "rocket.jpg"]:
        im = Image.open(os.path.join(ASSETS, "images", img_name)).convert("RGB")
        if img_name.endswith(".jpg"):
            # JPEG decoders differ by a level or two; keep PIL's decode to test resizing alone.
            np.save(os.path.join(FIX, "images", f"{os.path.splitext(img_name)[0]}.pil_decoded.npy"), np.asarray(im, dtype=np.uint8))
        w, h = im.size
        s = 256 / min(w, h)
        nw, nh = (256, int(h * s)) if w <= h else (int(w * s), 256)
        im = im.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
        im = im.crop((left, top, left + 224, top + 224))
        pix = np.asarray(im, dtype=np.uint8)
        stem = os.path.splitext(img_name)[0]
        out_dir = os.path.join(FIX, "images")
        os.makedirs(out_dir, exist_ok=True)
        np.save(os.path.join(out_dir, f"{stem}.pil224.npy"), pix)
        if stem == "chelsea":
            x = ((pix.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
            print("efficientnet_lite0 (chelsea):")
            references(os.path.join(ASSETS, "models", "efficientnet_lite0.onnx"), [x], os.path.join(FIX, "efficientnet_lite0"))

    # Wide enough for the Winograd kernel (16+ channels, 48×48 and 24×24 planes). Last, with its own generator:
    # building it draws from torch's global generator, which the fixtures above use for default initialisation.
    wgen = torch.Generator().manual_seed(11)
    wide = models.vgg(widths=(16, 24, 32))
    for p in wide.parameters():
        p.data.copy_(torch.randn(p.shape, generator=wgen) * (2.0 / max(1, p[0].numel())) ** 0.5 if p.dim() > 1 else torch.randn(p.shape, generator=wgen) * 0.1)
    wide.eval()
    wimg = torch.randn(2, 3, 48, 48, generator=wgen)
    export("vgg_wide", wide, wimg, True)
    zennit_refs.attributions("vgg", wide, wimg, os.path.join(FIX, "vgg_wide"))


if __name__ == "__main__":
    main()
