//! What a weight takes on a GPU, known before anything is uploaded: the loader's device-memory
//! accounting needs it from a file's tensor table, and the GPU kernels upload exactly this.

use ember_quant::GgmlType;

use crate::{QuantMatrix, Storage};

/// The ggml types the GPU matmul kernels read in place, as their blocks; every other type is
/// dequantized to f32 once at upload.
pub const GPU_IN_PLACE_TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Bytes a `rows x cols` matrix of ggml type `ty` takes on a GPU: its blocks padded to whole
/// 32-bit words where the kernels read them in place, else 4 bytes a value. `None` when the
/// size overflows `u64` or `cols` is not whole blocks of `ty`.
pub fn gpu_matrix_bytes(ty: GgmlType, rows: u64, cols: u64) -> Option<u64> {
    if GPU_IN_PLACE_TYPES.contains(&ty) {
        let bytes = ty.bytes_for(cols)?.checked_mul(rows)?;
        bytes.checked_next_multiple_of(4)
    } else {
        rows.checked_mul(cols)?.checked_mul(4)
    }
}

impl QuantMatrix {
    /// Bytes this matrix takes on a GPU (`QuantMatrix::upload` with a GPU build): its
    /// blocks where the kernels read them in place ([`GPU_IN_PLACE_TYPES`]), else 4 per value.
    pub fn device_size(&self) -> usize {
        match self.storage() {
            Storage::Ggml { ty, bytes } if GPU_IN_PLACE_TYPES.contains(&ty) => {
                bytes.len().next_multiple_of(4)
            }
            _ => self.rows() * self.cols() * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_blocks_or_four_bytes_a_value() {
        // Q4_1: 20 bytes per 32 values; 3 rows of 64 values = 120 bytes, already whole words.
        assert_eq!(gpu_matrix_bytes(GgmlType::Q4_1, 3, 64), Some(120));
        // Q4_0: 18 bytes per block; one row of one block = 18, padded to 20.
        assert_eq!(gpu_matrix_bytes(GgmlType::Q4_0, 1, 32), Some(20));
        // F16 is dequantized at upload.
        assert_eq!(gpu_matrix_bytes(GgmlType::F16, 5, 7), Some(140));
        assert_eq!(gpu_matrix_bytes(GgmlType::Q4_K, 1, 100), None);
        assert_eq!(gpu_matrix_bytes(GgmlType::F16, u64::MAX, 2), None);
    }
}
