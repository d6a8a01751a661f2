"""An independent float64 NumPy implementation of LRP for LSTMs (Arras et al. 2017), written from
the paper's formulas, run on the Embedding + LSTM + Linear fixtures. Writes, per fixture and bias
factor, the relevance per token, the relevance reaching the initial states, the targets and scores.

Rules (relprop's DESIGN.md §4): seed one_hot(target)·score; linear maps z_k = Σ_j x_j w_jk + b_k
split by ε-LRP, R_j = Σ_k (x_j w_jk + bf·(b_k + ε·s_k)/D) / (z_k + ε·s_k) · R_k with s_k = sign(z_k)
(+1 at 0) and D the number of inputs; R(h_t) goes wholly to c_t; c_t = f c_{t-1} + i g is split as
(f c_{t-1} + bf·ε s/2) / (c_t + ε s) and (i g + bf·ε s/2) / (c_t + ε s); gates get nothing; the cell
input's pre-activation splits onto [x_t; h_{t-1}] by the linear rule. Embedding rows sum per token."""
import os
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

EPS = 1e-3


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lrp_linear(x, w, b, z, r, eps, bf):
    """x [D], w [D, M], b [M], z [M] (pre-activation incl. bias), r [M] -> [D]."""
    s = np.where(z >= 0, 1.0, -1.0)
    numer = x[:, None] * w + bf * (b + eps * s)[None, :] / x.shape[0]
    return (numer / (z + eps * s)[None, :] * r[None, :]).sum(axis=1)


class Lstm:
    """One ONNX LSTM node's weights (gate order i, o, f, c)."""

    def __init__(self, W, R, B, direction):
        self.W, self.R, self.B, self.direction = W, R, B, direction
        self.H = R.shape[-1]

    def run_dir(self, x, d, h0, c0):
        """x [T, I] one sample; returns per processing step the values needed by LRP."""
        H = self.H
        W, R = self.W[d], self.R[d]
        b = self.B[d][: 4 * H] + self.B[d][4 * H:]
        reverse = self.direction == "reverse" or d == 1
        order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        h, c = h0.copy(), c0.copy()
        steps = []
        for t in order:
            zall = W @ x[t] + R @ h + b
            i, o, f, g = sigmoid(zall[:H]), sigmoid(zall[H:2 * H]), sigmoid(zall[2 * H:3 * H]), np.tanh(zall[3 * H:])
            c_new = f * c + i * g
            h_new = o * np.tanh(c_new)
            steps.append(dict(t=t, x=x[t], h_prev=h, c_prev=c, i=i, f=f, g=g, zg=zall[3 * H:], c=c_new, h=h_new))
            h, c = h_new, c_new
        return steps

    def forward(self, x):
        """x [T, I] -> Y [T, dirs, H], Y_h [dirs, H], runs."""
        dirs = 2 if self.direction == "bidirectional" else 1
        T = x.shape[0]
        Y = np.zeros((T, dirs, self.H))
        Yh = np.zeros((dirs, self.H))
        runs = []
        for d in range(dirs):
            st = self.run_dir(x, d, np.zeros(self.H), np.zeros(self.H))
            for s in st:
                Y[s["t"], d] = s["h"]
            Yh[d] = st[-1]["h"]
            runs.append(st)
        return Y, Yh, runs

    def relevance(self, runs, RY, RYh, eps, bf):
        """RY [T, dirs, H], RYh [dirs, H] -> R(x) [T, I], relevance of h0 and c0 (summed)."""
        H = self.H
        T = RY.shape[0]
        Rx = np.zeros((T, self.W.shape[-1]))
        r0 = 0.0
        for d, st in enumerate(runs):
            W, R = self.W[d], self.R[d]
            b = self.B[d][: 4 * H] + self.B[d][4 * H:]
            Wg, Rg, bg = W[3 * H:], R[3 * H:], b[3 * H:]
            rh_next = np.zeros(H)
            rc_next = np.zeros(H)
            for k in range(len(st) - 1, -1, -1):
                s = st[k]
                rh = rh_next + RY[s["t"], d] + (RYh[d] if k == len(st) - 1 else 0)
                rc = rc_next + rh
                sg = np.where(s["c"] >= 0, 1.0, -1.0)
                den = s["c"] + eps * sg
                share = bf * eps * sg / 2
                rc_prev = (s["f"] * s["c_prev"] + share) / den * rc
                r_g = (s["i"] * s["g"] + share) / den * rc
                xin = np.concatenate([s["x"], s["h_prev"]])
                win = np.concatenate([Wg.T, Rg.T], axis=0)  # [I+H, H]
                rin = lrp_linear(xin, win, bg, s["zg"], r_g, eps, bf)
                Rx[s["t"]] += rin[: len(s["x"])]
                rh_next = rin[len(s["x"]):]
                rc_next = rc_prev
            r0 += rh_next.sum() + rc_next.sum()
        return Rx, r0


def load(path):
    m = onnx.load(path)
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            init[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    emb = next(init[n.input[0]] for n in m.graph.node if n.op_type == "Gather" and n.input[0] in init and init[n.input[0]].ndim == 2)
    lstms = []
    for n in m.graph.node:
        if n.op_type == "LSTM":
            direction = next((a.s.decode() for a in n.attribute if a.name == "direction"), "forward")
            lstms.append(Lstm(init[n.input[1]], init[n.input[2]], init[n.input[3]], direction))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    fw = init[gemm.input[1]]
    if any(a.name == "transB" and a.i == 1 for a in gemm.attribute):
        fw = fw.T
    fb = init[gemm.input[2]]
    return emb, lstms, fw, fb


def explain(path, ids, head, bf):
    """head: 'last' (features = Y at the last time step, directions concatenated) or 'yh' (Y_h of
    the last LSTM, one direction). Returns token relevance [B, T], initial-state relevance [B],
    targets [B], scores [B]."""
    emb, lstms, fw, fb = load(path)
    out_tok, out_r0, targets, scores = [], [], [], []
    for seq in ids:
        x = emb[seq]
        layers = []
        for l in lstms:
            Y, Yh, runs = l.forward(x)
            layers.append((x, Y, Yh, runs))
            x = Y.reshape(Y.shape[0], -1)
        Y, Yh = layers[-1][1], layers[-1][2]
        feat = Y[-1].reshape(-1) if head == "last" else Yh.reshape(-1)
        z = feat @ fw + fb
        t = int(np.argmax(z))
        r_out = np.zeros_like(z)
        r_out[t] = z[t]
        r_feat = lrp_linear(feat, fw, fb, z, r_out, EPS, bf)
        RY = np.zeros_like(Y)
        RYh = np.zeros_like(Yh)
        if head == "last":
            RY[-1] = r_feat.reshape(RY.shape[1:])
        else:
            RYh[:] = r_feat.reshape(RYh.shape)
        r0_total = 0.0
        for li in range(len(lstms) - 1, -1, -1):
            xin, Yl, Yhl, runs = layers[li]
            Rx, r0 = lstms[li].relevance(runs, RY, RYh, EPS, bf)
            r0_total += r0
            if li > 0:
                RY = Rx.reshape(layers[li - 1][1].shape)
                RYh = np.zeros_like(layers[li - 1][2])
        out_tok.append(Rx.sum(axis=1))
        out_r0.append(r0_total)
        targets.append(t)
        scores.append(z[t])
    return np.array(out_tok), np.array(out_r0), np.array(targets), np.array(scores)


def make_reverse_model(path, rng):
    """Embedding → LSTM(direction=reverse) → Y_h → Linear, built with onnx.helper (PyTorch has no
    reverse-only LSTM)."""
    V, E, H, C = 50, 8, 6, 3
    emb = rng.standard_normal((V, E)).astype(np.float32) * 0.5
    W = rng.standard_normal((1, 4 * H, E)).astype(np.float32) * 0.5
    R = rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.5
    B = rng.standard_normal((1, 8 * H)).astype(np.float32) * 0.5
    fw = rng.standard_normal((C, H)).astype(np.float32) * 0.5
    fb = rng.standard_normal((C,)).astype(np.float32) * 0.5
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("Transpose", ["e"], ["x"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Yh"], hidden_size=H, direction="reverse"),
        helper.make_node("Squeeze", ["Yh", "axes"], ["feat"]),
        helper.make_node("Gemm", ["feat", "fw", "fb"], ["output"], transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(emb, "emb"), (W, "W"), (R, "R"), (B, "B"), (fw, "fw"), (fb, "fb")]]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    g = helper.make_graph(nodes, "lstm_reverse", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, C])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def write_all(fix):
    rng = np.random.default_rng(5)
    rev_dir = os.path.join(fix, "lstm_reverse")
    os.makedirs(rev_dir, exist_ok=True)
    make_reverse_model(os.path.join(rev_dir, "model.onnx"), rng)
    np.save(os.path.join(rev_dir, "input_0.npy"), rng.integers(0, 50, (2, 7)).astype(np.int64))
    for case, head in [("lstm_fwd", "last"), ("lstm_bi", "last"), ("lstm_stacked", "last"), ("lstm_reverse", "yh")]:
        d = os.path.join(fix, case)
        ids = np.load(os.path.join(d, "input_0.npy"))
        for bf in (0, 1):
            tok, r0, t, sc = explain(os.path.join(d, "model.onnx"), ids, head, float(bf))
            np.save(os.path.join(d, f"arras_bf{bf}_tokens.npy"), tok)
            np.save(os.path.join(d, f"arras_bf{bf}_initial.npy"), r0)
            np.save(os.path.join(d, "arras_targets.npy"), t.astype(np.int64))
            np.save(os.path.join(d, "arras_scores.npy"), sc)
            print(f"  {case} bf={bf}: targets {t}, (tokens + initial) / score = {(tok.sum(1) + r0) / sc}")


if __name__ == "__main__":
    write_all(os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
