//! An exponential moving average of a model's weights (Polyak averaging; timm's `ModelEma`).
//!
//! After every optimizer step each parameter and float buffer w updates its shadow s:
//!
//! ```text
//! s <- d s + (1 - d) w,      d = min(decay, (1 + n) / (10 + n))
//! ```
//!
//! where n counts the updates so far: the warmed-up d keeps the first shadows from being dominated by the
//! initial weights. Evaluating the shadow instead of the last weights averages out the noise of the last
//! steps (a shadow with decay d remembers about 1 / (1 - d) steps). The shadow is saved with the checkpoint
//! under `ema.` names, so a resumed run continues it exactly.

use std::collections::HashMap;

use engine::{no_grad, Error, Result, Tensor};
use ops::TensorOps;

use crate::module::{assign, Module};

/// The name prefix of shadow tensors in a checkpoint.
pub const PREFIX: &str = "ema.";
/// The checkpoint counter holding the number of updates.
const UPDATES: &str = "ema.updates";

/// Named tensors and named counters, as a checkpoint takes them.
pub type Exported = (Vec<(String, Tensor)>, Vec<(String, u64)>);

pub struct Ema {
    decay: f64,
    updates: u64,
    /// The shadow of every entry of the model's `state_dict`, in its order.
    shadow: Vec<(String, Tensor)>,
}

/// A contiguous copy of `t` in its own storage.
fn deep_copy(t: &Tensor) -> Result<Tensor> {
    no_grad(|| {
        let c = t.zeros_like()?;
        ops::copy_into(&c, &c.layout().clone(), t)?;
        Ok(c)
    })
}

impl Ema {
    /// Starts the shadow at the model's current weights. `decay` must lie in [0, 1).
    pub fn new(model: &dyn Module, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::Msg { context: "ema", msg: format!("decay {decay} is not in [0, 1)") });
        }
        let shadow =
            model.state_dict().into_iter().map(|(n, t)| Ok((n, deep_copy(&t)?))).collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, updates: 0, shadow })
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// `s <- d s + (1 - d) w` for every entry, with the model's entries matched by name.
    pub fn update(&mut self, model: &dyn Module) -> Result<()> {
        let d = self.current_decay();
        let weights = model.state_dict();
        if weights.len() != self.shadow.len() {
            return Err(Error::Msg {
                context: "ema",
                msg: format!("the model has {} entries, the shadow {}", weights.len(), self.shadow.len()),
            });
        }
        no_grad(|| -> Result<()> {
            for ((name, s), (wname, w)) in self.shadow.iter_mut().zip(&weights) {
                if name != wname {
                    return Err(Error::Msg { context: "ema", msg: format!("entry '{wname}' where '{name}' was") });
                }
                *s = s.mul_scalar(d)?.add(&w.mul_scalar(1.0 - d)?)?;
            }
            Ok(())
        })?;
        self.updates += 1;
        Ok(())
    }

    /// Runs `f` with the shadow loaded into `model`, then puts the model's own weights back (also when `f`
    /// fails).
    pub fn with_shadow<M: Module + ?Sized, R>(&self, model: &mut M, f: impl FnOnce(&mut M) -> Result<R>) -> Result<R> {
        let own = model.state_dict().into_iter().map(|(n, t)| Ok((n, deep_copy(&t)?))).collect::<Result<Vec<_>>>()?;
        let load = |model: &M, from: &[(String, Tensor)]| -> Result<()> {
            let mut result = Ok(());
            let map: HashMap<&str, &Tensor> = from.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (name, dst) in model.state_dict() {
                let src = map
                    .get(name.as_str())
                    .ok_or_else(|| Error::Msg { context: "ema", msg: format!("'{name}' has no shadow") })?;
                result = result.and(assign(&name, &dst, src));
            }
            result
        };
        load(model, &self.shadow)?;
        let out = f(model);
        load(model, &own)?;
        out
    }

    /// The shadow under `ema.` names and the update count, for a checkpoint.
    pub fn export(&self) -> Exported {
        let tensors = self.shadow.iter().map(|(n, t)| (format!("{PREFIX}{n}"), t.clone())).collect();
        (tensors, vec![(UPDATES.to_string(), self.updates)])
    }

    /// Restores what [`Ema::export`] wrote (converted to each shadow's dtype and device).
    pub fn import(&mut self, tensors: &HashMap<String, Tensor>, counters: &HashMap<String, u64>) -> Result<()> {
        for (name, s) in &self.shadow {
            let key = format!("{PREFIX}{name}");
            let src = tensors
                .get(&key)
                .ok_or_else(|| Error::Msg { context: "ema", msg: format!("'{key}' is missing from the checkpoint") })?;
            assign(&key, s, src)?;
        }
        self.updates = *counters
            .get(UPDATES)
            .ok_or_else(|| Error::Msg { context: "ema", msg: format!("'{UPDATES}' is missing from the checkpoint") })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use crate::Init;
    use engine::{DType, Device, Generator};

    fn linear(seed: u64) -> Linear {
        let mut rng = Generator::new(seed);
        let mut init = Init { dtype: DType::F64, device: Device::Cpu, rng: &mut rng };
        Linear::new(&mut init, 3, 2, true).unwrap()
    }

    #[test]
    fn shadow_follows_the_documented_formula() {
        let model = linear(1);
        let mut ema = Ema::new(&model, 0.9).unwrap();
        let w0 = model.state_dict()[0].1.to_vec_f64().unwrap();
        let mut expected = w0.clone();
        for step in 0..30u64 {
            // Move the weights to a new value, as a step would.
            let w: Vec<f64> = w0.iter().map(|x| x + 0.1 * (step as f64 + 1.0)).collect();
            assign("weight", &model.state_dict()[0].1, &Tensor::from_vec(w.clone(), &[2, 3]).unwrap()).unwrap();
            let d = 0.9f64.min((1.0 + step as f64) / (10.0 + step as f64));
            assert_eq!(d, ema.current_decay());
            for (e, x) in expected.iter_mut().zip(&w) {
                *e = d * *e + (1.0 - d) * x;
            }
            ema.update(&model).unwrap();
        }
        let got = ema.shadow[0].1.to_vec_f64().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-12, "{g} vs {e}");
        }
        assert_eq!(ema.updates(), 30);
    }

    #[test]
    fn with_shadow_swaps_the_weights_and_back() {
        let mut model = linear(2);
        let ema = Ema::new(&model, 0.5).unwrap();
        let before = model.state_dict()[0].1.to_vec_f64().unwrap();
        let shadow = ema.shadow[0].1.to_vec_f64().unwrap();
        assert_eq!(before, shadow);
        // Change the live weights; inside with_shadow the model holds the old ones again.
        let moved: Vec<f64> = before.iter().map(|x| x + 1.0).collect();
        assign("weight", &model.state_dict()[0].1, &Tensor::from_vec(moved.clone(), &[2, 3]).unwrap()).unwrap();
        let inside = ema.with_shadow(&mut model, |m| m.state_dict()[0].1.to_vec_f64()).unwrap();
        assert_eq!(inside, before);
        assert_eq!(model.state_dict()[0].1.to_vec_f64().unwrap(), moved);
        // And back after a failing closure too.
        let err = ema.with_shadow(&mut model, |_| -> Result<()> { Err(Error::Msg { context: "t", msg: "x".into() }) });
        assert!(err.is_err());
        assert_eq!(model.state_dict()[0].1.to_vec_f64().unwrap(), moved);
    }

    #[test]
    fn export_import_round_trip_and_bad_decay() {
        let model = linear(3);
        let mut a = Ema::new(&model, 0.99).unwrap();
        a.update(&model).unwrap();
        let (t, c) = a.export();
        let mut b = Ema::new(&linear(4), 0.99).unwrap();
        b.import(&t.into_iter().collect(), &c.into_iter().collect()).unwrap();
        assert_eq!(b.updates(), 1);
        assert_eq!(b.shadow[0].1.to_vec_f64().unwrap(), a.shadow[0].1.to_vec_f64().unwrap());
        assert!(b.import(&HashMap::new(), &HashMap::new()).is_err());
        assert!(Ema::new(&model, 1.0).is_err());
        assert!(Ema::new(&model, -0.1).is_err());
    }
}
