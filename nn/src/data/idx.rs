//! The IDX format of MNIST and Fashion-MNIST: a big-endian header, then the bytes. Images: magic 2051
//! (0x00000803: unsigned bytes, 3 dimensions), count, rows, cols, then count*rows*cols pixels. Labels: magic
//! 2049 (0x00000801), count, then count bytes. Files may be gzipped, told by the gzip magic bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

use engine::{Error, Result};

use super::{data_err, Dataset};

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// MNIST and Fashion-MNIST both have ten classes.
const CLASSES: usize = 10;

/// Reads one IDX file of `dims` header dimensions. The reader is the raw bytes or a gzip decoder over them,
/// and the body is read against the size the header declares, so a gzip file that inflates to far more than
/// its header says is stopped there instead of filling memory.
fn parse(bytes: &[u8], what: &str, magic: u32, dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let gzipped = bytes.starts_with(&GZIP_MAGIC);
    if !gzipped && what.ends_with(".gz") {
        return Err(data_err(format!("{what}: named .gz but does not start with the gzip magic bytes 1f 8b")));
    }
    // A raw IDX file starts with two zero bytes, so it can never be mistaken for gzip.
    let mut reader: Box<dyn Read + '_> =
        if gzipped { Box::new(flate2::read::GzDecoder::new(bytes)) } else { Box::new(bytes) };
    let io_err = |e: std::io::Error| {
        if gzipped {
            data_err(format!("{what}: gzip stream: {e}"))
        } else {
            data_err(format!("{what}: {e}"))
        }
    };
    let header_len = 4 * (1 + dims);
    // The magic number is read and checked on its own first, so that the wrong kind of file (labels given
    // for images) is reported as such rather than as a short header.
    let mut read_u32s = |count: usize| -> Result<Vec<usize>> {
        let mut b = vec![0u8; 4 * count];
        reader.read_exact(&mut b).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                data_err(format!("{what}: truncated header, an IDX file of this kind starts with {header_len} bytes"))
            }
            _ => io_err(e),
        })?;
        Ok(b.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect())
    };
    let found = read_u32s(1)?[0];
    if found != magic as usize {
        let kind = if magic == IMAGES_MAGIC { "images" } else { "labels" };
        return Err(data_err(format!("{what}: magic number {found}, expected {magic} for IDX {kind}")));
    }
    let shape = read_u32s(dims)?;
    let body = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| data_err(format!("{what}: header sizes {shape:?} overflow")))?;
    let mut data = Vec::new();
    // One byte more than declared, to notice a file that is too long (saturating: three u32 sizes can
    // multiply to exactly u64::MAX).
    reader.take((body as u64).saturating_add(1)).read_to_end(&mut data).map_err(io_err)?;
    if data.len() != body {
        let got = if data.len() > body { format!("more than {body}") } else { data.len().to_string() };
        return Err(data_err(format!(
            "{what}: {got} data bytes after the header, expected {body} for shape {shape:?}"
        )));
    }
    Ok((shape, data))
}

/// Parses an IDX image file (raw or gzipped) into (pixels (N, rows, cols), rows, cols). `what` names the
/// file in errors; a name ending in `.gz` must hold gzip data.
pub fn parse_idx_images(bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize, usize)> {
    let (shape, pixels) = parse(bytes, what, IMAGES_MAGIC, 3)?;
    Ok((pixels, shape[1], shape[2]))
}

/// Parses an IDX label file (raw or gzipped). `what` names the file in errors.
pub fn parse_idx_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    Ok(parse(bytes, what, LABELS_MAGIC, 1)?.1)
}

/// Reads an IDX file from disk as it is (possibly gzipped); the path is in the error.
pub fn read_idx(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })
}

/// A dataset from (bytes, name) of an image file and of a label file.
pub(super) fn from_bytes(images: (Vec<u8>, String), labels: (Vec<u8>, String)) -> Result<Dataset> {
    let (pixels, rows, cols) = parse_idx_images(&images.0, &images.1)?;
    let ids = parse_idx_labels(&labels.0, &labels.1)?;
    if rows == 0 || cols == 0 {
        return Err(data_err(format!("{}: images of {rows}x{cols}", images.1)));
    }
    let n = pixels.len() / (rows * cols);
    if n != ids.len() {
        return Err(data_err(format!("{} holds {n} images but {} holds {} labels", images.1, labels.1, ids.len())));
    }
    if let Some((i, &l)) = ids.iter().enumerate().find(|&(_, &l)| l as usize >= CLASSES) {
        return Err(data_err(format!("{}: label {l} of item {i} is not a class 0..{CLASSES}", labels.1)));
    }
    Dataset::new(pixels, ids, 1, rows, cols, CLASSES)
}

/// The first of `stems`, raw or `.gz`, that exists in `dir`.
fn find(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    for stem in stems {
        // Raw first: it is already inflated.
        for name in [stem.to_string(), format!("{stem}.gz")] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let tried: Vec<String> = stems.iter().map(|s| format!("{s}[.gz]")).collect();
    Err(data_err(format!("{}: no IDX file named {}", dir.display(), tried.join(" or "))))
}

/// The image and label files named by the first matching stems in `dir`.
pub(super) fn load_pair(dir: &Path, image_stems: &[&str], label_stems: &[&str]) -> Result<Dataset> {
    let (ip, lp) = (find(dir, image_stems)?, find(dir, label_stems)?);
    from_bytes((read_idx(&ip)?, ip.display().to_string()), (read_idx(&lp)?, lp.display().to_string()))
}
