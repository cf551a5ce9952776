//! A seedable generator for initialisation, shuffling, dropout and tests.
//!
//! It is xoshiro256++ (Blackman and Vigna), seeded through splitmix64, behind `rand`'s `RngCore`, so any
//! `rand` distribution can draw from it. Its whole state is four `u64`s, which checkpoints save and restore.

use rand::RngCore;

use crate::{DType, Device, Result, Tensor};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generator {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Generator { s: [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)] }
    }

    /// The whole state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    pub fn from_state(s: [u64; 4]) -> Self {
        Generator { s }
    }

    /// A uniform draw in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal draw (Box-Muller; the second value of the pair is dropped to keep the state simple).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// An index in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }

    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }

    /// Normal(mean, std) restricted to [a, b] by redrawing, as `torch.nn.init.trunc_normal_` samples it.
    pub fn trunc_normal_vec(&mut self, n: usize, mean: f64, std: f64, a: f64, b: f64) -> Vec<f64> {
        (0..n)
            .map(|_| loop {
                let v = mean + std * self.normal();
                if (a..=b).contains(&v) {
                    break v;
                }
            })
            .collect()
    }
}

impl RngCore for Generator {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl Tensor {
    /// Uniform in [lo, hi).
    pub fn rand(shape: &[usize], lo: f64, hi: f64, dtype: DType, device: Device, g: &mut Generator) -> Result<Tensor> {
        let v = g.uniform_vec(shape.iter().product(), lo, hi);
        Tensor::from_f64(&v, shape, dtype, device)
    }

    /// Normal(mean, std).
    pub fn randn(
        shape: &[usize],
        mean: f64,
        std: f64,
        dtype: DType,
        device: Device,
        g: &mut Generator,
    ) -> Result<Tensor> {
        let v = g.normal_vec(shape.iter().product(), mean, std);
        Tensor::from_f64(&v, shape, dtype, device)
    }

    /// Normal(mean, std) truncated to [a, b].
    #[allow(clippy::too_many_arguments)]
    pub fn trunc_normal(
        shape: &[usize],
        mean: f64,
        std: f64,
        a: f64,
        b: f64,
        dtype: DType,
        device: Device,
        g: &mut Generator,
    ) -> Result<Tensor> {
        if a.partial_cmp(&b) != Some(std::cmp::Ordering::Less) || std.is_nan() || std <= 0.0 {
            return Err(crate::Error::invalid(
                "trunc_normal",
                format!("need a < b and std > 0, got a={a} b={b} std={std}"),
                shape,
            ));
        }
        let v = g.trunc_normal_vec(shape.iter().product(), mean, std, a, b);
        Tensor::from_f64(&v, shape, dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_state_restores() {
        let (mut a, mut b) = (Generator::new(7), Generator::new(7));
        assert_eq!(a.normal_vec(5, 0.0, 1.0), b.normal_vec(5, 0.0, 1.0));
        let saved = a.state();
        let x = a.uniform();
        assert_eq!(Generator::from_state(saved).uniform(), x);
        assert_ne!(Generator::new(8).uniform(), Generator::new(7).uniform());
    }

    #[test]
    fn normal_moments_are_close() {
        let v = Generator::new(1).normal_vec(200_000, 2.0, 3.0);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 2.0).abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 3.0).abs() < 0.03, "std {}", var.sqrt());
        let t = Generator::new(2).trunc_normal_vec(10_000, 0.0, 1.0, -0.5, 0.5);
        assert!(t.iter().all(|x| (-0.5..=0.5).contains(x)));
    }
}
