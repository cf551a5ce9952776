//! Batching: seeded shuffling per epoch, zero padding, random shifts, normalisation, and a prefetching
//! thread.
//!
//! Every random choice is a pure function of the seed and the position in the run: epoch `e` is shuffled by a
//! generator derived from (seed, e), and batch `b` of it is augmented by one derived from (seed, e, b). So the
//! background loader, the in-thread iteration and a run resumed at (e, b) all produce the same batches, and no
//! generator state has to be checkpointed.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use engine::{Generator, Result};

use super::{data_err, Dataset, MNIST_MEAN, MNIST_STD};

/// Geometric augmentation and padding. The default does nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Augment {
    /// Zeros added on every side of every image (2 turns MNIST's 28x28 into 32x32).
    pub pad: usize,
    /// Random crop: each image (already padded by `pad`) is padded by this many more zeros and a window of
    /// the padded-by-`pad` size is cut at a random place, i.e. it is translated by (dy, dx) drawn uniformly
    /// from [-random_shift, random_shift]^2. 0 for evaluation.
    pub random_shift: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle the samples anew every epoch (training); otherwise they come in dataset order (evaluation).
    pub shuffle: bool,
    /// Drop the last, smaller batch when `batch_size` does not divide the dataset.
    pub drop_last: bool,
    pub seed: u64,
    /// Per channel, applied to pixels scaled to [0, 1]: (x / 255 - mean) / std.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub augment: Augment,
}

impl LoaderConfig {
    /// Shuffled MNIST batches normalised with the MNIST mean and std, no augmentation, last batch kept.
    pub fn mnist(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
            mean: vec![MNIST_MEAN],
            std: vec![MNIST_STD],
            augment: Augment::default(),
        }
    }
}

/// One batch, NCHW `f32` on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// (B, C, H', W'), H' and W' including the padding.
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// [B, C, H', W']
    pub shape: [usize; 4],
    /// Its index within the epoch.
    pub index: usize,
}

/// Batches of a dataset; cheap to clone (the dataset is shared).
#[derive(Debug, Clone)]
pub struct Loader {
    data: Arc<Dataset>,
    cfg: LoaderConfig,
    /// [C, H', W'] of the images a batch holds.
    out: [usize; 3],
    /// Per channel, the normalised value of each byte: (v / 255 - mean) / std computed once, so a batch is
    /// table look-ups and copies.
    lut: Vec<[f32; 256]>,
}

/// The splitmix64 finaliser: a bijective mix of all 64 bits.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shuffle of an epoch draws from this stream; batch `b`'s augmentation from stream `b`.
const SHUFFLE_STREAM: u64 = u64::MAX;

/// A generator for (seed, epoch, stream). Mixing after each input (rather than XOR-ing them together) keeps
/// distinct triples from landing on the same seed.
fn derive(seed: u64, epoch: usize, stream: u64) -> Generator {
    Generator::new(splitmix64(splitmix64(splitmix64(seed) ^ epoch as u64) ^ stream))
}

/// [C, H', W'] of padded images, `None` if a batch of them, or the larger image a random crop is cut
/// from, would not be addressable.
fn out_shape(data: &Dataset, cfg: &LoaderConfig) -> Option<[usize; 3]> {
    let Augment { pad, random_shift } = cfg.augment;
    let (h, w) = (data.height.checked_add(pad.checked_mul(2)?)?, data.width.checked_add(pad.checked_mul(2)?)?);
    data.channels.checked_mul(h)?.checked_mul(w)?.checked_mul(cfg.batch_size)?;
    h.max(w).checked_add(random_shift.checked_mul(2)?)?;
    Some([data.channels, h, w])
}

impl Loader {
    /// Checks the dataset and the configuration (batch size at least 1, one mean and one positive finite std
    /// per channel) up front, so making batches later cannot fail.
    pub fn new(data: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        data.validate()?;
        if data.n == 0 {
            return Err(data_err("the loader needs at least one sample, the dataset is empty".into()));
        }
        if cfg.batch_size == 0 {
            return Err(data_err("batch size must be at least 1".into()));
        }
        let good_std = cfg.std.iter().all(|s| s.is_finite() && *s > 0.0);
        if cfg.mean.len() != data.channels
            || cfg.std.len() != data.channels
            || !good_std
            || !cfg.mean.iter().all(|m| m.is_finite())
        {
            return Err(data_err(format!(
                "normalisation needs one finite mean and one positive finite std per channel ({} channels), got \
                 mean {:?}, std {:?}",
                data.channels, cfg.mean, cfg.std
            )));
        }
        let out = out_shape(&data, &cfg).ok_or_else(|| {
            data_err(format!(
                "padding {} and random shift {} of {}x{} images in batches of {} overflow the index range",
                cfg.augment.pad, cfg.augment.random_shift, data.height, data.width, cfg.batch_size
            ))
        })?;
        let lut = cfg
            .mean
            .iter()
            .zip(&cfg.std)
            .map(|(&mean, &std)| std::array::from_fn(|v| (v as f32 / 255.0 - mean) / std))
            .collect();
        Ok(Loader { data, cfg, out, lut })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// [C, H', W'] of the images a batch holds, padding included.
    pub fn image_shape(&self) -> [usize; 3] {
        self.out
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.data.n, self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order of the samples in `epoch`: a permutation of 0..n drawn from (seed, epoch) when shuffling,
    /// 0..n otherwise.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.n).collect();
        if self.cfg.shuffle {
            derive(self.cfg.seed, epoch, SHUFFLE_STREAM).shuffle(&mut order);
        }
        order
    }

    /// Batch `index` of `epoch`, the same as the iterators give. Errs past the last batch.
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Batch> {
        if index >= self.num_batches() {
            return Err(data_err(format!("batch {index} of an epoch of {} batches", self.num_batches())));
        }
        Ok(self.build(epoch, index, &self.order(epoch)))
    }

    /// The batches of `epoch` from batch `start` on (none when `start` is past the end), prepared on this
    /// thread. `start` > 0 resumes a run in the middle of an epoch.
    pub fn iter(&self, epoch: usize, start: usize) -> impl Iterator<Item = Batch> + '_ {
        let end = self.num_batches();
        let order = self.order(epoch);
        (start.min(end)..end).map(move |i| self.build(epoch, i, &order))
    }

    /// The same batches as [`Loader::iter`], prepared by a background thread that stays up to `prefetch`
    /// batches ahead (at least 1), so the next batch is ready when a training step ends. Dropping the
    /// iterator stops the thread.
    pub fn spawn(&self, epoch: usize, start: usize, prefetch: usize) -> Prefetch {
        let end = self.num_batches();
        let start = start.min(end);
        let (tx, rx) = sync_channel(prefetch.max(1));
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("mila-loader".into()).spawn(move || {
            let order = me.order(epoch);
            for i in start..end {
                // An error means the receiver is gone: nobody wants more batches.
                if tx.send(me.build(epoch, i, &order)).is_err() {
                    return;
                }
            }
        });
        let source = match spawned {
            Ok(handle) => Source::Thread { rx: Some(rx), handle: Some(handle) },
            // The OS would not start a thread: same batches, made on the caller's thread instead.
            Err(_) => Source::Inline { loader: self.clone(), order: self.order(epoch), next: start, end },
        };
        Prefetch { source, epoch, remaining: end - start }
    }

    /// Batch `index` of `epoch` given that epoch's order. The caller guarantees `index < num_batches()` and
    /// that `order` is a permutation of 0..n; `new` checked everything else.
    fn build(&self, epoch: usize, index: usize, order: &[usize]) -> Batch {
        let b = self.cfg.batch_size;
        let ids = &order[index * b..((index + 1) * b).min(order.len())];
        let [c, h, w] = self.out;
        let (sh, sw) = (self.data.height, self.data.width);
        let shift = self.cfg.augment.random_shift;
        // The crop window is cut from the image padded by `pad + shift` on every side; an offset of `shift`
        // is the centre, i.e. no translation.
        let p = self.cfg.augment.pad + shift;
        let mut rng = derive(self.cfg.seed, epoch, index as u64);
        let mut images = Vec::with_capacity(ids.len() * c * h * w);
        for &i in ids {
            let (oy, ox) = if shift > 0 { (rng.below(2 * shift + 1), rng.below(2 * shift + 1)) } else { (0, 0) };
            let src = &self.data.images[i * c * sh * sw..(i + 1) * c * sh * sw];
            // Output column x reads source column x + ox - p; these are the x where that lies in 0..sw.
            let x0 = p.saturating_sub(ox).min(w);
            let x1 = (p + sw).saturating_sub(ox).clamp(x0, w);
            for (ch, lut) in self.lut.iter().enumerate() {
                // Padding is zero pixels before normalisation, as torchvision's Pad / RandomCrop(padding) then
                // Normalize give.
                let zero = lut[0];
                for y in 0..h {
                    match (y + oy).checked_sub(p).filter(|&sy| sy < sh) {
                        None => images.extend(std::iter::repeat_n(zero, w)),
                        Some(sy) => {
                            let row = &src[(ch * sh + sy) * sw..(ch * sh + sy + 1) * sw];
                            images.extend(std::iter::repeat_n(zero, x0));
                            if x1 > x0 {
                                // x0 >= p - ox here, so the source range starts at or after column 0.
                                let s = x0 + ox - p;
                                images.extend(row[s..s + (x1 - x0)].iter().map(|&v| lut[v as usize]));
                            }
                            images.extend(std::iter::repeat_n(zero, w - x1));
                        }
                    }
                }
            }
        }
        let labels = ids.iter().map(|&i| self.data.labels[i] as usize).collect();
        Batch { images, labels, shape: [ids.len(), c, h, w], index }
    }
}

/// The iterator of [`Loader::spawn`]: batches from the loader thread, in order.
pub struct Prefetch {
    source: Source,
    epoch: usize,
    remaining: usize,
}

enum Source {
    Thread { rx: Option<Receiver<Batch>>, handle: Option<JoinHandle<()>> },
    Inline { loader: Loader, order: Vec<usize>, next: usize, end: usize },
}

impl Prefetch {
    /// The epoch these batches belong to.
    pub fn epoch(&self) -> usize {
        self.epoch
    }
}

impl Iterator for Prefetch {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let batch = match &mut self.source {
            Source::Thread { rx, handle } => match rx.as_ref()?.recv() {
                Ok(b) => Some(b),
                Err(_) => {
                    // The thread has ended. Re-raise a panic of its own so that a bug there is not mistaken
                    // for the end of the epoch.
                    if let Some(Err(panic)) = handle.take().map(JoinHandle::join) {
                        std::panic::resume_unwind(panic);
                    }
                    None
                }
            },
            Source::Inline { loader, order, next, end } => (*next < *end).then(|| {
                *next += 1;
                loader.build(self.epoch, *next - 1, order)
            }),
        };
        self.remaining -= batch.is_some() as usize;
        batch
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Prefetch {}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Source::Thread { rx, handle } = &mut self.source {
            // Dropping the receiver first makes a send the thread is blocked in fail, so it returns and the
            // join below cannot wait forever; it waits at most for the batch being made.
            rx.take();
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
