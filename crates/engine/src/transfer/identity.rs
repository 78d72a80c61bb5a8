//! The model identity in the hand-off fingerprint: a digest that two workers share
//! exactly when they load the same weights, cheap to compute for any model size.
//!
//! SHA-256 over, for each weights file (a `.gguf`, or a folder's `config.json` and
//! `*.safetensors` in name order): its name, its length, its first MiB (a GGUF header
//! with the whole metadata and tokenizer, or a safetensors header) and its last MiB
//! (weight data). Two files differing only in the middle would collide; a different
//! quantization, architecture, tokenizer, fine-tune or truncated copy does not.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const SAMPLE: u64 = 1 << 20;

/// The identity of the model at `path` (a file or a Hugging Face folder), hex.
pub fn model_identity(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    for file in weight_files(path)? {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        hash_samples(&file, &mut hasher)?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn weight_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "config.json" || name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    Ok(files)
}

fn hash_samples(file: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut f = File::open(file)?;
    let len = f.metadata()?.len();
    hasher.update(len.to_le_bytes());
    let mut buf = Vec::with_capacity(SAMPLE as usize);
    (&mut f).take(SAMPLE).read_to_end(&mut buf)?;
    hasher.update(&buf);
    if len > SAMPLE {
        f.seek(SeekFrom::Start(len.saturating_sub(SAMPLE).max(SAMPLE)))?;
        buf.clear();
        f.take(SAMPLE).read_to_end(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_follows_contents_not_location() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let big: Vec<u8> = (0..3 * SAMPLE as usize).map(|i| (i % 251) as u8).collect();
        let a = write("a.gguf", &big);
        let same_dir = tempfile::tempdir().unwrap();
        let a_elsewhere = same_dir.path().join("a.gguf");
        std::fs::write(&a_elsewhere, &big).unwrap();
        assert_eq!(
            model_identity(&a).unwrap(),
            model_identity(&a_elsewhere).unwrap()
        );

        let mut tail_changed = big.clone();
        *tail_changed.last_mut().unwrap() ^= 1;
        let b = write("b.gguf", &tail_changed);
        let b_as_a = same_dir.path().join("b").join("a.gguf");
        std::fs::create_dir_all(b_as_a.parent().unwrap()).unwrap();
        std::fs::rename(&b, &b_as_a).unwrap();
        assert_ne!(
            model_identity(&a).unwrap(),
            model_identity(&b_as_a).unwrap()
        );
        let truncated = write("t.gguf", &big[..big.len() - 1]);
        assert_ne!(
            model_identity(&a).unwrap(),
            model_identity(&truncated).unwrap()
        );
    }
}
