//! MILA's LinearAttention (docs/MILA.md, section 2) composed from the ops, against
//! `fixtures/linear_attention.safetensors`: the output and the gradients of the input and of every parameter.

use std::collections::HashMap;

use engine::{DType, Result, Tensor};
use ops::TensorOps;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/linear_attention.safetensors");

/// Every tensor of a safetensors file (all float64), as CPU tensors, with the config of its metadata.
fn load(path: &str) -> (HashMap<String, Tensor>, String) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F64, "{name}");
        let v: Vec<f64> = view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
        out.insert(name, Tensor::from_vec(v, view.shape()).unwrap());
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().and_then(|m| m.get("config").cloned()).unwrap_or_default();
    (out, config)
}

struct Params {
    qk_weight: Tensor,
    qk_bias: Tensor,
    lepe_weight: Tensor,
    lepe_bias: Tensor,
}

/// The official forward: x (B, N, C) on an h x w grid with `heads` heads.
fn linear_attention(x: &Tensor, p: &Params, (h, w): (usize, usize), heads: usize) -> Result<Tensor> {
    let (b, n, c) = (x.dim(0)?, x.dim(1)?, x.dim(2)?);
    let d = c / heads;
    let qk = x.matmul(&p.qk_weight.t()?)?.add(&p.qk_bias)?; // (B, N, 2C)
    let q = qk.narrow(2, 0, c)?.elu(1.0)?.add_scalar(1.0)?;
    let k = qk.narrow(2, c, c)?.elu(1.0)?.add_scalar(1.0)?;
    let (q_rope, k_rope) = (q.rope2d(h, w, 10000.0)?, k.rope2d(h, w, 10000.0)?);
    // (B, N, C) -> (B, heads, N, d)
    let split = |t: &Tensor| t.reshape(&[b as isize, n as isize, heads as isize, d as isize])?.permute(&[0, 2, 1, 3]);
    let (q, k, v, q_rope, k_rope) = (split(&q)?, split(&k)?, split(x)?, split(&q_rope)?, split(&k_rope)?);
    // z = 1 / (q . mean_tokens(k) + 1e-6), per token and head: (B, heads, N, 1)
    let z = q.matmul(&k.mean(&[-2], true)?.transpose(-2, -1)?)?.add_scalar(1e-6)?.powf(-1.0)?;
    let scale = (n as f64).powf(-0.5);
    let kv = k_rope.transpose(-2, -1)?.mul_scalar(scale)?.matmul(&v.mul_scalar(scale)?)?; // (B, heads, d, d)
    let out = q_rope.matmul(&kv)?.mul(&z)?.transpose(1, 2)?.reshape(&[b as isize, n as isize, c as isize])?;
    // LePE: the depthwise 3x3 conv of v seen as a (B, C, H, W) image.
    let image = x.reshape(&[b as isize, h as isize, w as isize, c as isize])?.permute(&[0, 3, 1, 2])?;
    let lepe = image.conv2d(&p.lepe_weight, Some(&p.lepe_bias), (1, 1), (1, 1), (1, 1), c)?;
    out.add(&lepe.permute(&[0, 2, 3, 1])?.reshape(&[b as isize, n as isize, c as isize])?)
}

fn rel_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let diff: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    diff / w.iter().map(|v| v * v).sum::<f64>().sqrt()
}

#[test]
fn linear_attention_matches_the_pytorch_fixture() {
    let (t, config) = load(FIXTURE);
    assert!(config.contains("\"dim\": 16") && config.contains("\"num_heads\": 2"), "{config}");
    // Tolerances of the fixtures' README: f64 to 1e-9; f32 to 1e-5 (outputs) and 1e-4 (gradients).
    for (dtype, tol_out, tol_grad) in [(DType::F64, 1e-9, 1e-9), (DType::F32, 1e-5, 1e-4)] {
        let leaf = |name: &str| t[name].detach().to_dtype(dtype).unwrap().requires_grad_(true).unwrap();
        let x = leaf("input");
        let p = Params {
            qk_weight: leaf("param.qk.weight"),
            qk_bias: leaf("param.qk.bias"),
            lepe_weight: leaf("param.lepe.weight"),
            lepe_bias: leaf("param.lepe.bias"),
        };
        let y = linear_attention(&x, &p, (4, 4), 2).unwrap();
        let e = rel_error(&y, &t["output"]);
        assert!(e < tol_out, "{dtype} output: relative error {e:.2e}");
        y.backward_with(&t["cotangent"].to_dtype(dtype).unwrap()).unwrap();
        for (name, leaf) in [
            ("grad.input", &x),
            ("grad.qk.weight", &p.qk_weight),
            ("grad.qk.bias", &p.qk_bias),
            ("grad.lepe.weight", &p.lepe_weight),
            ("grad.lepe.bias", &p.lepe_bias),
        ] {
            let e = rel_error(&leaf.grad().unwrap(), &t[name]);
            assert!(e < tol_grad, "{dtype} {name}: relative error {e:.2e}");
        }
    }
}
