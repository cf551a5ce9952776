//! Parameter initialisation, as `torch.nn.init` and PyTorch's layer defaults do it.

use engine::{DType, Device, Generator, Result, Tensor};

/// Where new parameters are made, and the generator they draw from.
pub struct Init<'a> {
    pub dtype: DType,
    pub device: Device,
    pub rng: &'a mut Generator,
}

impl Init<'_> {
    fn leaf(&self, t: Tensor) -> Result<Tensor> {
        t.requires_grad_(true)
    }

    /// U(-bound, bound).
    pub fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Tensor> {
        let t = Tensor::rand(shape, -bound, bound, self.dtype, self.device, self.rng)?;
        self.leaf(t)
    }

    /// PyTorch's default for Linear and Conv weights, `kaiming_uniform_(a = sqrt(5))`, which is
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)); their biases use the same bound.
    pub fn kaiming_uniform(&mut self, shape: &[usize], fan_in: usize) -> Result<Tensor> {
        self.uniform(shape, 1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// `trunc_normal_(std)` with timm's cut-offs at -2 and 2 (absolute, not in units of std).
    pub fn trunc_normal(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let t = Tensor::trunc_normal(shape, 0.0, std, -2.0, 2.0, self.dtype, self.device, self.rng)?;
        self.leaf(t)
    }

    pub fn constant(&mut self, shape: &[usize], value: f64) -> Result<Tensor> {
        self.leaf(Tensor::full(shape, value, self.dtype, self.device)?)
    }

    /// A buffer (not trained).
    pub fn buffer(&mut self, shape: &[usize], value: f64) -> Result<Tensor> {
        Tensor::full(shape, value, self.dtype, self.device)
    }
}
