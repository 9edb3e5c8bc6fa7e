//! The ggml tensor type table: ids as stored in GGUF files, block sizes and bytes per block.

use std::fmt;

/// A ggml tensor element type, with the numeric id GGUF files store.
///
/// Variant names are ggml's (`Q4_K`, `IQ2_XXS`, ...). Every type has its sizes here; the ones
/// marked "sizes only" have no (de)quantizer in this crate (see [`crate::supports_dequantize`]).
/// Multi-byte fields are little-endian and scales are IEEE f16 unless a variant says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// IEEE single precision, 4 bytes per element.
    F32,
    /// IEEE half precision, 2 bytes per element.
    F16,
    /// Blocks of 32 in 18 bytes: an f16 scale `d` and 4-bit quants `q`; value `d * (q - 8)`.
    Q4_0,
    /// Blocks of 32 in 20 bytes: f16 scale `d` and minimum `m`, 4-bit quants; value `d * q + m`.
    Q4_1,
    /// Blocks of 32 in 22 bytes: an f16 scale `d` and 5-bit quants; value `d * (q - 16)`.
    Q5_0,
    /// Blocks of 32 in 24 bytes: f16 scale `d` and minimum `m`, 5-bit quants; value `d * q + m`.
    Q5_1,
    /// Blocks of 32 in 34 bytes: an f16 scale `d` and `i8` quants; value `d * q`.
    Q8_0,
    /// Blocks of 32 in 36 bytes: as Q8_0 plus an f16 `d * sum(q)`, which dot products with
    /// Q4_1/Q5_1 use.
    Q8_1,
    /// K-quant, 256 elements in 84 bytes (2.625 bits per weight): 16 groups of 16 with 4-bit
    /// scales and minimums, 2-bit quants.
    Q2_K,
    /// K-quant, 256 elements in 110 bytes (3.4375 bits per weight): 16 groups of 16 with 6-bit
    /// scales, 3-bit quants.
    Q3_K,
    /// K-quant, 256 elements in 144 bytes (4.5 bits per weight): 8 groups of 32 with 6-bit scales
    /// and minimums, 4-bit quants.
    Q4_K,
    /// K-quant, 256 elements in 176 bytes (5.5 bits per weight): as Q4_K with 5-bit quants.
    Q5_K,
    /// K-quant, 256 elements in 210 bytes (6.5625 bits per weight): 16 groups of 16 with `i8`
    /// scales, 6-bit quants.
    Q6_K,
    /// K-quant, 256 elements in 292 bytes: an f32 scale, `i8` quants and the `i16` sums of each
    /// 16; the format K-quant dot products quantize activations to.
    Q8_K,
    /// Importance-matrix 2-bit codebook quant, 256 elements in 66 bytes. Sizes only.
    IQ2_XXS,
    /// Importance-matrix 2-bit codebook quant, 256 elements in 74 bytes. Sizes only.
    IQ2_XS,
    /// Importance-matrix 3-bit codebook quant, 256 elements in 98 bytes. Sizes only.
    IQ3_XXS,
    /// Importance-matrix 1-bit codebook quant, 256 elements in 50 bytes. Sizes only.
    IQ1_S,
    /// Non-linear 4-bit quant, blocks of 32 in 18 bytes. Sizes only.
    IQ4_NL,
    /// Importance-matrix 3-bit codebook quant, 256 elements in 110 bytes. Sizes only.
    IQ3_S,
    /// Importance-matrix 2-bit codebook quant, 256 elements in 82 bytes. Sizes only.
    IQ2_S,
    /// Non-linear 4-bit quant with 6-bit group scales, 256 elements in 136 bytes. Sizes only.
    IQ4_XS,
    /// Signed 8-bit integer. Sizes only.
    I8,
    /// Signed 16-bit integer, little-endian. Sizes only.
    I16,
    /// Signed 32-bit integer, little-endian. Sizes only.
    I32,
    /// Signed 64-bit integer, little-endian. Sizes only.
    I64,
    /// IEEE double precision, 8 bytes per element. Sizes only.
    F64,
    /// Importance-matrix 1-bit codebook quant, 256 elements in 56 bytes. Sizes only.
    IQ1_M,
    /// bfloat16 (the top half of an f32), 2 bytes per element.
    BF16,
    /// Ternary quant (values -1, 0, 1 times a scale), 256 elements in 54 bytes. Sizes only.
    TQ1_0,
    /// Ternary quant in 2-bit fields, 256 elements in 66 bytes. Sizes only.
    TQ2_0,
    /// OCP microscaling FP4: blocks of 32 4-bit E2M1 values sharing one E8M0 scale, 17 bytes.
    /// Sizes only.
    MXFP4,
}

/// Every type, in id order.
pub const ALL_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ3_XXS,
    GgmlType::IQ1_S,
    GgmlType::IQ4_NL,
    GgmlType::IQ3_S,
    GgmlType::IQ2_S,
    GgmlType::IQ4_XS,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::F64,
    GgmlType::IQ1_M,
    GgmlType::BF16,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::MXFP4,
];

impl GgmlType {
    /// The id stored in GGUF tensor infos (ggml's `enum ggml_type`).
    pub const fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// The type for a GGUF id, or `None` for an id ggml does not define (or has retired).
    pub fn from_id(id: u32) -> Option<Self> {
        ALL_TYPES.iter().copied().find(|t| t.id() == id)
    }

    /// Elements per block (1 for plain element types).
    pub const fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 => 2,
            BF16 => 2,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 => 8,
            F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ4_NL => 18,
            IQ3_S => 110,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
            TQ2_0 => 66,
            MXFP4 => 17,
        }
    }

    /// ggml's name for the type (`q4_K`, `f16`, ...), as llama.cpp prints it.
    pub const fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2_K => "q2_K",
            Q3_K => "q3_K",
            Q4_K => "q4_K",
            Q5_K => "q5_K",
            Q6_K => "q6_K",
            Q8_K => "q8_K",
            IQ2_XXS => "iq2_xxs",
            IQ2_XS => "iq2_xs",
            IQ3_XXS => "iq3_xxs",
            IQ1_S => "iq1_s",
            IQ4_NL => "iq4_nl",
            IQ3_S => "iq3_s",
            IQ2_S => "iq2_s",
            IQ4_XS => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            IQ1_M => "iq1_m",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            MXFP4 => "mxfp4",
        }
    }

    /// Bytes for `n_elements` elements, or `None` if `n_elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
