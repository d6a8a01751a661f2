//! One direction of an ONNX LSTM (gate order i, o, f, c; activations sigmoid, tanh, tanh),
//! keeping every step's gates so that relevance can be propagated back through time.

use super::gemm::{Mat, Threads, matmul};
use crate::tensor::Float;

/// Weights of one LSTM direction, row-major: `w` [4H, I], `r` [4H, H], `b` `[4H]` (Wb + Rb).
pub struct LstmWeights<'a, T> {
    /// Input weights.
    pub w: &'a [T],
    /// Recurrent weights.
    pub r: &'a [T],
    /// Summed biases.
    pub b: &'a [T],
    /// Hidden size.
    pub hidden: usize,
    /// Input size.
    pub input: usize,
}

/// Everything one direction computed, per time step in processing order.
#[derive(Clone, Debug, Default)]
pub struct LstmTrace<T> {
    /// Gate activations per step [steps][batch, 4H] in ONNX order (i, o, f, c̃).
    pub gates: Vec<Vec<T>>,
    /// Cell states per step [steps][batch, H].
    pub c: Vec<Vec<T>>,
    /// Hidden states per step [steps][batch, H].
    pub h: Vec<Vec<T>>,
    /// Time index of each processed step (reversed for the reverse direction).
    pub times: Vec<usize>,
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// Runs one direction over `x` [seq, batch, I] from `h0`, `c0` [batch, H]. Returns the trace.
pub fn lstm_direction<T: Float>(
    x: &[T],
    seq: usize,
    batch: usize,
    wts: &LstmWeights<T>,
    h0: &[T],
    c0: &[T],
    reverse: bool,
) -> LstmTrace<T> {
    let hs = wts.hidden;
    let g4 = 4 * hs;
    // Input projections of every step at once: [seq·batch, 4H] = X · Wᵀ.
    let mut xw = vec![T::zero(); seq * batch * g4];
    matmul(
        seq * batch,
        g4,
        wts.input,
        Mat::rows(x, wts.input),
        Mat::rows_t(wts.w, wts.input),
        &mut xw,
        false,
        Threads::Pool,
    );
    let mut h = h0.to_vec();
    let mut c = c0.to_vec();
    let mut trace = LstmTrace::default();
    for step in 0..seq {
        let t = if reverse { seq - 1 - step } else { step };
        let mut z = xw[t * batch * g4..(t + 1) * batch * g4].to_vec();
        matmul(batch, g4, hs, Mat::rows(&h, hs), Mat::rows_t(wts.r, hs), &mut z, true, Threads::One);
        for bi in 0..batch {
            let zb = &mut z[bi * g4..(bi + 1) * g4];
            for (k, (z, b)) in zb.iter_mut().zip(wts.b).enumerate() {
                let v = *z + *b;
                *z = if k < 3 * hs { sigmoid(v) } else { v.tanh() };
            }
            for j in 0..hs {
                let (i, o, f, g) = (zb[j], zb[hs + j], zb[2 * hs + j], zb[3 * hs + j]);
                let cn = f * c[bi * hs + j] + i * g;
                c[bi * hs + j] = cn;
                h[bi * hs + j] = o * cn.tanh();
            }
        }
        trace.gates.push(z);
        trace.c.push(c.clone());
        trace.h.push(h.clone());
        trace.times.push(t);
    }
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_matches_hand_computation() {
        // H = 1, I = 1: gates from w = [1, 2, 3, 4], r = 0, b = 0, x = 0.5, h0 = 0, c0 = 1.
        let w = [1.0, 2.0, 3.0, 4.0];
        let r = [0.0; 4];
        let b = [0.0; 4];
        let wts = LstmWeights { w: &w, r: &r, b: &b, hidden: 1, input: 1 };
        let tr = lstm_direction(&[0.5f64], 1, 1, &wts, &[0.0], &[1.0], false);
        let s = |v: f64| 1.0 / (1.0 + (-v).exp());
        let c = s(1.5) * 1.0 + s(0.5) * 2.0f64.tanh();
        assert!((tr.c[0][0] - c).abs() < 1e-15);
        assert!((tr.h[0][0] - s(1.0) * c.tanh()).abs() < 1e-15);
    }
}
