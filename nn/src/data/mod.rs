//! Datasets and batching: IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary loaders, the embedded MNIST-10k
//! subset checked against its sha256 digests, seeded shuffling, zero padding, random shifts, normalisation,
//! and a loader thread that prepares the next batches while the current one trains.
//!
//! Everything here is host-side bytes and `f32`s; the trainer turns a [`Batch`] into a tensor on its device.

mod cifar;
mod idx;
mod loader;

use std::ops::Range;
use std::path::Path;

use engine::{Error, Result};
use sha2::{Digest, Sha256};

pub use idx::{parse_idx_images, parse_idx_labels, read_idx};
pub use loader::{Augment, Batch, Loader, LoaderConfig, Prefetch};

/// The per-channel mean and std of the MNIST training pixels scaled to [0, 1] (the usual
/// `transforms.Normalize((0.1307,), (0.3081,))`).
pub const MNIST_MEAN: f32 = 0.1307;
pub const MNIST_STD: f32 = 0.3081;

/// Images as bytes and their labels. Image `i` is `images[i * C*H*W..(i + 1) * C*H*W]`, laid out (C, H, W)
/// (CIFAR-10's own order; MNIST has C = 1), so the whole buffer is (N, C, H, W).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Labels lie in `0..classes`.
    pub classes: usize,
}

impl Dataset {
    /// Checks that the buffers agree with the sizes; `n` is `labels.len()`.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
    ) -> Result<Self> {
        let d = Dataset { n: labels.len(), images, labels, channels, height, width, classes };
        d.validate()?;
        Ok(d)
    }

    /// Errs unless the fields are consistent. They are public (a subset is a struct update away), so the
    /// loader checks again before it indexes with them.
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = [self.channels, self.height, self.width];
        if c == 0 || h == 0 || w == 0 {
            return Err(data_err(format!("images of {c}x{h}x{w}: every dimension must be at least 1")));
        }
        if self.labels.len() != self.n {
            return Err(data_err(format!("{} labels for n = {}", self.labels.len(), self.n)));
        }
        let expected = self.image_size().checked_mul(self.n);
        if expected != Some(self.images.len()) {
            return Err(data_err(format!("{} image bytes for {} images of {c}x{h}x{w}", self.images.len(), self.n)));
        }
        if let Some((i, &l)) = self.labels.iter().enumerate().find(|&(_, &l)| l as usize >= self.classes) {
            return Err(data_err(format!("label {l} of sample {i} is not below classes = {}", self.classes)));
        }
        Ok(())
    }

    /// Bytes per image, C * H * W.
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i` (C, H, W), `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let size = self.image_size();
        self.images.get(i.checked_mul(size)?..i.checked_add(1)?.checked_mul(size)?)
    }

    /// Samples `range` as a dataset of their own (a quick run on part of the data, a validation split).
    pub fn subset(&self, range: Range<usize>) -> Result<Dataset> {
        if range.start > range.end || range.end > self.n {
            return Err(data_err(format!("subset {range:?} of a dataset of {} samples", self.n)));
        }
        let size = self.image_size();
        Dataset::new(
            self.images[range.start * size..range.end * size].to_vec(),
            self.labels[range].to_vec(),
            self.channels,
            self.height,
            self.width,
            self.classes,
        )
    }

    /// MNIST or Fashion-MNIST IDX files in `dir`, raw or gzipped: `train-images-idx3-ubyte[.gz]`,
    /// `train-labels-idx1-ubyte[.gz]`, and the test pair under its MNIST-10k name (`test-*`) or its full
    /// MNIST / Fashion-MNIST name (`t10k-*`). Returns (train, test).
    pub fn mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
        let train = idx::load_pair(dir, &["train-images-idx3-ubyte"], &["train-labels-idx1-ubyte"])?;
        let test = idx::load_pair(
            dir,
            &["test-images-idx3-ubyte", "t10k-images-idx3-ubyte"],
            &["test-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"],
        )?;
        Ok((train, test))
    }

    /// The MNIST-10k subset compiled into the binary (8,000 train / 2,000 test; `data/mnist-10k`), checked
    /// against its sha256 digests, so a default run needs no files and no download.
    pub fn mnist10k() -> Result<(Dataset, Dataset)> {
        let [ti, tl, si, sl] = MNIST10K.map(|(name, bytes, digest)| {
            let what = format!("embedded data/mnist-10k/{name}");
            check_sha256(&what, bytes, digest).map(|()| (bytes.to_vec(), what))
        });
        Ok((idx::from_bytes(ti?, tl?)?, idx::from_bytes(si?, sl?)?))
    }

    /// The MNIST-10k files read from `dir` (a copy of `data/mnist-10k`), each checked against the digest the
    /// embedded copy has, so a damaged or substituted file is an error naming it.
    pub fn mnist10k_from(dir: &Path) -> Result<(Dataset, Dataset)> {
        let [ti, tl, si, sl] = MNIST10K.map(|(name, _, digest)| {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
            let what = path.display().to_string();
            check_sha256(&what, &bytes, digest).map(|()| (bytes, what))
        });
        Ok((idx::from_bytes(ti?, tl?)?, idx::from_bytes(si?, sl?)?))
    }

    /// CIFAR-10 binary batches in `dir` (the `cifar-10-batches-bin` folder): `data_batch_1.bin` ..
    /// `data_batch_5.bin` for training and `test_batch.bin`. Returns (train, test), images 3x32x32.
    pub fn cifar10(dir: &Path) -> Result<(Dataset, Dataset)> {
        cifar::load(dir)
    }
}

/// The embedded MNIST-10k files: (name, bytes, sha256 from data/mnist-10k/README.md), in the order train
/// images, train labels, test images, test labels.
const MNIST10K: [(&str, &[u8], &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../../../data/mnist-10k/train-images-idx3-ubyte.gz"),
        "64c5b81c3e106f13061bbaa16624a3c4d5250e0d8c68ebf0ad3625970804fe5e",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../../../data/mnist-10k/train-labels-idx1-ubyte.gz"),
        "fc8f76c84a4c81503ca6696ae11778632d2d93cc770751cbee947ee80898da9d",
    ),
    (
        "test-images-idx3-ubyte.gz",
        include_bytes!("../../../data/mnist-10k/test-images-idx3-ubyte.gz"),
        "41c0953fe6bd5ed96e73f12e6c8d044aef44ec35bd5fb40649b2ffe08e669a5a",
    ),
    (
        "test-labels-idx1-ubyte.gz",
        include_bytes!("../../../data/mnist-10k/test-labels-idx1-ubyte.gz"),
        "a86c1be573ffff28b4bae6e75c1061e93393382f574cfcf92cfecc58550e3091",
    ),
];

/// The sha256 of `bytes` as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Errs unless `bytes` hash to `expected` (hex sha256); the error names `name` and both digests.
pub fn check_sha256(name: &str, bytes: &[u8], expected: &str) -> Result<()> {
    let actual = sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(data_err(format!(
            "{name}: sha256 mismatch, expected {expected}, actual {actual} (the file is damaged or not the right one)"
        )));
    }
    Ok(())
}

pub(crate) fn data_err(msg: String) -> Error {
    Error::Msg { context: "data", msg }
}
