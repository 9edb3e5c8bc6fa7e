//! The student as a GGUF file.

use std::path::Path;

use ember_formats::{GgufFile, GgufWriter, MetaValue};
use ember_quant::GgmlType;

use crate::{DistillError, Student};

/// The type of the exported matrices (norms stay f32, as converters write them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    /// 32-bit floats (exact).
    F32,
    /// 16-bit floats.
    F16,
    /// ggml Q8_0.
    Q8_0,
    /// ggml Q4_0.
    Q4_0,
    /// ggml Q4_1.
    Q4_1,
    /// ggml Q4_K.
    Q4K,
}

impl ExportType {
    /// Every type, in `--type`'s spelling.
    pub const NAMES: &[&str] = &["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k"];

    /// The type named as `--type` spells it (`f16`, `q8_0`, `q4_k`, ...; case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q4_k" => Self::Q4K,
            _ => return None,
        })
    }

    /// `--type`'s spelling of it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q4K => "q4_k",
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::Q8_0 => GgmlType::Q8_0,
            ExportType::Q4_0 => GgmlType::Q4_0,
            ExportType::Q4_1 => GgmlType::Q4_1,
            ExportType::Q4K => GgmlType::Q4_K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) for a file of mostly this type.
    fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q4_1 => 3,
            ExportType::Q8_0 => 7,
            ExportType::Q4K => 15,
        }
    }
}

/// Writes `student` to `path` as a GGUF both Ember and llama.cpp load: every metadata key of
/// `teacher` (architecture, tokenizer, chat template) except the layer count and feed-forward
/// width, which become the student's, and `general.file_type`; then the student's tensors under the teacher's
/// names, matrices as `ty` (a row whose width is not a multiple of the type's block stays
/// f32), vectors as f32. The file is written next to `path` and renamed onto it, so a failed
/// export never leaves a partial file under that name.
pub fn export_gguf(
    student: &Student,
    teacher: &GgufFile,
    path: &Path,
    ty: ExportType,
) -> Result<(), DistillError> {
    let write_err = |why: String| DistillError::Write {
        path: path.display().to_string(),
        why,
    };
    let arch = teacher.architecture().unwrap_or("llama").to_string();
    let block_count = format!("{arch}.block_count");
    let ffn_length = format!("{arch}.feed_forward_length");
    let mut w = GgufWriter::new();
    for (key, value) in teacher.metadata() {
        match key.as_str() {
            "general.file_type" | "general.alignment" => {}
            k if k == block_count => {
                w.add(k, MetaValue::U32(student.config().n_layer as u32));
            }
            k if k == ffn_length => {
                w.add(k, MetaValue::U32(student.config().n_ff as u32));
            }
            k => {
                w.add(k, value.clone());
            }
        }
    }
    w.add("general.file_type", MetaValue::U32(ty.file_type()));
    for (name, dims, values) in student.tensors() {
        let target = if dims.len() == 2 && (dims[0] as usize).is_multiple_of(ty.ggml().block_size())
        {
            ty.ggml()
        } else {
            GgmlType::F32
        };
        let data = ember_quant::quantize(target, &values)
            .map_err(|e| write_err(format!("{name}: {e}")))?;
        w.add_tensor(name.clone(), &dims, target, data)
            .map_err(|e| write_err(format!("{name}: {e}")))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    w.write_file(&tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e.to_string())
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e.to_string())
    })
}
