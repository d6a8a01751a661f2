//! Heatmaps: zennit's colour maps (same palettes, entry by entry), relevance normalisation,
//! overlays on the input picture, grids, PNG files.

use crate::error::{Error, Result};
use ndarray::{Array2, Array3, ArrayView2};
use std::path::Path;

/// zennit's built-in colour maps in its colour-map language: `[index:]color, ...` with hex
/// colours of 3 or 6 digits and optional hex indices (0..ff) placing a colour on the 256 scale.
pub const CMAPS: &[(&str, &str)] = &[
    ("bwr", "00f,80:fff,f00"),
    ("coldnhot", "0ff,00f,80:000,f00,ff0,fff"),
    ("seismic", "0000d0,80:d0d0d0,d00000"),
    ("gray", "000,fff"),
    ("hot", "000,f00,ff0,fff"),
    ("cold", "000,00f,0ff"),
    ("wred", "fff,f00"),
    ("wblue", "fff,00f"),
    ("france", "0055a4,80:fff,ef4135"),
    ("coolio", "00d0d0,80:d0d0d0,d000d0"),
    ("coleus", "00d000,80:d0d0d0,d000d0"),
];

/// A compiled colour map: node positions on 0..256 and their colours.
#[derive(Clone, Debug)]
pub struct ColorMap {
    indices: Vec<f64>,
    colors: Vec<[f64; 3]>,
}

fn hex(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s, 16).map_err(|_| format!("'{s}' is not hexadecimal"))
}

impl ColorMap {
    /// A built-in map by name, or a map from source such as `"00f,80:fff,f00"`.
    pub fn get(name_or_source: &str) -> Result<ColorMap> {
        let src = CMAPS.iter().find(|(n, _)| *n == name_or_source).map(|(_, s)| *s).unwrap_or(name_or_source);
        ColorMap::compile(src).map_err(|e| {
            let names: Vec<&str> = CMAPS.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!("colour map '{name_or_source}': {e} (built-in maps: {})", names.join(", ")))
        })
    }

    /// Compiles colour-map source.
    pub fn compile(src: &str) -> std::result::Result<ColorMap, String> {
        let mut nodes: Vec<(Option<u32>, [f64; 3])> = Vec::new();
        for item in src.split(',') {
            let item = item.trim();
            let (idx, col) = match item.split_once(':') {
                Some((i, c)) => {
                    let i = i.trim();
                    if i.is_empty() || i.len() > 2 {
                        return Err(format!("bad index '{i}'"));
                    }
                    let i = if i.len() == 1 { format!("{i}{i}") } else { i.to_string() };
                    (Some(hex(&i)?), c.trim())
                }
                None => (None, item),
            };
            let rgb: Vec<u32> = match col.len() {
                3 => col.chars().map(|c| hex(&format!("{c}{c}"))).collect::<std::result::Result<_, _>>()?,
                6 => (0..3).map(|k| hex(&col[2 * k..2 * k + 2])).collect::<std::result::Result<_, _>>()?,
                _ => return Err(format!("bad colour '{col}'")),
            };
            nodes.push((idx, [rgb[0] as f64, rgb[1] as f64, rgb[2] as f64]));
        }
        if nodes.len() < 2 {
            return Err("a colour map needs at least 2 colours".into());
        }
        // Unplaced colours are spread evenly between their placed neighbours; the first colour sits
        // at 0 and the last at 255 unless placed.
        let mut result: Vec<(f64, [f64; 3])> = Vec::new();
        let (first_idx, first_col) = nodes[0];
        result.push((0.0, first_col));
        if let Some(i) = first_idx
            && i > 0
        {
            result.push((i as f64, first_col));
        }
        let rest = &nodes[1..];
        let mut pending: Vec<[f64; 3]> = Vec::new();
        for (n, &(idx, col)) in rest.iter().enumerate() {
            let idx = match idx {
                None if n < rest.len() - 1 => {
                    pending.push(col);
                    continue;
                }
                None => 255,
                Some(i) => i,
            } as f64;
            let last = result.last().map(|r| r.0).unwrap_or(0.0);
            if idx < last {
                return Err("colour indices must ascend".into());
            }
            let k = pending.len();
            for (j, c) in pending.drain(..).enumerate() {
                let alpha = (j + 1) as f64 / (k + 1) as f64;
                result.push(((last * (1.0 - alpha) + idx * alpha).trunc(), c));
            }
            result.push((idx, col));
        }
        let last_col = result.last().map(|r| r.1).unwrap_or([0.0; 3]);
        result.push((256.0, last_col));
        Ok(ColorMap { indices: result.iter().map(|r| r.0).collect(), colors: result.iter().map(|r| r.1).collect() })
    }

    /// The colour (0..1) of a value in [0, 1].
    pub fn color(&self, x: f64) -> [f64; 3] {
        let x = (x * 255.0).clamp(0.0, 255.0);
        // First node strictly above x (searchsorted 'right' over all but the last node).
        let n = self.indices.len() - 1;
        let mut i = self.indices[..n].partition_point(|&v| v <= x);
        i = i.clamp(1, n);
        let (a, b) = (self.indices[i - 1], self.indices[i]);
        let alpha = (x - a) / (b - a);
        let (c0, c1) = (self.colors[i - 1], self.colors[i]);
        [0, 1, 2].map(|k| (c0[k] * (1.0 - alpha) + c1[k] * alpha) / 255.0)
    }

    /// The 8-bit palette at `level` (zennit's: 1 is the full map; below 1 narrows the colour
    /// range, above 1 saturates earlier).
    pub fn palette(&self, level: f64) -> [[u8; 3]; 256] {
        let mut p = [[0u8; 3]; 256];
        for (i, e) in p.iter_mut().enumerate() {
            let x = (-1.0 + 2.0 * i as f64 / 255.0) * level;
            let x = ((x + 1.0) / 2.0).clamp(0.0, 1.0);
            let c = self.color(x);
            // Rounding to 12 decimals first, as zennit, so that 254.9999999 becomes 255.
            *e = c.map(|v| ((v * 255.0 * 1e12).round() / 1e12).clamp(0.0, 255.0) as u8);
        }
        p
    }
}

/// How relevance maps to the colour scale (zennit's example script's `--relevance-norm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `(R + m) / 2m` with m = max |R|: zero is the middle colour.
    Symmetric,
    /// `|R| / max |R|`.
    Absolute,
    /// `(R − min) / (max − min)`.
    Unaligned,
}

impl std::str::FromStr for Norm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "symmetric" => Ok(Norm::Symmetric),
            "absolute" => Ok(Norm::Absolute),
            "unaligned" => Ok(Norm::Unaligned),
            _ => Err(format!("unknown relevance norm '{s}' (symmetric, absolute, unaligned)")),
        }
    }
}

/// Normalises a 2-d map to [0, 1]; an all-zero map becomes the middle (symmetric) or 0.
pub fn normalize(r: ArrayView2<f64>, norm: Norm) -> Array2<f64> {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    match norm {
        Norm::Symmetric => {
            let m = r.iter().fold(0.0f64, |a, &v| a.max(finite(v).abs()));
            r.mapv(|v| if m > 0.0 { (finite(v) + m) / (2.0 * m) } else { 0.5 })
        }
        Norm::Absolute => {
            let m = r.iter().fold(0.0f64, |a, &v| a.max(finite(v).abs()));
            r.mapv(|v| if m > 0.0 { finite(v).abs() / m } else { 0.0 })
        }
        Norm::Unaligned => {
            let lo = r.iter().fold(f64::INFINITY, |a, &v| a.min(finite(v)));
            let hi = r.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(finite(v)));
            r.mapv(|v| if hi > lo { (finite(v) - lo) / (hi - lo) } else { 0.0 })
        }
    }
}

/// An RGB heatmap `[h, w, 3]` of a normalised map (values in [0, 1], quantised as zennit: ⌊255·v⌋).
pub fn colorize(v: ArrayView2<f64>, palette: &[[u8; 3]; 256]) -> Array3<u8> {
    let (h, w) = v.dim();
    Array3::from_shape_fn((h, w, 3), |(y, x, c)| {
        let q = (v[[y, x]] * 255.0).clamp(0.0, 255.0) as usize;
        palette[q][c]
    })
}

/// Sums relevance `[c, h, w]` (or `[h, w]`) over channels.
pub fn channel_sum(r: &ndarray::ArrayViewD<f64>) -> Result<Array2<f64>> {
    match r.ndim() {
        2 => Ok(r.to_owned().into_dimensionality().map_err(|e| Error::Invalid(e.to_string()))?),
        3 => Ok(r.sum_axis(ndarray::Axis(0)).into_dimensionality().map_err(|e| Error::Invalid(e.to_string()))?),
        n => Err(Error::Invalid(format!("a heatmap needs relevance of rank 2 or 3 per sample, got rank {n}"))),
    }
}

/// Blends a heatmap onto a picture: the heatmap's weight grows with the relevance magnitude
/// (`alpha · |2v − 1|` for symmetric maps), so that irrelevant areas show the picture.
pub fn overlay(picture: &Array3<u8>, heat: &Array3<u8>, v: ArrayView2<f64>, alpha: f64) -> Array3<u8> {
    Array3::from_shape_fn(picture.dim(), |(y, x, c)| {
        let a = alpha * (2.0 * v[[y, x]] - 1.0).abs().sqrt();
        (picture[[y, x, c]] as f64 * (1.0 - a) + heat[[y, x, c]] as f64 * a).round().clamp(0.0, 255.0) as u8
    })
}

/// Tiles images of equal size into a grid with `cols` columns and a 2-pixel white gap.
pub fn grid(images: &[Array3<u8>], cols: usize) -> Result<Array3<u8>> {
    let first = images.first().ok_or_else(|| Error::Invalid("no images for the grid".into()))?;
    let (h, w, _) = first.dim();
    if images.iter().any(|i| i.dim() != first.dim()) {
        return Err(Error::Invalid("grid images must have the same size".into()));
    }
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let gap = 2;
    let mut out = Array3::from_elem((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255u8);
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        out.slice_mut(ndarray::s![r * (h + gap)..r * (h + gap) + h, c * (w + gap)..c * (w + gap) + w, ..]).assign(img);
    }
    Ok(out)
}

/// Writes an RGB image as PNG.
pub fn write_png(path: &Path, img: &Array3<u8>) -> Result<()> {
    let (h, w, _) = img.dim();
    let data: Vec<u8> = img.iter().copied().collect();
    image::save_buffer(path, &data, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Invalid(format!("cannot write {}: {e}", path.display())))
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Background colour of a token: red for positive, blue for negative, stronger with |r| / max.
fn token_rgb(r: f64, max: f64) -> [u8; 3] {
    let a = if max > 0.0 { (r.abs() / max).min(1.0) } else { 0.0 };
    let fade = (255.0 * (1.0 - a)).round() as u8;
    if r >= 0.0 { [255, fade, fade] } else { [fade, fade, 255] }
}

/// An HTML page with the tokens coloured by relevance, the numbers on hover, and a legend.
pub fn text_html(title: &str, tokens: &[String], relevance: &[f64]) -> String {
    let max = relevance.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let mut body = String::new();
    for (t, &r) in tokens.iter().zip(relevance) {
        let [cr, cg, cb] = token_rgb(r, max);
        body.push_str(&format!(
            "<span class=\"tok\" style=\"background: rgb({cr},{cg},{cb})\" title=\"relevance {r:+.6}\">{}</span> ",
            escape_html(t)
        ));
    }
    let legend: String = (0..=10)
        .map(|k| {
            let v = -1.0 + 0.2 * k as f64;
            let [cr, cg, cb] = token_rgb(v, 1.0);
            format!("<span style=\"background: rgb({cr},{cg},{cb})\">{:+.1}</span>", v * max)
        })
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body {{ font-family: sans-serif; margin: 2em; }} .tok {{ padding: 0.15em 0.25em; border-radius: 3px; \
         line-height: 2em; font-size: 1.3em; }} .legend span {{ display: inline-block; width: 4.5em; \
         text-align: center; font-size: 0.8em; }}</style></head>\n<body><h2>{t}</h2>\n<p>{body}</p>\n\
         <p class=\"legend\">{legend}</p>\n<p>Red: evidence for the target, blue: against. Hover a token for its relevance. \
         Σ R = {sum:.6}</p></body></html>\n",
        t = escape_html(title),
        sum = relevance.iter().sum::<f64>()
    )
}

/// Tokens with their relevance for a terminal: 24-bit colour backgrounds when `color`.
pub fn text_terminal(tokens: &[String], relevance: &[f64], color: bool) -> String {
    let max = relevance.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let mut s = String::new();
    for (t, &r) in tokens.iter().zip(relevance) {
        if color {
            let [cr, cg, cb] = token_rgb(r, max);
            s.push_str(&format!("\x1b[48;2;{cr};{cg};{cb}m\x1b[38;2;0;0;0m {t} \x1b[0m"));
        } else {
            s.push_str(&format!("{t}({r:+.4}) "));
        }
    }
    s.trim_end().to_string()
}

/// A plot of a 1-d signal (top, grey) with its relevance per pixel column below (red positive,
/// blue negative), and optionally a per-segment score curve (green) over the signal.
pub fn signal_plot(signal: &[f32], relevance: &[f64], scores: Option<&[f64]>, width: usize) -> Array3<u8> {
    let (h_sig, h_rel, gap) = (160usize, 120usize, 6usize);
    let height = h_sig + gap + h_rel;
    let mut img = Array3::from_elem((height, width, 3), 255u8);
    let n = signal.len().max(1);
    let col = |x: usize| (x * n / width, ((x + 1) * n / width).max(x * n / width + 1).min(n));
    let smax = signal.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-9);
    let rsum: Vec<f64> = (0..width)
        .map(|x| {
            let (a, b) = col(x);
            relevance.get(a..b.min(relevance.len())).map(|s| s.iter().sum()).unwrap_or(0.0)
        })
        .collect();
    let rmax = rsum.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-30);
    let mid = h_sig / 2;
    for (x, &rs) in rsum.iter().enumerate() {
        let (a, b) = col(x);
        let seg = &signal[a.min(signal.len())..b.min(signal.len())];
        let lo = seg.iter().fold(0.0f32, |m, v| m.min(*v));
        let hi = seg.iter().fold(0.0f32, |m, v| m.max(*v));
        let y0 = (mid as f32 - hi / smax * (mid as f32 - 2.0)) as usize;
        let y1 = (mid as f32 - lo / smax * (mid as f32 - 2.0)) as usize;
        for y in y0.min(h_sig - 1)..=y1.min(h_sig - 1) {
            img.slice_mut(ndarray::s![y, x, ..]).assign(&ndarray::arr1(&[90u8, 90, 90]));
        }
        let r = rs / rmax;
        let base = h_sig + gap + h_rel / 2;
        let len = (r.abs() * (h_rel / 2 - 1) as f64) as usize;
        let c = if r >= 0.0 { [214u8, 39, 40] } else { [31u8, 119, 180] };
        for k in 0..=len {
            let y = if r >= 0.0 { base - k } else { base + k };
            img.slice_mut(ndarray::s![y, x, ..]).assign(&ndarray::arr1(&c));
        }
        img.slice_mut(ndarray::s![base, x, ..]).assign(&ndarray::arr1(&[180u8, 180, 180]));
    }
    if let Some(sc) = scores
        && !sc.is_empty()
    {
        for x in 0..width {
            let k = (x * sc.len() / width).min(sc.len() - 1);
            let y = ((1.0 - sc[k].clamp(0.0, 1.0)) * (h_sig - 1) as f64) as usize;
            for dy in 0..2 {
                img.slice_mut(ndarray::s![(y + dy).min(h_sig - 1), x, ..]).assign(&ndarray::arr1(&[44u8, 160, 44]));
            }
        }
    }
    img
}

/// Draws text with an 8×8 bitmap font (font8x8, public domain) at (x, y), `scale` pixels per dot.
pub fn draw_text(img: &mut Array3<u8>, x: usize, y: usize, text: &str, color: [u8; 3], scale: usize) {
    use font8x8::UnicodeFonts;
    let (h, w, _) = img.dim();
    for (k, ch) in text.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else { continue };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (yy, xx) = (y + row * scale + dy, x + (k * 8 + col) * scale + dx);
                            if yy < h && xx < w {
                                for c in 0..3 {
                                    img[[yy, xx, c]] = color[c];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn draw_line(img: &mut Array3<u8>, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: [u8; 3], dashed: bool) {
    let (h, w, _) = img.dim();
    let n = ((x1 - x0).abs().max((y1 - y0).abs()) * 2.0).ceil().max(1.0) as usize;
    for k in 0..=n {
        let t = k as f64 / n as f64;
        if dashed && (k / 6) % 2 == 1 {
            continue;
        }
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0.0, 0.0), (0.0, 1.0)] {
            let (xx, yy) = ((x + dx).round() as isize, (y + dy).round() as isize);
            if xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h {
                for c in 0..3 {
                    img[[yy as usize, xx as usize, c]] = color[c];
                }
            }
        }
    }
}

/// One curve of a line plot.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Colour.
    pub color: [u8; 3],
    /// Dashed line.
    pub dashed: bool,
    /// Values at x = 0, 1, 2, ...
    pub values: Vec<f64>,
}

/// A line plot with axes, tick labels, axis titles and a legend.
pub fn line_plot(series: &[Series], title: &str, x_label: &str, y_label: &str) -> Array3<u8> {
    let (w, h) = (900usize, 560usize);
    let (left, right, top, bottom) = (80.0, 260.0, 40.0, 60.0);
    let mut img = Array3::from_elem((h, w, 3), 255u8);
    let finite = series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| v.is_finite());
    let (mut lo, mut hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let xmax = series.iter().map(|s| s.values.len()).max().unwrap_or(1).saturating_sub(1).max(1) as f64;
    let (pw, ph) = (w as f64 - left - right, h as f64 - top - bottom);
    let px = |i: f64| left + i / xmax * pw;
    let py = |v: f64| top + (1.0 - (v - lo) / (hi - lo)) * ph;
    let black = [0u8, 0, 0];
    draw_line(&mut img, (left, top), (left, top + ph), black, false);
    draw_line(&mut img, (left, top + ph), (left + pw, top + ph), black, false);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let y = py(v);
        draw_line(&mut img, (left - 5.0, y), (left, y), black, false);
        draw_text(&mut img, 4, (y - 4.0).max(0.0) as usize, &format!("{v:>8.2}"), black, 1);
        let xi = xmax * k as f64 / 4.0;
        let x = px(xi);
        draw_line(&mut img, (x, top + ph), (x, top + ph + 5.0), black, false);
        draw_text(&mut img, (x - 12.0).max(0.0) as usize, (top + ph + 10.0) as usize, &format!("{:.0}", xi), black, 1);
    }
    draw_text(&mut img, left as usize, 12, title, black, 2);
    draw_text(&mut img, (left + pw / 2.0 - 4.0 * x_label.len() as f64) as usize, h - 24, x_label, black, 1);
    draw_text(&mut img, 4, (top - 14.0) as usize, y_label, black, 1);
    for (k, s) in series.iter().enumerate() {
        for i in 1..s.values.len() {
            let (a, b) = (s.values[i - 1], s.values[i]);
            if a.is_finite() && b.is_finite() {
                draw_line(&mut img, (px((i - 1) as f64), py(a)), (px(i as f64), py(b)), s.color, s.dashed);
            }
        }
        let ly = top + 10.0 + 18.0 * k as f64;
        let lx = left + pw + 15.0;
        draw_line(&mut img, (lx, ly + 4.0), (lx + 30.0, ly + 4.0), s.color, s.dashed);
        draw_text(&mut img, (lx + 36.0) as usize, ly as usize, &s.label, black, 1);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwr_ends_and_middle() {
        let p = ColorMap::get("bwr").unwrap().palette(1.0);
        assert_eq!(p[0], [0, 0, 255]);
        assert_eq!(p[255], [255, 0, 0]);
        assert!(p[128][0] >= 250 && p[128][1] >= 250);
        assert!(ColorMap::get("nope").is_err());
        assert!(ColorMap::get("00f,x").is_err());
    }

    #[test]
    fn normalisations() {
        let r = ndarray::array![[-2.0, 0.0], [1.0, 2.0]];
        assert_eq!(normalize(r.view(), Norm::Symmetric), ndarray::array![[0.0, 0.5], [0.75, 1.0]]);
        assert_eq!(normalize(r.view(), Norm::Absolute), ndarray::array![[1.0, 0.0], [0.5, 1.0]]);
        assert_eq!(normalize(r.view(), Norm::Unaligned), ndarray::array![[0.0, 0.5], [0.75, 1.0]]);
    }
}
