//! LRP through an ONNX LSTM node (Arras et al. 2017, "Explaining recurrent neural network
//! predictions in sentiment analysis"): gates get no relevance ("signal takes all"), `R(h_t)` goes
//! wholly to `c_t`, `c_t = f⊙c_{t−1} + i⊙g` is split in proportion with an ε-stabilised denominator,
//! and the cell input's pre-activation `W x_t + R h_{t−1} + b` is split onto `x_t` and `h_{t−1}` by
//! the ε-rule. With bias factor 1 the share of the bias and stabiliser is spread equally over each
//! unit's inputs, so that relevance is conserved.

use crate::graph::{Direction, Node, Op};
use crate::ops::lstm::{LstmWeights, lstm_direction};
use crate::tensor::{Float, Value, array};
use ndarray::ArrayD;

type R<T> = Result<T, String>;

fn f<'a, T: Float>(ins: &[Option<&'a Value<T>>], i: usize) -> Option<&'a ArrayD<T>> {
    match ins.get(i).copied().flatten() {
        Some(Value::F(a)) => Some(a),
        _ => None,
    }
}

fn flat<T: Float>(a: &ArrayD<T>) -> Vec<T> {
    a.iter().copied().collect()
}

fn sign<T: Float>(z: T) -> T {
    if z >= T::zero() { T::one() } else { -T::one() }
}

/// What the rule gives back: relevance of X, and of the initial states h0, c0 (None if absent).
pub struct LstmRelevance<T> {
    /// Relevance of the input sequence, shaped like X.
    pub x: ArrayD<T>,
    /// Relevance reaching the initial hidden state.
    pub h0: ArrayD<T>,
    /// Relevance reaching the initial cell state.
    pub c0: ArrayD<T>,
}

/// Relevance through an LSTM node, given the relevance of its outputs Y, Y_h, Y_c.
pub fn relevance<T: Float>(
    node: &Node,
    ins: &[Option<&Value<T>>],
    r: &[Option<&ArrayD<T>>],
    eps: f64,
    bias_factor: f64,
) -> R<LstmRelevance<T>> {
    let Op::Lstm { hidden, direction, batch_first } = node.op else { return Err("not an LSTM".into()) };
    let tr3 = |a: &ArrayD<T>| a.view().permuted_axes(ndarray::IxDyn(&[1, 0, 2])).as_standard_layout().into_owned();
    let x = f(ins, 0).ok_or("X is missing")?;
    let x = if batch_first { tr3(x) } else { x.clone() };
    let (w, rw) = (f(ins, 1).ok_or("W is missing")?, f(ins, 2).ok_or("R is missing")?);
    let (seq, batch, isz) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let dirs = if direction == Direction::Bidirectional { 2 } else { 1 };
    let hs = hidden;
    let g4 = 4 * hs;
    let b = f(ins, 3).map(flat).unwrap_or_else(|| vec![T::zero(); dirs * 8 * hs]);
    let state = |i: usize| -> Vec<T> {
        match f(ins, i) {
            Some(s) => flat(&if batch_first { tr3(s) } else { s.clone() }),
            None => vec![T::zero(); dirs * batch * hs],
        }
    };
    let (h0, c0) = (state(5), state(6));
    // Output relevance in the seq-major layout: Y [seq, dirs, batch, H], Y_h / Y_c [dirs, batch, H].
    let ry = match r.first().copied().flatten() {
        Some(a) if batch_first => {
            flat(&a.view().permuted_axes(ndarray::IxDyn(&[1, 2, 0, 3])).as_standard_layout().into_owned())
        }
        Some(a) => flat(a),
        None => vec![T::zero(); seq * dirs * batch * hs],
    };
    let rstate = |i: usize| -> Vec<T> {
        match r.get(i).copied().flatten() {
            Some(a) if batch_first => flat(&tr3(a)),
            Some(a) => flat(a),
            None => vec![T::zero(); dirs * batch * hs],
        }
    };
    let (ryh, ryc) = (rstate(1), rstate(2));
    let xs = flat(&x);
    let (wf, rf) = (flat(w), flat(rw));
    let mut rx = vec![T::zero(); seq * batch * isz];
    let mut rh0 = vec![T::zero(); dirs * batch * hs];
    let mut rc0 = vec![T::zero(); dirs * batch * hs];
    let e = T::of(eps);
    let bf = T::of(bias_factor);
    let nin = T::of((isz + hs) as f64);
    for d in 0..dirs {
        let bsum: Vec<T> = (0..g4).map(|k| b[d * 8 * hs + k] + b[d * 8 * hs + g4 + k]).collect();
        let wd = &wf[d * g4 * isz..(d + 1) * g4 * isz];
        let rd = &rf[d * g4 * hs..(d + 1) * g4 * hs];
        let wts = LstmWeights { w: wd, r: rd, b: &bsum, hidden: hs, input: isz };
        let sl = |v: &[T]| v[d * batch * hs..(d + 1) * batch * hs].to_vec();
        let (h0d, c0d) = (sl(&h0), sl(&c0));
        let reverse = direction == Direction::Reverse || d == 1;
        let trace = lstm_direction(&xs, seq, batch, &wts, &h0d, &c0d, reverse);
        let steps = trace.times.len();
        let mut rh_carry = vec![T::zero(); batch * hs];
        let mut rc_carry = vec![T::zero(); batch * hs];
        for s in (0..steps).rev() {
            let t = trace.times[s];
            let (h_prev, c_prev) = if s > 0 { (&trace.h[s - 1], &trace.c[s - 1]) } else { (&h0d, &c0d) };
            let c_t = &trace.c[s];
            let z = &trace.gates[s];
            let mut rh_prev = vec![T::zero(); batch * hs];
            let mut rc_prev = vec![T::zero(); batch * hs];
            for bi in 0..batch {
                // R(h_t): from Y at t, from Y_h at the last step, and from step s+1's recurrence.
                let mut rg = vec![T::zero(); hs];
                for j in 0..hs {
                    let mut rh = rh_carry[bi * hs + j] + ry[((t * dirs + d) * batch + bi) * hs + j];
                    let mut rc = rc_carry[bi * hs + j];
                    if s == steps - 1 {
                        rh += ryh[(d * batch + bi) * hs + j];
                        rc += ryc[(d * batch + bi) * hs + j];
                    }
                    // R(h_t) goes wholly to c_t; then c_t = f·c_{t−1} + i·g is split.
                    let rct = rc + rh;
                    let (i_g, f_g, g_g) = (z[bi * g4 + j], z[bi * g4 + 2 * hs + j], z[bi * g4 + 3 * hs + j]);
                    let ct = c_t[bi * hs + j];
                    let den = ct + e * sign(ct);
                    let share = bf * e * sign(ct) / T::of(2.0);
                    rc_prev[bi * hs + j] = (f_g * c_prev[bi * hs + j] + share) / den * rct;
                    rg[j] = (i_g * g_g + share) / den * rct;
                }
                // g = tanh(z_g): relevance passes to z_g, which the ε-rule splits onto x_t and h_{t−1}.
                let xt = &xs[(t * batch + bi) * isz..(t * batch + bi + 1) * isz];
                let hp = &h_prev[bi * hs..(bi + 1) * hs];
                for (k, &rgk) in rg.iter().enumerate() {
                    let row = 3 * hs + k;
                    let zk = (0..isz).map(|j| xt[j] * wd[row * isz + j]).sum::<T>()
                        + (0..hs).map(|j| hp[j] * rd[row * hs + j]).sum::<T>()
                        + bsum[row];
                    let den = zk + e * sign(zk);
                    let q = rgk / den;
                    let spread = bf * (bsum[row] + e * sign(zk)) / nin * q;
                    for j in 0..isz {
                        rx[(t * batch + bi) * isz + j] += xt[j] * wd[row * isz + j] * q + spread;
                    }
                    for j in 0..hs {
                        rh_prev[bi * hs + j] += hp[j] * rd[row * hs + j] * q + spread;
                    }
                }
            }
            rh_carry = rh_prev;
            rc_carry = rc_prev;
        }
        rh0[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(&rh_carry);
        rc0[d * batch * hs..(d + 1) * batch * hs].copy_from_slice(&rc_carry);
    }
    let mut xr = array(&[seq, batch, isz], rx);
    let mut h0r = array(&[dirs, batch, hs], rh0);
    let mut c0r = array(&[dirs, batch, hs], rc0);
    if batch_first {
        xr = tr3(&xr);
        h0r = tr3(&h0r);
        c0r = tr3(&c0r);
    }
    Ok(LstmRelevance { x: xr, h0: h0r, c0: c0r })
}
