//! LRP rules and gradient modifiers. A rule maps (node, its inputs, its outputs, the relevance of
//! its outputs) to the relevance of its inputs; see `DESIGN.md` §2 for the formulas.

pub mod grad;
pub mod linear;
pub mod lstm;

use crate::graph::Op;
use crate::tensor::Float;
use std::fmt;
use std::str::FromStr;

pub use linear::{Bounds, LinearKind, LinearLayer};

/// A rule, with zennit's names and parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// `x w / (z + ε·sign z)`.
    Epsilon(f64),
    /// LRP-0: ε = 0, zero denominators give zero.
    Zero,
    /// z⁺, sign-aware: `x⁺w⁺ + x⁻w⁻` over its sum (+ b⁺).
    ZPlus,
    /// `α·pos − β·neg`, each part normalised separately.
    AlphaBeta {
        /// Weight of the positive part.
        alpha: f64,
        /// Weight of the negative part.
        beta: f64,
    },
    /// zennit's generalised γ rule.
    Gamma(f64),
    /// z^B with per-channel input bounds.
    ZBox,
    /// `w²` over its sum.
    WSquare,
    /// All weights one, bias zero.
    Flat,
    /// Parameter-free proportional split (sums, average pooling).
    Norm,
    /// Relevance passes unchanged (activations, BatchNorm).
    Pass,
    /// The plain gradient (vector-Jacobian product).
    Gradient,
    /// Guided backprop on ReLU (gradient elsewhere).
    GuidedBackprop,
    /// DeconvNet on ReLU (gradient elsewhere).
    DeconvNet,
    /// For a product of a signal and a gate: the signal takes all relevance.
    SignalTakesAll,
    /// Arras et al.'s rules through an LSTM node (ε and bias factor from the rule options).
    Lstm,
}

impl Rule {
    /// Whether the rule is a modified-gradient rule (the seed is one-hot, not one-hot × output).
    pub fn is_gradient_like(&self) -> bool {
        matches!(self, Rule::Gradient | Rule::GuidedBackprop | Rule::DeconvNet)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Epsilon(e) => write!(f, "epsilon({e:e})"),
            Rule::Zero => write!(f, "zero"),
            Rule::ZPlus => write!(f, "zplus"),
            Rule::AlphaBeta { alpha, beta } => write!(f, "alpha_beta({alpha},{beta})"),
            Rule::Gamma(g) => write!(f, "gamma({g})"),
            Rule::ZBox => write!(f, "zbox"),
            Rule::WSquare => write!(f, "wsquare"),
            Rule::Flat => write!(f, "flat"),
            Rule::Norm => write!(f, "norm"),
            Rule::Pass => write!(f, "pass"),
            Rule::Gradient => write!(f, "gradient"),
            Rule::GuidedBackprop => write!(f, "guided_backprop"),
            Rule::DeconvNet => write!(f, "deconvnet"),
            Rule::SignalTakesAll => write!(f, "signal_takes_all"),
            Rule::Lstm => write!(f, "lstm"),
        }
    }
}

impl FromStr for Rule {
    type Err = String;

    /// Parses `name` or `name(arg, ...)`, e.g. `gamma(0.5)`, `alpha_beta(2,1)`, `epsilon(1e-9)`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (name, args) = match s.split_once('(') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix(')').ok_or_else(|| format!("rule '{s}': missing ')'"))?;
                let args: Result<Vec<f64>, _> =
                    inner.split(',').filter(|a| !a.trim().is_empty()).map(|a| a.trim().parse::<f64>()).collect();
                (n.trim(), args.map_err(|e| format!("rule '{s}': bad number ({e})"))?)
            }
            None => (s, vec![]),
        };
        let arg = |i: usize, d: f64| args.get(i).copied().unwrap_or(d);
        let nargs = |max: usize| {
            if args.len() > max { Err(format!("rule '{name}' takes at most {max} argument(s)")) } else { Ok(()) }
        };
        let rule = match name {
            "epsilon" => {
                nargs(1)?;
                Rule::Epsilon(arg(0, 1e-6))
            }
            "zero" => Rule::Zero,
            "zplus" => Rule::ZPlus,
            "alpha_beta" => {
                nargs(2)?;
                let alpha = arg(0, 2.0);
                Rule::AlphaBeta { alpha, beta: arg(1, alpha - 1.0) }
            }
            "gamma" => {
                nargs(1)?;
                Rule::Gamma(arg(0, 0.25))
            }
            "zbox" => Rule::ZBox,
            "wsquare" => Rule::WSquare,
            "flat" => Rule::Flat,
            "norm" => Rule::Norm,
            "pass" => Rule::Pass,
            "gradient" => Rule::Gradient,
            "guided_backprop" => Rule::GuidedBackprop,
            "deconvnet" => Rule::DeconvNet,
            "signal_takes_all" => Rule::SignalTakesAll,
            "lstm" => Rule::Lstm,
            _ => {
                return Err(format!(
                    "unknown rule '{name}'; rules: epsilon(eps), zero, zplus, alpha_beta(alpha,beta), gamma(gamma), zbox, \
                     wsquare, flat, norm, pass, gradient, guided_backprop, deconvnet, signal_takes_all, lstm"
                ));
            }
        };
        if !args.is_empty() && !matches!(rule, Rule::Epsilon(_) | Rule::AlphaBeta { .. } | Rule::Gamma(_)) {
            return Err(format!("rule '{name}' takes no arguments"));
        }
        Ok(rule)
    }
}

impl Rule {
    /// Whether the rule on a node of this op reads nothing of the forward pass but shapes: the
    /// pass rule on an activation, whose relevance moves to its input as it is. Their inputs need
    /// not be kept, so a convolution before them runs fused with the activation.
    pub fn reads_nothing(&self, op: &Op) -> bool {
        matches!(self, Rule::Pass) && op.is_activation()
    }

    /// Whether the rule reads its node's first input: not the pass rule on an activation, nor the
    /// gradients of ReLU and Clip, whose masks read the same on their output.
    pub fn reads_input(&self, op: &Op) -> bool {
        !(self.reads_nothing(op) || (self.is_gradient_like() && matches!(op, Op::Relu | Op::Clip { .. })))
    }

    /// Whether the rule reads its node's forward output (ε's denominator is the cached output;
    /// z⁺, αβ, w², flat and the gradients on a linear layer make their own), so that it must be kept.
    pub fn reads_output(&self, op: &Op) -> bool {
        let linear = matches!(op, Op::Conv { .. } | Op::Gemm { .. } | Op::MatMul);
        !(linear
            && matches!(
                self,
                Rule::ZPlus
                    | Rule::AlphaBeta { .. }
                    | Rule::Flat
                    | Rule::WSquare
                    | Rule::Gradient
                    | Rule::GuidedBackprop
                    | Rule::DeconvNet
            ))
    }

    /// Whether the rule also reads its node's forward output where the node's first input may
    /// have negative values: z⁺ and αβ on a linear layer make `x⁺·w⁺ + x⁻·w⁻` from it with one
    /// product instead of two (see `rules::linear`).
    pub fn reads_output_over_signed_input(&self, op: &Op) -> bool {
        matches!(op, Op::Conv { .. } | Op::Gemm { .. } | Op::MatMul)
            && matches!(self, Rule::ZPlus | Rule::AlphaBeta { .. })
    }
}

/// zennit's stabiliser: `z + ε·sign(z)` with sign(0) = +1.
#[inline]
pub fn stabilize<T: Float>(z: T, eps: f64) -> T {
    if z >= T::zero() { z + T::of(eps) } else { z - T::of(eps) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        for s in ["epsilon(1e-9)", "gamma(0.5)", "alpha_beta(2,1)", "zplus", "flat", "zbox", "pass"] {
            let r: Rule = s.parse().unwrap();
            assert_eq!(r.to_string().parse::<Rule>().unwrap(), r);
        }
        assert_eq!("alpha_beta(3)".parse::<Rule>().unwrap(), Rule::AlphaBeta { alpha: 3.0, beta: 2.0 });
        assert!("gamma(x)".parse::<Rule>().is_err());
        assert!("flat(1)".parse::<Rule>().is_err());
        assert!("nope".parse::<Rule>().unwrap_err().contains("zplus"));
    }
}
