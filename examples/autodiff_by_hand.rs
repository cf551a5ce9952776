//! Backpropagation by hand, then by the engine: the same gradients, to the last few bits.
//!
//! A two-layer network classifies N = 4 points of D = 3 features into K = 3 classes through H = 5 hidden
//! tanh units, with a softmax cross-entropy loss. Below, every gradient is first derived on paper (the
//! comments), then computed with plain loops over `Vec<f64>`, then computed by the engine's `backward`,
//! and the two are compared element by element.
//!
//! Run: `cargo run --release --example autodiff_by_hand` (exits nonzero if any gradient differs by more
//! than 1e-12).

use std::process::ExitCode;

use engine::{DType, Device, Generator, Result, Tensor};
use ops::TensorOps;

const N: usize = 4; // samples
const D: usize = 3; // input features
const H: usize = 5; // hidden units
const K: usize = 3; // classes

fn main() -> Result<ExitCode> {
    // ---- Data and parameters: row-major Vec<f64>s, the same numbers the engine gets. -----------------
    let mut g = Generator::new(42);
    let x = g.normal_vec(N * D, 0.0, 1.0); // x[n][i]     (N, D)
    let w1 = g.normal_vec(H * D, 0.0, 0.5); // W1[j][i]   (H, D), PyTorch's Linear layout (out, in)
    let b1 = g.normal_vec(H, 0.0, 0.1); // b1[j]          (H)
    let w2 = g.normal_vec(K * H, 0.0, 0.5); // W2[k][j]   (K, H)
    let b2 = g.normal_vec(K, 0.0, 0.1); // b2[k]          (K)
    let labels = [0usize, 2, 1, 2]; // y[n]

    // ---- Forward, by hand. -----------------------------------------------------------------------------
    //   z1[n][j] = sum_i x[n][i] W1[j][i] + b1[j]        (N, H)
    //   a[n][j]  = tanh(z1[n][j])                        (N, H)
    //   z2[n][k] = sum_j a[n][j] W2[k][j] + b2[k]        (N, K)   the logits
    //   p[n][k]  = exp(z2[n][k]) / sum_c exp(z2[n][c])   (N, K)   softmax
    //   L        = -(1/N) sum_n log p[n][y[n]]                    mean cross-entropy
    let mut a = vec![0.0; N * H];
    for n in 0..N {
        for j in 0..H {
            let z1: f64 = (0..D).map(|i| x[n * D + i] * w1[j * D + i]).sum::<f64>() + b1[j];
            a[n * H + j] = z1.tanh();
        }
    }
    let mut p = [0.0; N * K];
    let mut loss = 0.0;
    for n in 0..N {
        let z2: Vec<f64> = (0..K).map(|k| (0..H).map(|j| a[n * H + j] * w2[k * H + j]).sum::<f64>() + b2[k]).collect();
        // Subtracting the row's max changes no probability (it cancels in the ratio) and keeps exp from
        // overflowing.
        let m = z2.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = z2.iter().map(|z| (z - m).exp()).sum();
        for k in 0..K {
            p[n * K + k] = (z2[k] - m).exp() / total;
        }
        loss -= p[n * K + labels[n]].ln() / N as f64;
    }

    // ---- Backward, by hand: the chain rule from the loss down, one layer at a time. --------------------
    // Softmax and log together. log p[n][y] = z2[n][y] - log sum_c exp(z2[n][c]), so
    //   d log p[n][y] / d z2[n][k] = [k == y] - exp(z2[n][k]) / sum_c exp(z2[n][c]) = [k == y] - p[n][k],
    // and with L's -1/N:
    //   dL/dz2[n][k] = (p[n][k] - [k == y[n]]) / N                     (N, K)
    let mut dz2 = [0.0; N * K];
    for n in 0..N {
        for k in 0..K {
            let onehot = if k == labels[n] { 1.0 } else { 0.0 };
            dz2[n * K + k] = (p[n * K + k] - onehot) / N as f64;
        }
    }
    // The second layer. z2[n][k] = sum_j a[n][j] W2[k][j] + b2[k] depends on W2[k][j] through every sample n
    // and on a[n][j] through every class k, so each gradient sums over the index it does not carry:
    //   dL/dW2[k][j] = sum_n dL/dz2[n][k] a[n][j]                     (K, H)  = dz2^T a
    //   dL/db2[k]    = sum_n dL/dz2[n][k]                             (K)
    //   dL/da[n][j]  = sum_k dL/dz2[n][k] W2[k][j]                    (N, H)  = dz2 W2
    let mut dw2 = vec![0.0; K * H];
    let mut db2 = vec![0.0; K];
    let mut da = [0.0; N * H];
    for n in 0..N {
        for k in 0..K {
            db2[k] += dz2[n * K + k];
            for j in 0..H {
                dw2[k * H + j] += dz2[n * K + k] * a[n * H + j];
                da[n * H + j] += dz2[n * K + k] * w2[k * H + j];
            }
        }
    }
    // tanh, elementwise: d tanh(z) / dz = 1 - tanh(z)^2, and tanh(z1) is a, already at hand:
    //   dL/dz1[n][j] = dL/da[n][j] (1 - a[n][j]^2)                     (N, H)
    let dz1: Vec<f64> = da.iter().zip(&a).map(|(d, a)| d * (1.0 - a * a)).collect();
    // The first layer, the same shape of rule as the second:
    //   dL/dW1[j][i] = sum_n dL/dz1[n][j] x[n][i]                     (H, D)  = dz1^T x
    //   dL/db1[j]    = sum_n dL/dz1[n][j]                             (H)
    //   dL/dx[n][i]  = sum_j dL/dz1[n][j] W1[j][i]                    (N, D)  = dz1 W1
    let mut dw1 = vec![0.0; H * D];
    let mut db1 = vec![0.0; H];
    let mut dx = vec![0.0; N * D];
    for n in 0..N {
        for j in 0..H {
            db1[j] += dz1[n * H + j];
            for i in 0..D {
                dw1[j * D + i] += dz1[n * H + j] * x[n * D + i];
                dx[n * D + i] += dz1[n * H + j] * w1[j * D + i];
            }
        }
    }

    // ---- The same network on the engine. ---------------------------------------------------------------
    // Every tensor is a leaf that requires grad; the forward records the tape; `backward` walks it in
    // reverse, each op turning the gradient of its output into gradients of its inputs.
    let leaf = |v: &[f64], shape: &[usize]| Tensor::from_f64(v, shape, DType::F64, Device::Cpu)?.requires_grad_(true);
    let (tx, tw1, tb1) = (leaf(&x, &[N, D])?, leaf(&w1, &[H, D])?, leaf(&b1, &[H])?);
    let (tw2, tb2) = (leaf(&w2, &[K, H])?, leaf(&b2, &[K])?);
    let hidden = tx.matmul(&tw1.t()?)?.add(&tb1)?.tanh()?; // (N, H)
    let logits = hidden.matmul(&tw2.t()?)?.add(&tb2)?; // (N, K)
    let engine_loss = ops::cross_entropy(&logits, &labels, 0.0)?;
    engine_loss.backward()?;

    // ---- Compare. ---------------------------------------------------------------------------------------
    // Both sides do the same arithmetic in a different order, so they agree to roundoff: a few ulps of
    // O(1) numbers, far below 1e-12. A wrong derivation (a missing 1/N, a transposed W, tanh' taken as
    // 1 - z^2) would be off by O(1).
    println!("loss: by hand {loss:.15}, engine {:.15}", engine_loss.to_scalar()?);
    let mut worst = (engine_loss.to_scalar()? - loss).abs();
    for (name, by_hand, tensor) in [
        ("dL/dW1", &dw1, &tw1),
        ("dL/db1", &db1, &tb1),
        ("dL/dW2", &dw2, &tw2),
        ("dL/db2", &db2, &tb2),
        ("dL/dx", &dx, &tx),
    ] {
        let engine = tensor.grad().map(|t| t.to_vec_f64()).transpose()?.unwrap_or_default();
        if engine.len() != by_hand.len() {
            println!("{name}: the engine gave {} values, the hand derivation {}", engine.len(), by_hand.len());
            return Ok(ExitCode::FAILURE);
        }
        let diff = by_hand.iter().zip(&engine).map(|(h, e)| (h - e).abs()).fold(0.0, f64::max);
        let largest = by_hand.iter().map(|v| v.abs()).fold(0.0, f64::max);
        println!("{name:<7} {:>2} elements, largest {largest:.3e}, max |hand - engine| {diff:.3e}", by_hand.len());
        worst = worst.max(diff);
    }
    println!("max difference over the loss and every gradient: {worst:.3e}");
    if worst <= 1e-12 {
        println!("the hand-derived gradients and the engine's backward agree");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISMATCH: {worst:e} > 1e-12");
        Ok(ExitCode::FAILURE)
    }
}
