//! The CIFAR-10 binary version: each file is a run of 3073-byte records, one label byte (0..10) then a
//! 32x32 colour image as 1024 red, 1024 green and 1024 blue bytes, rows top to bottom, i.e. (C, H, W).

use std::path::Path;

use engine::{Error, Result};

use super::{data_err, Dataset};

const CHANNELS: usize = 3;
const SIDE: usize = 32;
const IMAGE: usize = CHANNELS * SIDE * SIDE;
const RECORD: usize = 1 + IMAGE;
const CLASSES: usize = 10;

/// Appends the records of `path` to `images` and `labels`.
fn read_batch(path: &Path, images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(data_err(format!(
            "{}: {} bytes is not a whole, non-zero number of {RECORD}-byte CIFAR-10 records (1 label + {IMAGE} pixels)",
            path.display(),
            bytes.len()
        )));
    }
    images.reserve(bytes.len() / RECORD * IMAGE);
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        if record[0] as usize >= CLASSES {
            return Err(data_err(format!(
                "{}: record {i} has label {}, CIFAR-10 labels are 0..{CLASSES}",
                path.display(),
                record[0]
            )));
        }
        labels.push(record[0]);
        images.extend_from_slice(&record[1..]);
    }
    Ok(())
}

pub(super) fn load(dir: &Path) -> Result<(Dataset, Dataset)> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in 1..=5 {
        read_batch(&dir.join(format!("data_batch_{i}.bin")), &mut images, &mut labels)?;
    }
    let train = Dataset::new(images, labels, CHANNELS, SIDE, SIDE, CLASSES)?;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    read_batch(&dir.join("test_batch.bin"), &mut images, &mut labels)?;
    Ok((train, Dataset::new(images, labels, CHANNELS, SIDE, SIDE, CLASSES)?))
}
