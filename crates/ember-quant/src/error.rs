//! The error type of the conversion entry points.

use std::fmt;

use crate::types::GgmlType;

/// Why a quantize/dequantize call was rejected. Inputs are never trusted: every malformed
/// request comes back as one of these instead of a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuantError {
    /// The type has no (de)quantizer here (IQ*, TQ*, MXFP4, integer types, ...).
    Unsupported(GgmlType),
    /// The element count is not a multiple of the type's block size.
    NotWholeBlocks {
        /// The requested type.
        ty: GgmlType,
        /// The element count asked for.
        n_elements: usize,
    },
    /// The byte buffer does not hold exactly the bytes for the requested elements.
    LengthMismatch {
        /// The requested type.
        ty: GgmlType,
        /// The bytes the element count needs (`usize::MAX` when that size overflows).
        expected_bytes: usize,
        /// The bytes given (0 in the overflow case, where there is nothing to compare).
        actual_bytes: usize,
    },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantError::Unsupported(ty) => write!(f, "type {ty} is not supported"),
            QuantError::NotWholeBlocks { ty, n_elements } => write!(
                f,
                "{n_elements} elements is not a whole number of {ty} blocks (block size {})",
                ty.block_size()
            ),
            QuantError::LengthMismatch {
                ty,
                expected_bytes,
                actual_bytes,
            } => write!(
                f,
                "{ty} data has {actual_bytes} bytes, expected {expected_bytes}"
            ),
        }
    }
}

impl std::error::Error for QuantError {}

/// Checks that `n_elements` is whole blocks of `ty` and returns the byte count they need.
pub(crate) fn expected_bytes(ty: GgmlType, n_elements: usize) -> Result<usize, QuantError> {
    let bs = ty.block_size();
    if !n_elements.is_multiple_of(bs) {
        return Err(QuantError::NotWholeBlocks { ty, n_elements });
    }
    // Overflow can only happen for absurd lengths; report it as a mismatch rather than wrap.
    (n_elements / bs)
        .checked_mul(ty.type_size())
        .ok_or(QuantError::LengthMismatch {
            ty,
            expected_bytes: usize::MAX,
            actual_bytes: 0,
        })
}
