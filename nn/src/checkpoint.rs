//! safetensors checkpoints: tensors by name, integer counters, and string metadata (step, RNG state, config).
//!
//! Files are written atomically: to `<path>.tmp` in the same directory, flushed, then renamed over `path`, so
//! a crash mid-write leaves the previous checkpoint intact. Tensors are stored in their own dtype (f32/f64);
//! loading also accepts f16 and bf16 (converted to f32) and int64 one-element counters, which is what a
//! PyTorch `state_dict` saved with `safetensors.torch.save_file` holds.

use std::collections::HashMap;
use std::path::Path;

use engine::{CpuStorage, Device, Error, Result, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use crate::module::Module;

/// Everything read from a checkpoint file (tensors on the CPU).
#[derive(Default)]
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub counters: HashMap<String, u64>,
    pub metadata: HashMap<String, String>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Msg { context: "checkpoint", msg: format!("{}: {msg}", path.display()) }
}

/// Writes `tensors` (any device; copied to the host), `counters` and `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    counters: &[(String, u64)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    // Host bytes of every entry, little-endian as safetensors requires.
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len() + counters.len());
    for (name, t) in tensors {
        let host = t.storage().to_cpu(t.layout())?;
        let (dtype, bytes) = match &host {
            CpuStorage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            CpuStorage::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        blobs.push((name.clone(), dtype, t.shape().to_vec(), bytes));
    }
    for (name, c) in counters {
        blobs.push((name.clone(), Dtype::I64, vec![], (*c as i64).to_le_bytes().to_vec()));
    }
    let views = blobs
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(|e| format_err(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| format_err(path, e))?;
    let tmp = path.with_extension("safetensors.tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads a checkpoint (or any safetensors file of f32/f64/f16/bf16 tensors and int64 counters).
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format_err(path, e))?;
    let mut out = Checkpoint { metadata: meta.metadata().clone().unwrap_or_default(), ..Default::default() };
    for (name, view) in st.tensors() {
        let data = view.data();
        let shape = view.shape().to_vec();
        let tensor = match view.dtype() {
            Dtype::F32 => Tensor::from_vec(chunks(data, f32::from_le_bytes), &shape)?,
            Dtype::F64 => Tensor::from_vec(chunks(data, f64::from_le_bytes), &shape)?,
            Dtype::F16 => Tensor::from_vec(chunks(data, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32()), &shape)?,
            Dtype::BF16 => Tensor::from_vec(chunks(data, |b: [u8; 2]| half::bf16::from_le_bytes(b).to_f32()), &shape)?,
            Dtype::I64 if shape.iter().product::<usize>() == 1 => {
                let v = i64::from_le_bytes(data[..8].try_into().map_err(|_| format_err(path, "short int64"))?);
                out.counters.insert(name, v.max(0) as u64);
                continue;
            }
            other => return Err(format_err(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
        };
        out.tensors.insert(name, tensor);
    }
    Ok(out)
}

/// Little-endian elements of `N` bytes each.
fn chunks<T, const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect()
}

impl Checkpoint {
    /// Loads this checkpoint's tensors (under `prefix.` when `prefix` is not empty) into `module` in place.
    pub fn load_into(&self, module: &dyn Module, prefix: &str, strict: bool) -> Result<()> {
        if prefix.is_empty() {
            return module.load_tensors(&self.tensors, &self.counters, strict);
        }
        let lead = format!("{prefix}.");
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&lead).map(|k| (k.to_string(), v.clone())))
            .collect();
        let counters: HashMap<String, u64> =
            self.counters.iter().filter_map(|(k, &v)| k.strip_prefix(&lead).map(|k| (k.to_string(), v))).collect();
        module.load_tensors(&tensors, &counters, strict)
    }

    /// A tensor by name, moved to `device`.
    pub fn tensor(&self, name: &str, device: Device) -> Result<Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Msg { context: "checkpoint", msg: format!("no tensor '{name}'") })?
            .to_device(device)
    }
}
