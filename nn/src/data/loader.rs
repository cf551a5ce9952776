//! Batching: seeded shuffling per epoch, zero padding, random shifts, normalisation, and a prefetching
//! thread. Every random choice of batch b of epoch e comes from a generator seeded by (seed, e, b), so the
//! threaded loader, the in-thread one and a run resumed at (e, b) produce the same batches.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use engine::{Generator, Result};

use super::{data_err, Dataset};

/// Geometric augmentation and padding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Augment {
    /// Zeros added on every side (2 turns 28x28 MNIST into 32x32).
    pub pad: usize,
    /// Each image is shifted by up to this many pixels in x and y (zeros fill in): a random crop of the
    /// image padded by this much. 0 for evaluation.
    pub random_shift: usize,
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    /// Per channel, applied to pixels scaled to [0, 1]: (x / 255 - mean) / std.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub augment: Augment,
}

/// One batch, NCHW f32 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// (N, C, H, W)
    pub shape: [usize; 4],
    /// Its index within the epoch.
    pub index: usize,
}

pub struct Loader {
    data: Arc<Dataset>,
    cfg: LoaderConfig,
}

/// Mixes (seed, epoch, batch) into one generator seed.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut g = Generator::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    g.uniform().to_bits()
}

impl Loader {
    pub fn new(data: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(data_err("batch size must be at least 1".into()));
        }
        if cfg.mean.len() != data.channels || cfg.std.len() != data.channels || cfg.std.contains(&0.0) {
            return Err(data_err(format!(
                "normalisation needs one mean and one non-zero std per channel ({} channels), got {:?} / {:?}",
                data.channels, cfg.mean, cfg.std
            )));
        }
        Ok(Loader { data, cfg })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    /// (C, H, W) of the images a batch holds, padding included.
    pub fn image_shape(&self) -> [usize; 3] {
        let p = 2 * self.cfg.augment.pad;
        [self.data.channels, self.data.height + p, self.data.width + p]
    }

    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.data.n, self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order of the samples in `epoch` (a permutation when shuffling).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.n).collect();
        if self.cfg.shuffle {
            Generator::new(mix(self.cfg.seed, epoch as u64, u64::MAX)).shuffle(&mut order);
        }
        order
    }

    /// Batch `index` of `epoch`, given that epoch's order.
    pub fn batch(&self, epoch: usize, index: usize, order: &[usize]) -> Batch {
        let b = self.cfg.batch_size;
        let ids = &order[index * b..((index + 1) * b).min(order.len())];
        let [c, h, w] = self.image_shape();
        let (pad, shift) = (self.cfg.augment.pad as isize, self.cfg.augment.random_shift as isize);
        let (sh, sw) = (self.data.height as isize, self.data.width as isize);
        let mut rng = Generator::new(mix(self.cfg.seed, epoch as u64, index as u64));
        let mut images = vec![0f32; ids.len() * c * h * w];
        for (k, &i) in ids.iter().enumerate() {
            let (dy, dx) = if shift > 0 {
                (rng.below(2 * shift as usize + 1) as isize - shift, rng.below(2 * shift as usize + 1) as isize - shift)
            } else {
                (0, 0)
            };
            let src = self.data.image(i);
            for ch in 0..c {
                let (mean, std) = (self.cfg.mean[ch], self.cfg.std[ch]);
                // Padding pixels are zeros before normalisation, as transforms.Pad then Normalize does.
                let zero = (0.0 - mean) / std;
                let plane = &mut images[((k * c + ch) * h) * w..((k * c + ch + 1) * h) * w];
                for y in 0..h as isize {
                    for x in 0..w as isize {
                        // Output (y, x) reads the padded image at (y + dy, x + dx).
                        let (sy, sx) = (y + dy - pad, x + dx - pad);
                        plane[(y * w as isize + x) as usize] = if (0..sh).contains(&sy) && (0..sw).contains(&sx) {
                            let v = src[((ch as isize * sh + sy) * sw + sx) as usize] as f32 / 255.0;
                            (v - mean) / std
                        } else {
                            zero
                        };
                    }
                }
            }
        }
        let labels = ids.iter().map(|&i| self.data.labels[i] as usize).collect();
        Batch { images, labels, shape: [ids.len(), c, h, w], index }
    }

    /// The batches of `epoch` from `start` on, prepared on this thread.
    pub fn iter(&self, epoch: usize, start: usize) -> impl Iterator<Item = Batch> + '_ {
        let order = self.order(epoch);
        (start..self.num_batches()).map(move |i| self.batch(epoch, i, &order))
    }

    /// The batches of `epoch` from `start` on, prepared by a background thread `prefetch` batches ahead. The
    /// thread ends when the iterator is dropped.
    pub fn spawn(self: &Arc<Self>, epoch: usize, start: usize, prefetch: usize) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(prefetch.max(1));
        let me = self.clone();
        std::thread::spawn(move || {
            let order = me.order(epoch);
            for i in start..me.num_batches() {
                if tx.send(me.batch(epoch, i, &order)).is_err() {
                    return; // the receiver is gone
                }
            }
        });
        rx
    }
}
