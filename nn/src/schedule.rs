//! Learning-rate schedules, as functions of the step (0-based).

/// Linear warmup from 0 over `warmup` steps to `base`, then cosine decay to `min_lr` at `total` steps
/// (timm's `CosineLRScheduler` with per-step updates).
#[derive(Debug, Clone, Copy)]
pub struct CosineWarmup {
    pub base: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl CosineWarmup {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.base - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// `base * gamma^(step / step_size)` (PyTorch's `StepLR`).
#[derive(Debug, Clone, Copy)]
pub struct StepLr {
    pub base: f64,
    pub step_size: usize,
    pub gamma: f64,
}

impl StepLr {
    pub fn lr(&self, step: usize) -> f64 {
        self.base * self.gamma.powi((step / self.step_size.max(1)) as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warmup_shape() {
        let s = CosineWarmup { base: 1.0, min_lr: 0.0, warmup: 10, total: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-15);
        assert!((s.lr(9) - 1.0).abs() < 1e-15);
        assert!((s.lr(10) - 1.0).abs() < 1e-15);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-15);
        assert!(s.lr(500).abs() < 1e-15);
        let st = StepLr { base: 1.0, step_size: 3, gamma: 0.5 };
        assert_eq!([st.lr(0), st.lr(2), st.lr(3), st.lr(7)], [1.0, 1.0, 0.5, 0.25]);
    }
}
