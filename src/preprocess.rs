//! Image inputs: decoding, PIL-compatible bilinear resizing, centre crops and normalisation.
//!
//! The resize is written by hand because models are trained on PIL/torchvision preprocessing and
//! the `image` crate's filters differ from PIL's antialiased, fixed-point bilinear filter by
//! several grey levels; this follows PIL's algorithm (separable triangle filter whose support grows
//! with the downscale factor, 22-bit fixed-point weights, rounding after each pass).

use crate::error::{Error, Result};
use ndarray::{Array3, ArrayD, IxDyn};
use std::path::Path;

/// An 8-bit RGB image, `[height, width, 3]`.
pub type Rgb = Array3<u8>;

/// Decodes a PNG or JPEG file into RGB.
pub fn load_rgb(path: &Path) -> Result<Rgb> {
    let img = image::open(path).map_err(|e| Error::Invalid(format!("cannot decode image {}: {e}", path.display())))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Array3::from_shape_vec((h, w, 3), rgb.into_raw()).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's coefficients for resampling `in_size` to `out_size` with the bilinear filter:
/// per output position, the first input index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let f = k * (1u64 << PRECISION_BITS) as f64;
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like PIL's `Image.resize((w, h), Image.BILINEAR)`.
pub fn resize_bilinear(img: &Rgb, out_h: usize, out_w: usize) -> Rgb {
    let (h, w, _) = img.dim();
    let mut cur = img.clone();
    if out_w != w {
        let cs = coeffs(w, out_w);
        let mut next = Array3::<u8>::zeros((h, out_w, 3));
        for y in 0..h {
            for (x, (x0, k)) in cs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, kj) in k.iter().enumerate() {
                        ss += cur[[y, x0 + j, c]] as i64 * kj;
                    }
                    next[[y, x, c]] = clip8(ss);
                }
            }
        }
        cur = next;
    }
    if out_h != h {
        let cs = coeffs(h, out_h);
        let cw = cur.dim().1;
        let mut next = Array3::<u8>::zeros((out_h, cw, 3));
        for (y, (y0, k)) in cs.iter().enumerate() {
            for x in 0..cw {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, kj) in k.iter().enumerate() {
                        ss += cur[[y0 + j, x, c]] as i64 * kj;
                    }
                    next[[y, x, c]] = clip8(ss);
                }
            }
        }
        cur = next;
    }
    cur
}

/// Resizes so that the shorter side is `size` (torchvision's `Resize(size)`).
pub fn resize_shorter(img: &Rgb, size: usize) -> Rgb {
    let (h, w, _) = img.dim();
    let (nh, nw) = if w <= h {
        ((size as f64 * h as f64 / w as f64) as usize, size)
    } else {
        (size, (size as f64 * w as f64 / h as f64) as usize)
    };
    resize_bilinear(img, nh, nw)
}

/// Centre crop to `size × size` (torchvision's `CenterCrop`, rounding half to even).
pub fn center_crop(img: &Rgb, size: usize) -> Result<Rgb> {
    let (h, w, _) = img.dim();
    if h < size || w < size {
        return Err(Error::Invalid(format!("cannot crop {size}×{size} from a {w}×{h} image")));
    }
    let top = ((h - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as usize;
    Ok(img.slice(ndarray::s![top..top + size, left..left + size, ..]).to_owned())
}

/// How pixels become model inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Per-channel multiplier applied to the 0..255 pixel value.
    pub scale: [f64; 3],
    /// Per-channel offset added after scaling.
    pub offset: [f64; 3],
}

impl Normalize {
    /// `(p/255 − mean) / std` per channel.
    pub fn mean_std(mean: [f64; 3], std: [f64; 3]) -> Self {
        let scale = [1.0 / (255.0 * std[0]), 1.0 / (255.0 * std[1]), 1.0 / (255.0 * std[2])];
        let offset = [-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]];
        Normalize { scale, offset }
    }
    /// `p · scale + offset` for every channel.
    pub fn affine(scale: f64, offset: f64) -> Self {
        Normalize { scale: [scale; 3], offset: [offset; 3] }
    }
    /// ImageNet mean/std.
    pub fn imagenet() -> Self {
        Self::mean_std([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    }
    /// The value a pixel of `p` (0..255) maps to in channel `c`.
    pub fn apply(&self, c: usize, p: f64) -> f64 {
        p * self.scale[c] + self.offset[c]
    }
}

/// Converts images to a `[n, 3, h, w]` (or `[n, h, w, 3]` when `nhwc`) float tensor, optionally
/// reversing the channel order (BGR models).
pub fn to_tensor(imgs: &[Rgb], norm: &Normalize, nhwc: bool, bgr: bool) -> Result<ArrayD<f64>> {
    let (h, w, _) = imgs.first().ok_or_else(|| Error::Invalid("no images".into()))?.dim();
    if imgs.iter().any(|i| i.dim() != (h, w, 3)) {
        return Err(Error::Invalid("images in one batch must have the same size".into()));
    }
    let shape = if nhwc { [imgs.len(), h, w, 3] } else { [imgs.len(), 3, h, w] };
    Ok(ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
        let (n, y, x, c) = if nhwc { (ix[0], ix[1], ix[2], ix[3]) } else { (ix[0], ix[2], ix[3], ix[1]) };
        let src = if bgr { 2 - c } else { c };
        norm.apply(c, imgs[n][[y, x, src]] as f64)
    }))
}

/// Everything that turns a picture file into a model input.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Resize so that the shorter side has this length (bilinear, as PIL).
    pub resize: Option<usize>,
    /// Centre crop to this square size.
    pub crop: Option<usize>,
    /// Pixel normalisation.
    pub norm: Normalize,
    /// Channels-last layout (NHWC) instead of NCHW.
    pub nhwc: bool,
    /// BGR channel order instead of RGB.
    pub bgr: bool,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess { resize: None, crop: None, norm: Normalize::mean_std([0.0; 3], [1.0; 3]), nhwc: false, bgr: false }
    }
}

impl Preprocess {
    /// A named preset: `imagenet` (256 / 224 / ImageNet mean and std) or `efficientnet-lite`
    /// (256 / 224 / (p − 127) / 128).
    pub fn preset(name: &str) -> Result<Preprocess> {
        match name {
            "imagenet" => {
                Ok(Preprocess { resize: Some(256), crop: Some(224), norm: Normalize::imagenet(), ..Default::default() })
            }
            "efficientnet-lite" => Ok(Preprocess {
                resize: Some(256),
                crop: Some(224),
                norm: Normalize::affine(1.0 / 128.0, -127.0 / 128.0),
                ..Default::default()
            }),
            _ => Err(Error::Invalid(format!("unknown preprocessing preset '{name}' (imagenet, efficientnet-lite)"))),
        }
    }

    /// Loads and resizes/crops one picture (no normalisation yet).
    pub fn picture(&self, path: &Path) -> Result<Rgb> {
        if self.resize == Some(0) || self.crop == Some(0) {
            return Err(Error::Invalid("--resize and --crop must be positive".into()));
        }
        let mut img = load_rgb(path)?;
        if let Some(r) = self.resize {
            img = resize_shorter(&img, r);
        }
        if let Some(c) = self.crop {
            img = center_crop(&img, c)?;
        }
        Ok(img)
    }

    /// The batch tensor of pictures.
    pub fn tensor(&self, pictures: &[Rgb]) -> Result<ArrayD<f64>> {
        to_tensor(pictures, &self.norm, self.nhwc, self.bgr)
    }

    /// The input range each channel can take (pixels 0 and 255 normalised): z^B's bounds.
    pub fn bounds(&self) -> crate::rules::Bounds {
        let (a, b): (Vec<f64>, Vec<f64>) = (0..3)
            .map(|c| {
                let (x, y) = (self.norm.apply(c, 0.0), self.norm.apply(c, 255.0));
                (x.min(y), x.max(y))
            })
            .unzip();
        crate::rules::Bounds { low: a, high: b }
    }
}

/// Splits audio into Silero-VAD style frames: chunk k holds the `context` samples before it and
/// its `chunk` samples (zeros outside the signal); returns `[chunks, context + chunk]`.
pub fn audio_frames(samples: &[f32], chunk: usize, context: usize) -> ndarray::Array2<f32> {
    let n = samples.len().div_ceil(chunk).max(1);
    ndarray::Array2::from_shape_fn((n, context + chunk), |(k, j)| {
        let pos = (k * chunk + j) as isize - context as isize;
        if pos >= 0 && (pos as usize) < samples.len() { samples[pos as usize] } else { 0.0 }
    })
}

/// Maps relevance of [`audio_frames`] back onto the samples (overlapping context adds up).
pub fn audio_relevance(frames: ndarray::ArrayView2<f64>, len: usize, chunk: usize, context: usize) -> Vec<f64> {
    let mut out = vec![0.0; len];
    for ((k, j), &v) in frames.indexed_iter() {
        let pos = (k * chunk + j) as isize - context as isize;
        if pos >= 0 && (pos as usize) < len {
            out[pos as usize] += v;
        }
    }
    out
}
