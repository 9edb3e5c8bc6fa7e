//! Hugging Face checkpoint directories: `config.json`, the safetensors weights (one file or
//! shards), and the tokenizer and generation files beside them.

use std::collections::{BTreeMap, btree_map::Entry};
use std::path::{Path, PathBuf};

use crate::safetensors::{SafetensorsError, SafetensorsFile, StTensorInfo};

/// The model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer (the `tokenizers` library's format).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer configuration (special tokens, chat template).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The generation defaults.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Why a checkpoint directory could not be opened.
///
/// The enum is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading a file or listing the directory failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The path is not a directory.
    #[error(
        "{dir} is not a directory (a checkpoint is a directory with config.json and safetensors weights)"
    )]
    NotADirectory {
        /// The path given.
        dir: PathBuf,
    },

    /// The directory has no `config.json`.
    #[error("{dir} has no config.json, so it is not a Hugging Face checkpoint directory")]
    MissingConfig {
        /// The directory.
        dir: PathBuf,
    },

    /// A JSON file (config, tokenizer config, generation config, index) does not parse.
    #[error("{path} is not valid JSON: {source}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// serde_json's message, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A JSON file that must hold an object holds something else.
    #[error("{path} must hold a JSON object, found {found}")]
    NotAnObject {
        /// The file.
        path: PathBuf,
        /// What it holds (`"an array"`, ...).
        found: &'static str,
    },

    /// `model.safetensors.index.json` is malformed.
    #[error("bad weight index {path}: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The index names a shard that is not in the directory.
    #[error(
        "weight index {index} names shard {shard:?} (for tensor {tensor:?}), which does not exist"
    )]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard file name as written in the index.
        shard: String,
        /// The first tensor the index places in it.
        tensor: String,
    },

    /// The index places a tensor in a shard that does not hold it.
    #[error("weight index {index} places tensor {tensor:?} in {shard}, which does not hold it")]
    TensorNotInShard {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: PathBuf,
    },

    /// The same tensor is in two shards.
    #[error("tensor {tensor:?} is in two shards: {first} and {second}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// One shard holding it.
        first: PathBuf,
        /// Another shard holding it.
        second: PathBuf,
    },

    /// The directory has no safetensors weights.
    #[error(
        "{dir} has no weights: no model.safetensors.index.json, model.safetensors or other *.safetensors file"
    )]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },

    /// A shard is not a valid safetensors file (the error names the file).
    #[error(transparent)]
    Shard(#[from] SafetensorsError),
}

/// A Hugging Face checkpoint directory: `config.json`, the weights (`model.safetensors`, or
/// the shards named by `model.safetensors.index.json`, or else every `*.safetensors` file in
/// the directory), and the tokenizer files beside them.
///
/// Everything is read and validated at [`Checkpoint::open`]: the JSON files are parsed, every
/// shard is memory-mapped and its header checked, every tensor the index names is found in its
/// shard, and no tensor may be in two shards. Tensor data stays in the mappings (zero-copy).
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    tokenizer_config: Option<serde_json::Value>,
    generation_config: Option<serde_json::Value>,
    index_path: Option<PathBuf>,
    shards: Vec<SafetensorsFile>,
    /// Tensor name -> (shard index, index in that shard's `tensors()`).
    tensors: BTreeMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Open a checkpoint directory.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let meta = std::fs::metadata(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(CheckpointError::NotADirectory {
                dir: dir.to_path_buf(),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(CheckpointError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let config = read_json_object(&config_path)?;
        let tokenizer_config = read_optional_json(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let generation_config = read_optional_json(&dir.join(GENERATION_CONFIG_FILE))?;

        let index_path = dir.join(INDEX_FILE);
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            tokenizer_config,
            generation_config,
            index_path: None,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if index_path.is_file() {
            ck.load_index(&index_path)?;
            ck.index_path = Some(index_path);
        } else {
            let single = dir.join(SINGLE_FILE);
            let files = if single.is_file() {
                vec![single]
            } else {
                list_safetensors(dir)?
            };
            if files.is_empty() {
                return Err(CheckpointError::NoWeights {
                    dir: dir.to_path_buf(),
                });
            }
            for f in files {
                ck.add_shard(SafetensorsFile::open(&f)?)?;
            }
        }
        Ok(ck)
    }

    /// Open the shards the index names and check that each holds the tensors placed in it.
    fn load_index(&mut self, index_path: &Path) -> Result<(), CheckpointError> {
        let index = read_json_object(index_path)?;
        let bad = |reason: String| CheckpointError::BadIndex {
            path: index_path.to_path_buf(),
            reason,
        };
        let Some(map) = index.get("weight_map") else {
            return Err(bad("no \"weight_map\"".to_owned()));
        };
        let Some(map) = map.as_object() else {
            let found = json_kind(map);
            return Err(bad(format!(
                "\"weight_map\" is {found}, expected an object"
            )));
        };
        // Shard file name -> the tensors the index places in it.
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in map {
            let Some(shard) = shard.as_str() else {
                let found = json_kind(shard);
                return Err(bad(format!(
                    "the shard of tensor {tensor:?} is {found}, expected a file name"
                )));
            };
            // Shards are plain file names beside the index; nothing may point outside it.
            let plain = !shard.is_empty()
                && Path::new(shard).file_name() == Some(std::ffi::OsStr::new(shard))
                && !shard.contains(['/', '\\']);
            if !plain {
                return Err(bad(format!(
                    "the shard of tensor {tensor:?} is {shard:?}, not a plain file name in the directory"
                )));
            }
            by_shard.entry(shard).or_default().push(tensor);
        }
        if by_shard.is_empty() {
            return Err(bad("\"weight_map\" is empty".to_owned()));
        }
        for (shard, names) in by_shard {
            let path = self.dir.join(shard);
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard.to_owned(),
                    tensor: names.first().copied().unwrap_or_default().to_owned(),
                });
            }
            let file = SafetensorsFile::open(&path)?;
            if let Some(missing) = names.iter().find(|n| file.tensor(n).is_none()) {
                return Err(CheckpointError::TensorNotInShard {
                    index: index_path.to_path_buf(),
                    tensor: (*missing).to_owned(),
                    shard: path,
                });
            }
            self.add_shard(file)?;
        }
        Ok(())
    }

    /// Add a shard's tensors to the name map; a name already held by another shard is an error.
    fn add_shard(&mut self, file: SafetensorsFile) -> Result<(), CheckpointError> {
        let shard = self.shards.len();
        for (i, t) in file.tensors().iter().enumerate() {
            match self.tensors.entry(t.name.clone()) {
                Entry::Vacant(v) => {
                    v.insert((shard, i));
                }
                Entry::Occupied(o) => {
                    let first = self.shards[o.get().0].path().unwrap_or(Path::new(""));
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: first.to_path_buf(),
                        second: file.path().unwrap_or(Path::new("")).to_path_buf(),
                    });
                }
            }
        }
        self.shards.push(file);
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`, parsed (always a JSON object).
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// The path of `tokenizer.json`, if the directory has one.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let p = self.dir.join(TOKENIZER_FILE);
        p.is_file().then_some(p)
    }

    /// `tokenizer_config.json`, parsed at open, if present.
    pub fn tokenizer_config(&self) -> Option<&serde_json::Value> {
        self.tokenizer_config.as_ref()
    }

    /// `generation_config.json`, parsed at open, if present.
    pub fn generation_config(&self) -> Option<&serde_json::Value> {
        self.generation_config.as_ref()
    }

    /// The path of `model.safetensors.index.json` when the weights are sharded through one.
    pub fn index_path(&self) -> Option<&Path> {
        self.index_path.as_deref()
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors over all shards.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// A tensor's entry and its bytes (zero-copy, in its shard's mapping).
    pub fn tensor(&self, name: &str) -> Option<(&StTensorInfo, &[u8])> {
        let (shard, info) = self.tensor_location(name)?;
        let file = self.shards.get(shard)?;
        Some((info, file.data(info)))
    }

    /// Which shard (an index into [`Checkpoint::shards`]) holds a tensor, and its entry.
    pub fn tensor_location(&self, name: &str) -> Option<(usize, &StTensorInfo)> {
        let &(shard, i) = self.tensors.get(name)?;
        Some((shard, self.shards.get(shard)?.tensors().get(i)?))
    }

    /// The weight files: the index's shards sorted by file name, `model.safetensors`, or
    /// every `*.safetensors` file sorted by name.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// Whether `path` looks like a checkpoint directory: a directory with `config.json` and at
    /// least one `*.safetensors` file. Cheap (no file is parsed).
    pub fn is_checkpoint_dir(path: &Path) -> bool {
        path.is_dir()
            && path.join(CONFIG_FILE).is_file()
            && list_safetensors(path).is_ok_and(|v| !v.is_empty())
    }
}

/// Every regular `*.safetensors` file in `dir` (hidden files excluded), sorted by name.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.ends_with(".safetensors") {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn read_json(path: &Path) -> Result<serde_json::Value, CheckpointError> {
    let text = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| CheckpointError::BadJson {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json_object(path: &Path) -> Result<serde_json::Value, CheckpointError> {
    let v = read_json(path)?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(CheckpointError::NotAnObject {
            path: path.to_path_buf(),
            found: json_kind(&v),
        })
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, CheckpointError> {
    if path.is_file() {
        read_json_object(path).map(Some)
    } else {
        Ok(None)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
