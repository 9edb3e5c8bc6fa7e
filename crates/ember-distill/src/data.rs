//! Training data: token chunks with the teacher's top-k distribution at every position,
//! computed once with Ember's inference model and cached on disk.

use std::io::Write;
use std::path::Path;

use ember_models::Model;

use crate::{DistillError, TopK};

const MAGIC: &[u8; 8] = b"EMBDTK02";
const HEADER: usize = 8 + 8 + 8 + 4 + 4 + 8;

/// Chunks of `seq_len` tokens, each with the teacher's top `k` logits at every position.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherCache {
    /// Identifies the teacher the logits came from ([`teacher_id`]).
    pub teacher: u64,
    /// Identifies how the tokens were made (the caller's hash of its data sources and
    /// settings; 0 when unknown), so a cache can be reused without remaking its tokens.
    pub recipe: u64,
    /// Tokens per chunk.
    pub seq_len: usize,
    /// Entries per position.
    pub k: usize,
    /// Every chunk's tokens, `seq_len` each.
    pub tokens: Vec<Vec<u32>>,
    /// Every chunk's teacher top-k (`seq_len` positions each).
    pub top: Vec<TopK>,
}

/// An identifier of a teacher file: FNV-1a over its size, its first and last MiB, and 64 KiB
/// out of every 8 MiB between (so two files that differ in their middle layers differ here,
/// at a cost of about 1% of the file read).
pub fn teacher_id(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.eat(&(bytes.len() as u64).to_le_bytes());
    let mib = 1 << 20;
    h.eat(&bytes[..bytes.len().min(mib)]);
    let mut at = mib;
    while at < bytes.len().saturating_sub(mib) {
        h.eat(&bytes[at..(at + 64 * 1024).min(bytes.len())]);
        at += 8 * mib;
    }
    h.eat(&bytes[bytes.len().saturating_sub(mib)..]);
    h.finish()
}

/// Whether `path` holds a teacher cache (by its magic), so it may be replaced.
pub fn is_teacher_cache(path: &Path) -> bool {
    let mut magic = [0u8; 6];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"EMBDTK")
}

/// FNV-1a, 64-bit: a stable hash for identifying files and data (not for security).
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv {
    /// The empty hash.
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Feeds `bytes`.
    pub fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> DistillError {
    DistillError::Data(format!("{}: {why}", path.display()))
}

impl TeacherCache {
    /// Cuts `tokens` into chunks of `seq_len` (a shorter tail is dropped) and runs `teacher`
    /// over each, keeping the top `k` logits of every position. `progress(done, total)` is
    /// called after each chunk; returning `false` stops with [`DistillError::Interrupted`].
    pub fn build(
        teacher: &Model,
        teacher_id: u64,
        tokens: &[u32],
        seq_len: usize,
        k: usize,
        mut progress: impl FnMut(usize, usize) -> bool,
    ) -> Result<Self, DistillError> {
        if seq_len == 0 || k == 0 {
            return Err(DistillError::Data(
                "seq_len and k must be at least 1".into(),
            ));
        }
        let n_vocab = teacher.config().n_vocab;
        if k > n_vocab {
            return Err(DistillError::Data(format!(
                "top-k {k} is more than the vocabulary ({n_vocab})"
            )));
        }
        let ctx = teacher.config().context_length;
        if seq_len > ctx {
            return Err(DistillError::Data(format!(
                "sequence length {seq_len} is beyond the teacher's context ({ctx})"
            )));
        }
        let chunks: Vec<&[u32]> = tokens.chunks_exact(seq_len).collect();
        if chunks.is_empty() {
            return Err(DistillError::Data(format!(
                "{} tokens make no chunk of {seq_len}",
                tokens.len()
            )));
        }
        let mut out = Self {
            teacher: teacher_id,
            recipe: 0,
            seq_len,
            k,
            tokens: Vec::with_capacity(chunks.len()),
            top: Vec::with_capacity(chunks.len()),
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let rows = ember_runtime::eval::teacher_forced_logits(teacher, chunk, 512)?;
            if rows.len() != seq_len || rows.iter().any(|r| r.len() < k) {
                return Err(DistillError::Data(format!(
                    "the teacher gave {} rows for {seq_len} tokens (or rows shorter than {k})",
                    rows.len()
                )));
            }
            out.tokens.push(chunk.to_vec());
            out.top.push(TopK::from_rows(&rows, k));
            if !progress(i + 1, chunks.len()) {
                return Err(DistillError::Interrupted);
            }
        }
        Ok(out)
    }

    /// The first `n` chunks (all of them when there are fewer).
    pub fn head(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            tokens: self.tokens[..n].to_vec(),
            top: self.top[..n].to_vec(),
            ..*self
        }
    }

    /// An FNV-1a hash of every chunk's tokens (what a resumed run checks its data by).
    pub fn tokens_hash(&self) -> u64 {
        let mut h = Fnv::new();
        for t in self.tokens.iter().flatten() {
            h.eat(&t.to_le_bytes());
        }
        h.finish()
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Writes the cache to `path` (through a temporary file renamed onto it).
    pub fn save(&self, path: &Path) -> Result<(), DistillError> {
        let mut buf = Vec::with_capacity(HEADER + self.len() * self.seq_len * (4 + 8 * self.k));
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&self.teacher.to_le_bytes());
        buf.extend_from_slice(&self.recipe.to_le_bytes());
        buf.extend_from_slice(&(self.seq_len as u32).to_le_bytes());
        buf.extend_from_slice(&(self.k as u32).to_le_bytes());
        buf.extend_from_slice(&(self.len() as u64).to_le_bytes());
        for (tokens, top) in self.tokens.iter().zip(&self.top) {
            tokens
                .iter()
                .for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
            top.ids
                .iter()
                .for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
            top.logits
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DistillError::Write {
                path: path.display().to_string(),
                why: e.to_string(),
            }
        })
    }

    /// Reads a cache written by [`save`](Self::save). Every size is checked against the
    /// file's length before anything is allocated by it.
    pub fn load(path: &Path) -> Result<Self, DistillError> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad(path, "not a teacher cache (bad magic or too short)"));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let teacher = u64_at(8);
        let recipe = u64_at(16);
        let seq_len = u32_at(24) as usize;
        let k = u32_at(28) as usize;
        let n = u64_at(32);
        let per_chunk = seq_len
            .checked_mul(k)
            .and_then(|sk| sk.checked_mul(8))
            .and_then(|b| b.checked_add(seq_len * 4));
        let expected = per_chunk
            .and_then(|c| usize::try_from(n).ok().and_then(|n| c.checked_mul(n)))
            .and_then(|b| b.checked_add(HEADER));
        if seq_len == 0 || k == 0 || expected != Some(bytes.len()) {
            return Err(bad(
                path,
                format!(
                    "header says {n} chunks of {seq_len} tokens with top-{k}, which is not the \
                     file's {} bytes",
                    bytes.len()
                ),
            ));
        }
        let n = n as usize;
        let mut out = Self {
            teacher,
            recipe,
            seq_len,
            k,
            tokens: Vec::with_capacity(n),
            top: Vec::with_capacity(n),
        };
        let mut o = HEADER;
        let u32s = |count: usize, o: &mut usize| -> Vec<u32> {
            let v = (0..count).map(|i| u32_at(*o + 4 * i)).collect();
            *o += 4 * count;
            v
        };
        for _ in 0..n {
            let tokens = u32s(seq_len, &mut o);
            let ids = u32s(seq_len * k, &mut o);
            let logits: Vec<f32> = u32s(seq_len * k, &mut o)
                .into_iter()
                .map(f32::from_bits)
                .collect();
            out.tokens.push(tokens);
            out.top.push(TopK { k, ids, logits });
        }
        Ok(out)
    }
}
