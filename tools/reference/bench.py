"""Times onnxruntime, PyTorch and zennit on the same ONNX / torchvision models and inputs as
`relprop bench`, in one run on one machine, and writes docs/benchmarks.md.

Usage: python tools/reference/bench.py [--threads 2] [--repeats 5] [--pairs 3] MODEL:BATCHES ...
MODEL is efficientnet_lite0 (bundled; onnxruntime only, no torch definition) or resnet50, vgg16,
densenet121 (bench-models/, from export_bench_models.py). BATCHES like 1,8."""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))


def model_path(name):
    if name == "efficientnet_lite0":
        return os.path.join(ROOT, "assets", "models", "efficientnet_lite0.onnx")
    return os.path.join(ROOT, "bench-models", f"{name}.onnx")


def free_batch(path):
    """A copy of the model whose input batch axis is symbolic (the bundled model fixes it to 1)."""
    import onnx
    m = onnx.load(path)
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    if d.HasField("dim_value"):
        d.ClearField("dim_value")
        d.dim_param = "batch"
        out = os.path.join(ROOT, "bench-models", os.path.basename(path).replace(".onnx", "_freebatch.onnx"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        onnx.save(m, out)
        return out
    return path


def bench_input(n):
    i = np.arange(n * 3 * 224 * 224, dtype=np.int64)
    return (((i * 2654435761) % 2000) / 1000.0 - 1.0).astype(np.float32).reshape(n, 3, 224, 224)


def median_ms(fn, repeats):
    fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(t))


SESSIONS = {}


def ort_time(path, n, threads, repeats):
    import onnxruntime as ort
    if (path, threads) not in SESSIONS:
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
        SESSIONS[(path, threads)] = ort.InferenceSession(free_batch(path), o, providers=["CPUExecutionProvider"])
    s = SESSIONS[(path, threads)]
    x = bench_input(n)
    name = s.get_inputs()[0].name
    return median_ms(lambda: s.run(None, {name: x}), repeats)


ZENNIT_CHILD = r'''
import json, sys, time, resource, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import export_bench_models, zennit_refs
from zennit.attribution import Gradient
from zennit.torchvision import ResNetCanonizer
from zennit.canonizers import SequentialMergeBatchNorm
name, n, threads, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = export_bench_models.build(name)
i = np.arange(n * 3 * 224 * 224, dtype=np.int64)
x = torch.from_numpy((((i * 2654435761) % 2000) / 1000.0 - 1.0).astype(np.float32).reshape(n, 3, 224, 224))
def med(fn):
    fn(); t = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); t.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(t))
with torch.no_grad():
    out = {"forward": med(lambda: model(x))}
def grad():
    xi = x.clone().requires_grad_(True); y = model(xi)
    g = torch.zeros_like(y); g[torch.arange(n), y.argmax(1)] = 1
    y.backward(g)
out["gradient"] = med(grad)
if name.startswith("resnet"):
    canon = [ResNetCanonizer()]
elif name.startswith("densenet"):
    # torchvision's functional head as modules, and only the truly sequential Conv→BN pairs merged.
    model = zennit_refs.densenet_canonizable(model)
    canon = zennit_refs.densenet_canonizer(model)
else:
    canon = [SequentialMergeBatchNorm()]
with torch.no_grad():
    y = model(x)
oh = torch.zeros_like(y); oh[torch.arange(n), y.argmax(1)] = 1
for comp_name in ["epsilon_plus_flat", "epsilon_gamma_box"]:
    comp = zennit_refs.composite(comp_name, canon)
    with Gradient(model=model, composite=comp) as attributor:
        # As relprop's LRP time: the forward pass (with the rules' hooks) and the backward pass.
        def lrp():
            attributor(x.clone().requires_grad_(True), lambda o: oh * o)
        out["lrp " + comp_name] = med(lrp)
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
'''


def zennit_time(name, n, threads, repeats):
    r = subprocess.run([sys.executable, "-c", ZENNIT_CHILD, os.path.dirname(__file__), name, str(n), str(threads), str(repeats)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def relprop_time(path, batches, threads, repeats, forward_only=False):
    exe = os.path.join(ROOT, "target", "release", "relprop")
    r = subprocess.run([exe, "bench", path, "--batch", ",".join(map(str, batches)), "--threads", str(threads),
                        "--repeats", str(repeats), "--json"] + (["--forward-only"] if forward_only else []),
                       capture_output=True, text=True, check=True)
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return {(row["batch"], row["mode"]): row for row in rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3, help="alternating onnxruntime / relprop forward rounds")
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    lines = []
    for spec in a.models:
        name, _, bs = spec.partition(":")
        batches = [int(b) for b in (bs or "1").split(",")]
        path = model_path(name)
        rp = relprop_time(path, batches, a.threads, a.repeats)
        # The forward comparison: short runs of each, alternating, so that drift between them stays
        # small; the ratio is the median of the rounds' ratios, with their range.
        pairs = {n: [] for n in batches}
        for _ in range(a.pairs):
            for n in batches:
                o = ort_time(path, n, a.threads, a.repeats)
                f = relprop_time(path, [n], a.threads, a.repeats, forward_only=True)[(n, "forward")]["median_ms"]
                pairs[n].append((o, f))
        SESSIONS.clear()
        for n in batches:
            ort_ms = float(np.median([o for o, _ in pairs[n]]))
            fwd_ms = float(np.median([f for _, f in pairs[n]]))
            ratios = sorted(f / o for o, f in pairs[n])
            fwd_cell = f"{fwd_ms:.1f} ({float(np.median(ratios)):.2f}×, {ratios[0]:.2f}–{ratios[-1]:.2f})"
            try:
                zn = zennit_time(name, n, a.threads, a.repeats) if name != "efficientnet_lite0" else None
            except RuntimeError as e:
                print(f"zennit failed on {name}: {str(e)[-300:]}", file=sys.stderr)
                zn = None
            grad = rp[(n, "gradient")]["median_ms"]
            row = f"| {name} | {n} | {ort_ms:.1f} | {fwd_cell} | {grad:.1f} |"
            for c in ["epsilon_plus_flat", "epsilon_gamma_box"]:
                lrp = rp[(n, "lrp " + c)]["median_ms"]
                z = f" / zennit {zn['lrp ' + c]:.0f} ({zn['lrp ' + c] / lrp:.1f}×)" if zn else ""
                row += f" {lrp:.1f} ({lrp / grad:.2f}× grad){z} |"
            peak = max(v["peak_mib"] for (b, _), v in rp.items() if b == n)
            row += f" {peak:.0f}" + (f" / zennit {zn['peak_mib']:.0f}" if zn else "") + " |"
            if zn:
                row += f" torch fwd {zn['forward']:.0f}, grad {zn['gradient']:.0f} |"
            else:
                row += " – |"
            print(row, flush=True)
            lines.append(row)
    header = ("| model | batch | onnxruntime fwd ms | relprop fwd ms (÷ ort, range) | relprop grad ms | "
              "LRP ε+♭ ms | LRP εγ□ ms | peak MiB relprop / zennit | PyTorch ms |\n|---|---|---|---|---|---|---|---|---|")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    doc = f"""# Benchmarks

Produced by `python tools/reference/bench.py --threads {a.threads} --repeats {a.repeats} --pairs {a.pairs} {' '.join(a.models)}` (after
`cargo build --release` and `python tools/reference/export_bench_models.py`), all numbers from one run on one
machine: {cpu}, {os.cpu_count()} cores, {a.threads} threads for every library. Medians of {a.repeats} runs after a warm-up;
relprop's modes are interleaved in one process (`relprop bench`). The forward columns come from {a.pairs} alternating
rounds of onnxruntime and `relprop bench --forward-only` (medians of {a.repeats} each): the ratio is the median of
the rounds' ratios, followed by their range.
LRP ε+♭ is epsilon_plus_flat, εγ□ epsilon_gamma_box; "÷ grad" is relprop's LRP time over its own gradient time.

{header}
""" + "\n".join(lines) + "\n"
    with open(os.path.join(ROOT, "docs", "benchmarks.md.new"), "w") as f:
        f.write(doc)
    print(doc)


if __name__ == "__main__":
    main()
