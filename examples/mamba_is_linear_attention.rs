//! Mamba's selective SSM is masked linear attention (docs/MILA.md, section 1; Han et al., "Demystify Mamba in
//! Vision: A Linear Attention Perspective", NeurIPS 2024).
//!
//! One short sequence goes through one selective SSM twice:
//!
//! 1. recurrently, with the scan op: a state of S numbers per channel is carried from token to token;
//! 2. all at once, as attention: an L x L matrix per channel, lower triangular, applied to the values.
//!
//! Both give the same output to roundoff. The comments say which term is which of the six designs by which
//! the paper tells Mamba from linear attention.
//!
//! Run: `cargo run --release --example mamba_is_linear_attention`

use engine::{DType, Device, Generator, Result, Tensor};

/// Tokens, channels and the state size (d_state) of the toy model.
const L: usize = 6;
const C: usize = 3;
const S: usize = 4;

/// PyTorch's softplus, as the scan op applies it to delta.
fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn main() -> Result<()> {
    // ---- Data: one sequence (batch 1), channels first, as the scan takes it. ----------------------------
    // In a Mamba block, x is the token sequence after in_proj and the causal conv; delta, B and C are
    // projections of x (x_proj, dt_proj); here they are random, which changes nothing in the algebra.
    let mut g = Generator::new(2024);
    let mut randn = |shape: &[usize], scale: f64| Tensor::randn(shape, 0.0, scale, DType::F64, Device::Cpu, &mut g);
    let x = randn(&[1, C, L], 1.0)?; // values v_j = x_j (linear attention's v, here without a projection)
    let delta = randn(&[1, C, L], 1.0)?; // x_j W_Delta, before the bias and softplus
    let delta_bias = randn(&[C], 0.5)?;
    let b = randn(&[1, S, L], 1.0)?; // keys k_j = B_j, width d_state
    let c = randn(&[1, S, L], 1.0)?; // queries q_i = C_i, width d_state
    let d = randn(&[C], 1.0)?; // the shortcut's per-channel weight
    let z = randn(&[1, C, L], 1.0)?; // the gate branch of the block
                                     // Mamba's init: A_log = ln(1..S) in every row, A = -exp(A_log) = -(1..S). Negative: a decay.
    let a_values: Vec<f64> = (0..C).flat_map(|_| (1..=S).map(|n| -(n as f64))).collect();
    let a = Tensor::from_f64(&a_values, &[C, S], DType::F64, Device::Cpu)?;

    // ---- 1. The recurrent view: the scan op. ------------------------------------------------------------
    // h_i = exp(Delta_i A) h_{i-1} + Delta_i B_i x_i,  y_i = C_i . h_i + D x_i,  out_i = y_i silu(z_i).
    let out_scan = ops::selective_scan(&x, &delta, &a, &b, &c, Some(&d), Some(&z), Some(&delta_bias), true)?;

    // ---- 2. The attention view, in plain loops. ---------------------------------------------------------
    let (xv, dv, biasv) = (x.to_vec_f64()?, delta.to_vec_f64()?, delta_bias.to_vec_f64()?);
    let (bv, cv, dd, zv) = (b.to_vec_f64()?, c.to_vec_f64()?, d.to_vec_f64()?, z.to_vec_f64()?);
    let (q, k) = (|n: usize, i: usize| cv[n * L + i], |n: usize, j: usize| bv[n * L + j]);
    let mut out_attn = vec![0.0; C * L];
    for ch in 0..C {
        let row = |v: &[f64]| v[ch * L..(ch + 1) * L].to_vec();
        let (xs, zs) = (row(&xv), row(&zv));
        // Design 1, the INPUT GATE: Delta_j = softplus(x_j W_Delta + b) scales what token j writes into the
        // state. In the attention view it scales the value: v'_j = Delta_j x_j. Linear attention has none.
        let dt: Vec<f64> = row(&dv).iter().map(|&v| softplus(v + biasv[ch])).collect();
        // Design 2, the FORGET GATE: the decay mask. Token j's contribution reaches token i after being
        // multiplied by exp(Delta_k A) at every step k = j+1..i in between:
        //     M[n][i][j] = exp(A[n] * sum_{k=j+1..i} Delta_k)   (j <= i; 0 above the diagonal)
        // It is in (0, 1] and shrinks with distance, one mask per channel and state. Linear attention's mask is
        // all ones (causal) or absent (non-causal). This is what forces the recurrent, causal scan.
        let mask = |n: usize, i: usize, j: usize| (a_values[ch * S + n] * dt[j + 1..=i].iter().sum::<f64>()).exp();
        // The attention matrix P[i][j] = sum_n q_i[n] M[n][i][j] k_j[n]: the masked q k^T, the mask applied per
        // state before summing over the state dim (with one A for all states, as in Mamba-2, M factors out and
        // P = M * (C B^T) elementwise).
        //
        // Design 5, SINGLE HEAD: the queries C_i and keys B_j have d_state = S entries and are the same for every
        // channel, so all C channels share one q/k pair of width S. Linear attention splits C channels into h
        // heads of width C/h, each with its own q and k.
        let mut p = vec![vec![0.0; L]; L];
        for (i, pi) in p.iter_mut().enumerate() {
            for (j, pij) in pi.iter_mut().enumerate().take(i + 1) {
                *pij = (0..S).map(|n| q(n, i) * mask(n, i, j) * k(n, j)).sum();
            }
        }
        if ch == 0 {
            println!("channel 0's attention matrix P (lower triangular: causal, fading with distance):");
            for pi in &p {
                println!("  {}", pi.iter().map(|v| format!("{v:8.4}")).collect::<Vec<_>>().join(" "));
            }
        }
        for i in 0..L {
            // Design 4, NO NORMALISATION: linear attention divides by q_i . sum_j k_j; Mamba does not.
            let attn: f64 = (0..=i).map(|j| p[i][j] * dt[j] * xs[j]).sum();
            // Design 3, the SHORTCUT: + D x_i, a learned per-channel skip around the attention.
            let y = attn + dd[ch] * xs[i];
            // Design 6, the BLOCK DESIGN: the SSM sits in a block whose gate branch multiplies its output by
            // silu(z) (z = another projection of the block's input), between in_proj, a causal conv + SiLU and
            // out_proj. The gate is outside the attention; the scan op fuses it.
            out_attn[ch * L + i] = y * silu(zs[i]);
        }
    }

    // ---- Compare. --------------------------------------------------------------------------------------
    let out_scan = out_scan.to_vec_f64()?;
    let largest = out_scan.iter().zip(&out_attn).map(|(s, t)| (s - t).abs()).fold(0.0, f64::max);
    println!(
        "scan output, channel 0:      {:?}",
        &out_scan[..L].iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>()
    );
    println!(
        "attention output, channel 0: {:?}",
        &out_attn[..L].iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>()
    );
    println!("largest difference over {C} channels x {L} tokens: {largest:.3e}");
    assert!(largest <= 1e-12, "the scan and the attention view differ by {largest:e}");
    println!("the recurrent scan and the masked linear attention are the same function");
    Ok(())
}
