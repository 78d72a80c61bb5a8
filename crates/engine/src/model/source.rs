//! Tensor sources: a GGUF file or a set of safetensors shards, read through one small
//! interface so that weight assembly (`weights.rs`) is written once for both formats.
//!
//! Every read checks the tensor's presence, shape and byte length against the file and
//! reports problems with the file and tensor name.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, gguf_file};
use memmap2::Mmap;

use crate::error::ModelError;

/// Raw bytes of one tensor in a GGML layout (`dtype` blocks, row-major `[rows, cols]`).
pub struct RawTensor {
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The values of an unquantized tensor's bytes (F32, F16 or BF16, little-endian) as
/// f32; `None` for other types.
pub(crate) fn float_values(dtype: GgmlDType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Where weights come from.
pub trait TensorSource {
    /// The file a tensor's errors should name.
    fn path_of(&self, name: &str) -> PathBuf;
    fn contains(&self, name: &str) -> bool;
    /// The tensor's bytes and shape; a dtype the engine cannot compute with is an error.
    fn read(&self, name: &str) -> Result<RawTensor, ModelError>;
}

/// A memory-mapped GGUF file.
pub struct GgufSource {
    path: PathBuf,
    mmap: Mmap,
    pub content: gguf_file::Content,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::MissingFile {
                path: path.into(),
                what: "GGUF model",
            },
            _ => ModelError::io(path, e),
        })?;
        // Buffered: the metadata is thousands of small reads.
        let content = gguf_file::Content::read(&mut std::io::BufReader::new(&file))
            .map_err(|e| ModelError::corrupt(path, "GGUF", e))?;
        // SAFETY: the map is read-only and lives as long as `self`; a file truncated
        // under us by another process is outside what any mmap-based loader can defend.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(Self {
            path: path.into(),
            mmap,
            content,
        })
    }
}

impl TensorSource for GgufSource {
    fn path_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn read(&self, name: &str) -> Result<RawTensor, ModelError> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    tensor: name.into(),
                })?;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let block = info.ggml_dtype.block_size();
        let row_len = dims.last().copied().unwrap_or(1);
        if row_len % block != 0 {
            return Err(ModelError::corrupt(
                &self.path,
                "GGUF",
                format!(
                    "tensor `{name}`: row length {row_len} is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                ),
            ));
        }
        let len = elems / block * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let bytes = self.mmap.get(start..start + len).ok_or_else(|| {
            ModelError::corrupt(
                &self.path,
                "GGUF",
                format!(
                    "tensor `{name}` needs bytes {start}..{} but the file has {} (truncated?)",
                    start + len,
                    self.mmap.len()
                ),
            )
        })?;
        Ok(RawTensor {
            dtype: info.ggml_dtype,
            shape: dims,
            bytes: bytes.to_vec(),
        })
    }
}

/// One or more safetensors shards of a Hugging Face checkpoint.
pub struct SafetensorsSource {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name → where it lives, from each shard's header parsed once at open.
    index: HashMap<String, TensorEntry>,
}

struct TensorEntry {
    shard: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range of the data inside the shard's map.
    bytes: std::ops::Range<usize>,
}

impl SafetensorsSource {
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: read-only map owned by `self`; see `GgufSource::open`.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let tensors = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::corrupt(path, "safetensors", e))?;
            for (name, view) in tensors.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = TensorEntry {
                    shard: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            shards.push((path.clone(), mmap));
        }
        Ok(Self { shards, index })
    }
}

impl TensorSource for SafetensorsSource {
    fn path_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(entry) => self.shards[entry.shard].0.clone(),
            None => self.shards.first().map(|s| s.0.clone()).unwrap_or_default(),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn read(&self, name: &str) -> Result<RawTensor, ModelError> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path_of(name),
                tensor: name.into(),
            })?;
        let (path, mmap) = &self.shards[entry.shard];
        // In bounds: the safetensors parser checked every range against the file.
        let data = &mmap[entry.bytes.clone()];
        let shape = entry.shape.clone();
        let (dtype, bytes) = match entry.dtype {
            safetensors::Dtype::F32 => (GgmlDType::F32, data.to_vec()),
            safetensors::Dtype::F16 => (GgmlDType::F16, data.to_vec()),
            // AVX2 has no bf16 arithmetic; widening to f32 is exact.
            safetensors::Dtype::BF16 => (GgmlDType::F32, bf16_bytes_to_f32_bytes(data)),
            other => {
                return Err(ModelError::UnsupportedDType {
                    path: path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(RawTensor {
            dtype,
            shape,
            bytes,
        })
    }
}

fn bf16_bytes_to_f32_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 2);
    for pair in data.chunks_exact(2) {
        // A bf16 is the top half of an f32.
        out.extend_from_slice(&[0, 0, pair[0], pair[1]]);
    }
    out
}
