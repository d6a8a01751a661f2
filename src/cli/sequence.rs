//! Sequences: sentences (token relevance as HTML and in the terminal) and audio (relevance under
//! the waveform as PNG and CSV).

use super::explain::{ExplainArgs, settings, targets};
use anyhow::{Context, Result, bail};
use relprop::attribution::{attribute, prepare};
use relprop::graph::{Dim, ElemKind, Graph, prepare_consts, run};
use relprop::tensor::{Float, Value};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Zero tensors for the graph inputs after the first (e.g. recurrent states), of their declared shapes.
fn zero_states(g: &Graph) -> Result<Vec<Value<f32>>> {
    g.inputs
        .iter()
        .skip(1)
        .map(|i| {
            let dims: Vec<usize> = i
                .dims
                .as_ref()
                .context("an extra input has no declared shape")?
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => Ok(*n),
                    Dim::Free(s) => {
                        bail!("input '{}' has a free dimension '{s}'; cannot make zeros for it", g.names[i.id])
                    }
                })
                .collect::<Result<_>>()?;
            Ok(match i.kind {
                ElemKind::Float => Value::F(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims))),
                ElemKind::Int => Value::I(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims))),
            })
        })
        .collect()
}

pub fn explain_text(a: &ExplainArgs, g: &Graph) -> Result<ExitCode> {
    let text = a.text.as_deref().unwrap_or("");
    let vocab_path = a.vocab.as_ref().context("--text needs --vocab FILE")?;
    let vocab_text =
        std::fs::read_to_string(vocab_path).with_context(|| format!("reading {}", vocab_path.display()))?;
    let vocab: std::collections::HashMap<&str, i64> =
        vocab_text.lines().enumerate().map(|(i, w)| (w.trim(), i as i64)).collect();
    let text = if a.lowercase { text.to_lowercase() } else { text.to_string() };
    let tokens: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    if tokens.is_empty() {
        bail!("--text is empty");
    }
    let mut ids = Vec::new();
    for t in &tokens {
        match (vocab.get(t.as_str()), a.unk_id) {
            (Some(&i), _) => ids.push(i),
            (None, Some(u)) => ids.push(u),
            (None, None) => {
                bail!("the word '{t}' is not in {} (use --unk-id ID to map unknown words)", vocab_path.display())
            }
        }
    }
    let x = Value::<f32>::I(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, ids.len()]), ids)?);
    let mut inputs = vec![x];
    inputs.extend(zero_states(g)?);
    let (s, _) = settings(a, None)?;
    let p = prepare(g, &inputs, &s)?;
    let e = attribute(&p, &s.method, inputs, targets(&a.target)?.as_deref(), &[])?;
    let r: Vec<f64> = e.relevance[0].as_ref().context("no relevance for the tokens")?.iter().map(|v| v.f64()).collect();
    let title = format!("target {} (score {:.4}), Σ R = {:.4}", e.targets[0], e.scores[0], r.iter().sum::<f64>());
    println!("{title}");
    println!("{}", relprop::render::text_terminal(&tokens, &r, std::io::stdout().is_terminal()));
    if e.dropped != 0.0 {
        println!("relevance reaching the initial states (and other constants): {:.6}", e.dropped);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let html = a.out.join("text.html");
    std::fs::write(&html, relprop::render::text_html(&title, &tokens, &r))?;
    println!("wrote {}", html.display());
    Ok(ExitCode::SUCCESS)
}

pub fn explain_audio(a: &ExplainArgs, g: &Graph) -> Result<ExitCode> {
    let path = a.wav.as_ref().context("--wav")?;
    if a.chunk == 0 {
        bail!("--chunk must be positive");
    }
    let samples = relprop::io::read_wav(path, 16000)?;
    let frames = relprop::preprocess::audio_frames(&samples, a.chunk, a.context);
    let mut inputs = vec![Value::F(frames.into_dyn())];
    inputs.extend(zero_states(g)?);
    let probs: Vec<f64> =
        run(g, &prepare_consts::<f32>(g), inputs.clone())?[0].to_float().iter().map(|&v| v as f64).collect();
    let (s, name) = settings(a, None)?;
    let p = prepare(g, &inputs, &s)?;
    let e = attribute(&p, &s.method, inputs, targets(&a.target)?.as_deref(), &[])?;
    let rf = e.relevance[0].as_ref().context("no relevance for the audio")?.mapv(|v| v.f64());
    let rf = rf.into_dimensionality::<ndarray::Ix2>().context("audio relevance must be [frames, samples]")?;
    let rel = relprop::preprocess::audio_relevance(rf.view(), samples.len(), a.chunk, a.context);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("audio");
    let png = a.out.join(format!("{stem}_{name}.png"));
    relprop::render::write_png(&png, &relprop::render::signal_plot(&samples, &rel, Some(&probs), 1200))?;
    let csv = a.out.join(format!("{stem}_{name}.csv"));
    let mut text = String::from("sample,seconds,amplitude,relevance\n");
    for (i, (x, r)) in samples.iter().zip(&rel).enumerate() {
        text.push_str(&format!("{i},{:.6},{x:.6},{r:.6e}\n", i as f64 / 16000.0));
    }
    std::fs::write(&csv, text)?;
    let total: f64 = rel.iter().sum();
    println!("{} frames of {} samples; Σ R = {total:.5}; speech probability per frame:", probs.len(), a.chunk);
    println!("  {}", probs.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>().join(" "));
    println!("wrote {} and {}", png.display(), csv.display());
    Ok(ExitCode::SUCCESS)
}
