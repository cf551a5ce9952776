//! Datasets and batching: IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary loaders, the embedded MNIST-10k
//! subset, seeded shuffling, padding, random-shift augmentation, normalisation, and a loader thread that
//! prepares the next batches while the current one trains.

mod idx;
mod loader;

use std::path::Path;

use engine::{Error, Result};
use sha2::{Digest, Sha256};

pub use idx::{parse_idx_images, parse_idx_labels};
pub use loader::{Augment, Batch, Loader, LoaderConfig};

/// Images as bytes (N, C, H, W) and labels.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl Dataset {
    fn new(images: Vec<u8>, labels: Vec<u8>, channels: usize, height: usize, width: usize, what: &str) -> Result<Self> {
        let n = labels.len();
        if images.len() != n * channels * height * width {
            return Err(data_err(format!(
                "{what}: {} image bytes for {n} labels of {channels}x{height}x{width}",
                images.len()
            )));
        }
        let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        Ok(Dataset { images, labels, n, channels, height, width, classes })
    }

    /// The pixels of image `i` (C, H, W).
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.channels * self.height * self.width;
        &self.images[i * size..(i + 1) * size]
    }

    /// MNIST-style IDX files in `dir`: `train-images-idx3-ubyte[.gz]` / `train-labels-idx1-ubyte[.gz]` and the
    /// test files under either `test-*` (MNIST-10k) or `t10k-*` (full MNIST, Fashion-MNIST) names.
    pub fn mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
        let find = |stems: &[&str]| -> Result<std::path::PathBuf> {
            for stem in stems {
                for ext in ["", ".gz"] {
                    let p = dir.join(format!("{stem}{ext}"));
                    if p.exists() {
                        return Ok(p);
                    }
                }
            }
            Err(data_err(format!("{}: none of {stems:?} (raw or .gz) found", dir.display())))
        };
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Io { path: p.display().to_string(), source: e });
        let load = |img: &[&str], lab: &[&str]| -> Result<Dataset> {
            let (ip, lp) = (find(img)?, find(lab)?);
            let (images, h, w) = parse_idx_images(&read(&ip)?, &ip.display().to_string())?;
            let labels = parse_idx_labels(&read(&lp)?, &lp.display().to_string())?;
            Dataset::new(images, labels, 1, h, w, &ip.display().to_string())
        };
        let train = load(&["train-images-idx3-ubyte"], &["train-labels-idx1-ubyte"])?;
        let test = load(
            &["test-images-idx3-ubyte", "t10k-images-idx3-ubyte"],
            &["test-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"],
        )?;
        Ok((train, test))
    }

    /// The embedded MNIST-10k subset (8,000 train / 2,000 test; `data/mnist-10k`), checked against its
    /// sha256 digests.
    pub fn mnist10k() -> Result<(Dataset, Dataset)> {
        let file = |name: &str, bytes: &[u8], digest: &str| -> Result<Vec<u8>> {
            check_sha256(name, bytes, digest)?;
            Ok(bytes.to_vec())
        };
        let ti = file("train-images-idx3-ubyte.gz", MNIST10K[0], MNIST10K_SHA256[0])?;
        let tl = file("train-labels-idx1-ubyte.gz", MNIST10K[1], MNIST10K_SHA256[1])?;
        let si = file("test-images-idx3-ubyte.gz", MNIST10K[2], MNIST10K_SHA256[2])?;
        let sl = file("test-labels-idx1-ubyte.gz", MNIST10K[3], MNIST10K_SHA256[3])?;
        let (images, h, w) = parse_idx_images(&ti, "mnist-10k train images")?;
        let train = Dataset::new(images, parse_idx_labels(&tl, "mnist-10k train labels")?, 1, h, w, "mnist-10k train")?;
        let (images, h, w) = parse_idx_images(&si, "mnist-10k test images")?;
        let test = Dataset::new(images, parse_idx_labels(&sl, "mnist-10k test labels")?, 1, h, w, "mnist-10k test")?;
        Ok((train, test))
    }

    /// CIFAR-10 binary batches in `dir`: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, each
    /// record one label byte and 3072 bytes of CHW pixels.
    pub fn cifar10(dir: &Path) -> Result<(Dataset, Dataset)> {
        let read = |name: String| -> Result<(Vec<u8>, Vec<u8>)> {
            let p = dir.join(&name);
            let bytes = std::fs::read(&p).map_err(|e| Error::Io { path: p.display().to_string(), source: e })?;
            if bytes.is_empty() || bytes.len() % 3073 != 0 {
                return Err(data_err(format!(
                    "{}: {} bytes is not a whole number of 3073-byte records",
                    p.display(),
                    bytes.len()
                )));
            }
            let (mut images, mut labels) = (Vec::with_capacity(bytes.len()), Vec::new());
            for rec in bytes.chunks_exact(3073) {
                if rec[0] > 9 {
                    return Err(data_err(format!("{}: label {} out of range", p.display(), rec[0])));
                }
                labels.push(rec[0]);
                images.extend_from_slice(&rec[1..]);
            }
            Ok((images, labels))
        };
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for i in 1..=5 {
            let (im, la) = read(format!("data_batch_{i}.bin"))?;
            images.extend(im);
            labels.extend(la);
        }
        let train = Dataset::new(images, labels, 3, 32, 32, "cifar-10 train")?;
        let (im, la) = read("test_batch.bin".into())?;
        Ok((train, Dataset::new(im, la, 3, 32, 32, "cifar-10 test")?))
    }
}

const MNIST10K: [&[u8]; 4] = [
    include_bytes!("../../../data/mnist-10k/train-images-idx3-ubyte.gz"),
    include_bytes!("../../../data/mnist-10k/train-labels-idx1-ubyte.gz"),
    include_bytes!("../../../data/mnist-10k/test-images-idx3-ubyte.gz"),
    include_bytes!("../../../data/mnist-10k/test-labels-idx1-ubyte.gz"),
];

/// From data/mnist-10k/README.md.
const MNIST10K_SHA256: [&str; 4] = [
    "64c5b81c3e106f13061bbaa16624a3c4d5250e0d8c68ebf0ad3625970804fe5e",
    "fc8f76c84a4c81503ca6696ae11778632d2d93cc770751cbee947ee80898da9d",
    "41c0953fe6bd5ed96e73f12e6c8d044aef44ec35bd5fb40649b2ffe08e669a5a",
    "a86c1be573ffff28b4bae6e75c1061e93393382f574cfcf92cfecc58550e3091",
];

/// Errs unless `bytes` hash to `expected` (hex sha256).
pub fn check_sha256(name: &str, bytes: &[u8], expected: &str) -> Result<()> {
    let got: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    if got != expected {
        return Err(data_err(format!(
            "{name}: sha256 {got}, expected {expected} (the file is damaged or not the right one)"
        )));
    }
    Ok(())
}

pub(crate) fn data_err(msg: String) -> Error {
    Error::Msg { context: "data", msg }
}
