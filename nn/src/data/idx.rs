//! The IDX format of MNIST: a big-endian header (magic 2051 for images: count, rows, cols; magic 2049 for
//! labels: count) and then the bytes. Files may be gzipped (detected by the gzip magic bytes).

use std::io::Read;

use engine::Result;

use super::data_err;

fn gunzip_if_needed(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| data_err(format!("{what}: gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

fn be_u32(b: &[u8], at: usize, what: &str) -> Result<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| data_err(format!("{what}: truncated header")))
}

/// (pixels, rows, cols) of an IDX image file.
pub fn parse_idx_images(bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize, usize)> {
    let b = gunzip_if_needed(bytes, what)?;
    let magic = be_u32(&b, 0, what)?;
    if magic != 2051 {
        return Err(data_err(format!("{what}: magic {magic}, expected 2051 for IDX images")));
    }
    let (n, rows, cols) = (be_u32(&b, 4, what)?, be_u32(&b, 8, what)?, be_u32(&b, 12, what)?);
    let size = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| data_err(format!("{what}: size overflows")))?;
    if b.len() != 16 + size {
        return Err(data_err(format!(
            "{what}: {} bytes, expected {} for {n} images of {rows}x{cols}",
            b.len(),
            16 + size
        )));
    }
    Ok((b[16..].to_vec(), rows, cols))
}

/// The labels of an IDX label file.
pub fn parse_idx_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let b = gunzip_if_needed(bytes, what)?;
    let magic = be_u32(&b, 0, what)?;
    if magic != 2049 {
        return Err(data_err(format!("{what}: magic {magic}, expected 2049 for IDX labels")));
    }
    let n = be_u32(&b, 4, what)?;
    if b.len() != 8 + n {
        return Err(data_err(format!("{what}: {} bytes, expected {} for {n} labels", b.len(), 8 + n)));
    }
    Ok(b[8..].to_vec())
}
