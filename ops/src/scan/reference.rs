//! The naive selective scan, for tests: the formulas of mod.rs as a plain time loop in f64 that stores the
//! whole (B, C, S, L) state sequence, as Mamba's `selective_scan_ref` does.

use engine::{Result, Tensor};

/// The selective scan by its definition: u, delta, z (B, C, L); A (C, S); B, C (B, S, L); D, delta_bias (C).
/// Accumulates in f64 and returns out (B, C, L) in u's dtype on u's device; no gradient (tests take its
/// derivatives by finite differences). Same arguments and checks as [`super::selective_scan`].
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_ref(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> Result<Tensor> {
    let dims = super::check(u, delta, a, b, c, d, z, delta_bias)?;
    let (nb, nc, l, ns) = (dims.batch, dims.channels, dims.length, dims.states);
    let (uv, dv, av, bv, cv) =
        (u.to_vec_f64()?, delta.to_vec_f64()?, a.to_vec_f64()?, b.to_vec_f64()?, c.to_vec_f64()?);
    let dd = d.map(|t| t.to_vec_f64()).transpose()?;
    let zv = z.map(|t| t.to_vec_f64()).transpose()?;
    let biasv = delta_bias.map(|t| t.to_vec_f64()).transpose()?;
    // PyTorch's softplus (threshold 20).
    let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
    let silu = |x: f64| x / (1.0 + (-x).exp());
    // h[((b C + c) S + n) L + t]: every state at every step.
    let mut h = vec![0.0; nb * nc * ns * l];
    let mut out = vec![0.0; nb * nc * l];
    for bi in 0..nb {
        for ci in 0..nc {
            let row = bi * nc + ci;
            for t in 0..l {
                let raw = dv[row * l + t] + biasv.as_ref().map_or(0.0, |v| v[ci]);
                let dt = if delta_softplus { softplus(raw) } else { raw };
                let x = uv[row * l + t];
                let mut y = dd.as_ref().map_or(0.0, |v| v[ci]) * x;
                for n in 0..ns {
                    let i = (row * ns + n) * l + t;
                    let prev = if t == 0 { 0.0 } else { h[i - 1] };
                    let bm = bv[(bi * ns + n) * l + t];
                    let cm = cv[(bi * ns + n) * l + t];
                    h[i] = (dt * av[ci * ns + n]).exp() * prev + dt * bm * x;
                    y += cm * h[i];
                }
                if let Some(zv) = &zv {
                    y *= silu(zv[row * l + t]);
                }
                out[row * l + t] = y;
            }
        }
    }
    Tensor::from_f64(&out, &[nb, nc, l], u.dtype(), u.device())
}
