//! Storage of one layer's paged KV cache, and the description of a paged attention call.
//!
//! The cache is a pool of fixed-size blocks of `block_size` token positions; a sequence owns a
//! list of block ids (its block table), handed out by the block allocator in `ember-kv`. This
//! module only stores and reads the values: which block belongs to whom is not its business.
//!
//! # Layout
//!
//! Each of the K and V arenas is one allocation laid out `[block][kv_head][slot][head_dim]`:
//! the rows of one kv head inside one block are contiguous, so attention for one head streams
//! `block_size` consecutive rows per block. Row `(block, head, slot)` starts at byte
//! `((block * n_kv + head) * block_size + slot) * row_bytes`, where `row_bytes` is
//! [`KvDtype::row_bytes`]`(head_dim)`:
//!
//! - `f32`: `head_dim` little-endian f32 values;
//! - `f16`: `head_dim` IEEE binary16 values (round to nearest even on write);
//! - `q8_0`: `head_dim / 32` ggml `block_q8_0`s (an f16 scale, then 32 i8), 34 bytes each.
//!
//! A GPU kernel takes the arenas with exactly this layout.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use ember_quant::GgmlType;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Values per q8_0 block (ggml's `QK8_0`).
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per q8_0 block: an f16 scale and 32 i8.
pub const Q8_0_BYTES: usize = 34;

/// How K and V values are stored; names as llama.cpp's `-ctk` / `-ctv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// 4 bytes per value, exact.
    F32,
    /// IEEE binary16, 2 bytes per value: llama.cpp's default cache type.
    F16,
    /// ggml's q8_0 blocks, 34 bytes per 32 values (`head_dim` must be a multiple of 32).
    Q8_0,
}

impl KvDtype {
    /// Every type, in the order above.
    pub const ALL: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0];

    /// llama.cpp's name: `f32`, `f16`, `q8_0`.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// The ggml type with the same encoding.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            KvDtype::F32 => GgmlType::F32,
            KvDtype::F16 => GgmlType::F16,
            KvDtype::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// Values per storage block (32 for q8_0, 1 otherwise): a row is a whole number of these.
    pub fn block_values(self) -> usize {
        match self {
            KvDtype::Q8_0 => Q8_0_BLOCK,
            _ => 1,
        }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Q8_0 => Q8_0_BYTES,
        }
    }

    /// Average bytes per value (4, 2, 34 / 32).
    pub fn bytes_per_value(self) -> f64 {
        self.block_bytes() as f64 / self.block_values() as f64
    }

    /// Bytes of a row of `n` values, or `None` if `n` is not whole blocks (or overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_values()) {
            return None;
        }
        (n / self.block_values()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = PagedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KvDtype::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| PagedError::UnknownDtype(s.to_owned()))
    }
}

/// Everything that can be wrong with a store request or a paged attention call.
///
/// In the variants about a call, `seq` is an index into [`PagedAttention::seqs`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PagedError {
    /// A KV cache type name other than `f32`, `f16` or `q8_0` (the string given).
    #[error("unknown KV cache type {0:?} (expected f32, f16 or q8_0)")]
    UnknownDtype(String),
    /// A q8_0 store whose rows are not whole 32-value blocks.
    #[error("q8_0 KV cache needs head_dim a multiple of 32, got {head_dim}")]
    Q8HeadDim {
        /// The requested values per head.
        head_dim: usize,
    },
    /// A store with a zero dimension.
    #[error(
        "KV store dimensions must be non-zero: block_size {block_size}, n_kv {n_kv}, head_dim {head_dim}"
    )]
    ZeroDim {
        /// The requested slots per block.
        block_size: usize,
        /// The requested kv heads.
        n_kv: usize,
        /// The requested values per head.
        head_dim: usize,
    },
    /// A store whose size in values or bytes overflows `usize`.
    #[error(
        "KV store of {n_blocks} blocks x {block_size} slots x {n_kv} heads x {head_dim} overflows"
    )]
    TooLarge {
        /// The requested blocks.
        n_blocks: usize,
        /// The requested slots per block.
        block_size: usize,
        /// The requested kv heads.
        n_kv: usize,
        /// The requested values per head.
        head_dim: usize,
    },
    /// The allocator refused the arenas (reported instead of aborting the process).
    #[error(
        "could not allocate {bytes} bytes for one layer's KV cache: lower the context size or \
         the KV budget"
    )]
    OutOfMemory {
        /// Bytes of K and V together.
        bytes: usize,
    },
    /// A block id past the store's last block.
    #[error("block {block} out of range for a store of {n_blocks} blocks")]
    Block {
        /// The block id given.
        block: usize,
        /// Blocks in the store.
        n_blocks: usize,
    },
    /// A slot past the end of a block (or, for [`PagedLayerStore::copy_slots`], more slots
    /// than a block has).
    #[error("slot {slot} out of range for blocks of {block_size} slots")]
    Slot {
        /// The slot (or slot count) given.
        slot: usize,
        /// Slots per block.
        block_size: usize,
    },
    /// A kv head past the store's last one.
    #[error("kv head {head} out of range for {n_kv} kv heads")]
    Head {
        /// The head given.
        head: usize,
        /// KV heads in the store.
        n_kv: usize,
    },
    /// A slice of the wrong length.
    #[error("{what} has {got} values, expected {expected}")]
    Length {
        /// Which argument: `"k"`, `"v"` or `"row buffer"`.
        what: &'static str,
        /// Values it must have.
        expected: usize,
        /// Values it has.
        got: usize,
    },
    /// Query heads that are not whole groups of kv heads (or no query heads).
    #[error("{n_head} query heads are not a multiple of {n_kv} kv heads")]
    HeadGroups {
        /// Query heads of `q`.
        n_head: usize,
        /// KV heads of the store.
        n_kv: usize,
    },
    /// A query head size other than the store's.
    #[error("query head_dim {got} differs from the store's {expected}")]
    HeadDim {
        /// The store's `head_dim`.
        expected: usize,
        /// `q`'s head size.
        got: usize,
    },
    /// A sequence's query rows reach past the end of `q`.
    #[error("sequence {seq}: query rows {start}..{end} out of range for {n_rows} rows")]
    Rows {
        /// The sequence.
        seq: usize,
        /// Its first query row.
        start: usize,
        /// One past its last query row (`usize::MAX` on overflow).
        end: usize,
        /// Rows of `q`.
        n_rows: usize,
    },
    /// Two sequences claim the same query rows.
    #[error("sequences {a} and {b} share query rows")]
    Overlap {
        /// One sequence.
        a: usize,
        /// The other.
        b: usize,
    },
    /// `n_past + n_q` overflows `usize`.
    #[error("sequence {seq}: positions overflow")]
    Positions {
        /// The sequence.
        seq: usize,
    },
    /// A sliding window of 0.
    #[error("sequence {seq}: a window of 0 positions hides every key")]
    ZeroWindow {
        /// The sequence.
        seq: usize,
    },
    /// A block table too short for the sequence's positions.
    #[error("sequence {seq}: block table has {len} entries, positions up to {last} need {needed}")]
    TableShort {
        /// The sequence.
        seq: usize,
        /// Entries in its table.
        len: usize,
        /// Its last position.
        last: usize,
        /// Entries that position needs.
        needed: usize,
    },
    /// A visible position beyond the block table ([`PagedLayerStore::gather_f32`]).
    #[error("position {position} has no block table entry (table of {len})")]
    NoEntry {
        /// The position.
        position: usize,
        /// Entries in the table.
        len: usize,
    },
    /// A host operation (a host write, a row read, the CPU kernel) on a store whose arenas
    /// live on a GPU device, or a GPU operation on a host store.
    #[error("{0}")]
    Placement(&'static str),
    /// The GPU runtime failed (reading a store back).
    #[error("GPU: {0}")]
    Device(String),
    /// A GPU arena larger than the device's largest buffer.
    #[error(
        "one layer's K (or V) cache takes {bytes} bytes, more than the GPU's largest buffer \
         ({max_buffer} bytes): lower the context size or the KV budget, or run fewer layers \
         on the GPU (--gpu-layers)"
    )]
    DeviceBuffer {
        /// Bytes of one arena.
        bytes: usize,
        /// The device's largest buffer.
        max_buffer: u64,
    },
    /// A block table entry that a query can see names no block of the store.
    #[error(
        "sequence {seq}: table entry {index} (block {block}) is out of range for {n_blocks} blocks but visible to a query"
    )]
    TableEntry {
        /// The sequence.
        seq: usize,
        /// The entry's index in the table.
        index: usize,
        /// The block id it holds.
        block: u32,
        /// Blocks in the store.
        n_blocks: usize,
    },
}

/// The K and V arenas (`[0]` is K, `[1]` is V), one variant so they always share a type. f16
/// is kept as raw bits so the allocation is zeroed lazily by the OS (`vec![0u16; n]` is a
/// calloc; `vec![f16::ZERO; n]` would write every value).
///
/// `Device`: both arenas in buffers of a GPU device, with the same layout (f16 two values to a
/// 32-bit word, f32 one); a clone shares the buffers.
#[derive(Clone)]
pub(crate) enum Arenas {
    F32([Vec<f32>; 2]),
    F16([Vec<u16>; 2]),
    Q8_0([Vec<u8>; 2]),
    #[cfg(feature = "cube")]
    Device(crate::cube::kv::DeviceArenas),
}

/// What a host operation says about a store on a GPU device.
#[cfg(feature = "cube")]
const ON_DEVICE: &str = "this layer's K and V live on a GPU device: write them with \
                         `paged_write` and attend on that device";

/// Element types whose all-zero bit pattern is a valid value.
trait ZeroIsValid: Copy {}
impl ZeroIsValid for f32 {}
impl ZeroIsValid for u16 {}
impl ZeroIsValid for u8 {}

/// `vec![0; n]` that returns `None` when the allocation fails instead of aborting the process
/// (a context size from a flag or a request must give an error, not an abort). Written by hand
/// because std's fallible `try_reserve` does not zero lazily: `resize` would touch every page.
fn try_zeroed<T: ZeroIsValid>(n: usize) -> Option<Vec<T>> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0, T is not zero-sized). A null pointer is
    // handled. Otherwise the block was allocated by the global allocator with T's alignment and
    // room for exactly `n` values, all zero bits, which is a valid T (`ZeroIsValid`), so a Vec
    // of length and capacity `n` may own it.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        if ptr.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(ptr, n, n))
    }
}

/// The K and V arenas of `n` values each, or `None` when memory runs out.
fn pair<T: ZeroIsValid>(n: usize) -> Option<[Vec<T>; 2]> {
    Some([try_zeroed(n)?, try_zeroed(n)?])
}

impl Arenas {
    fn zeroed(dtype: KvDtype, values: usize, bytes: usize) -> Result<Self, PagedError> {
        let oom = |unit: usize| PagedError::OutOfMemory {
            bytes: unit.saturating_mul(2),
        };
        Ok(match dtype {
            KvDtype::F32 => Arenas::F32(pair(values).ok_or(oom(values.saturating_mul(4)))?),
            KvDtype::F16 => Arenas::F16(pair(values).ok_or(oom(values.saturating_mul(2)))?),
            KvDtype::Q8_0 => Arenas::Q8_0(pair(bytes).ok_or(oom(bytes))?),
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Arenas::F32([k, v]) => (k.len() + v.len()) * 4,
            Arenas::F16([k, v]) => (k.len() + v.len()) * 2,
            Arenas::Q8_0([k, v]) => k.len() + v.len(),
            #[cfg(feature = "cube")]
            Arenas::Device(d) => d.bytes(),
        }
    }
}

/// One layer's K and V for every block of the pool (layout in the module docs).
#[derive(Clone)]
pub struct PagedLayerStore {
    n_blocks: usize,
    block_size: usize,
    n_kv: usize,
    head_dim: usize,
    dtype: KvDtype,
    /// Bytes (q8_0) or values (f32, f16) per row: the unit the arena is indexed in.
    row_units: usize,
    pub(crate) arenas: Arenas,
}

impl fmt::Debug for PagedLayerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedLayerStore")
            .field("n_blocks", &self.n_blocks)
            .field("block_size", &self.block_size)
            .field("n_kv", &self.n_kv)
            .field("head_dim", &self.head_dim)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl PagedLayerStore {
    /// Allocates both arenas once, zero-filled.
    pub fn new(
        dtype: KvDtype,
        n_blocks: usize,
        block_size: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<Self, PagedError> {
        if block_size == 0 || n_kv == 0 || head_dim == 0 {
            return Err(PagedError::ZeroDim {
                block_size,
                n_kv,
                head_dim,
            });
        }
        let row_bytes = dtype
            .row_bytes(head_dim)
            .ok_or(PagedError::Q8HeadDim { head_dim })?;
        let too_large = PagedError::TooLarge {
            n_blocks,
            block_size,
            n_kv,
            head_dim,
        };
        let rows = n_blocks
            .checked_mul(block_size)
            .and_then(|r| r.checked_mul(n_kv))
            .ok_or(too_large.clone())?;
        let values = rows.checked_mul(head_dim).ok_or(too_large.clone())?;
        let bytes = rows.checked_mul(row_bytes).ok_or(too_large.clone())?;
        // Both arenas together must stay addressable.
        bytes.checked_mul(2).ok_or(too_large)?;
        let row_units = match dtype {
            KvDtype::Q8_0 => row_bytes,
            _ => head_dim,
        };
        Ok(Self {
            n_blocks,
            block_size,
            n_kv,
            head_dim,
            dtype,
            row_units,
            arenas: Arenas::zeroed(dtype, values, bytes)?,
        })
    }

    /// [`new`](Self::new) on `device`: a GPU device (built with `wgpu` or `cuda`) gets both
    /// arenas in its memory for the f32 and f16 types, written by [`crate::paged_write`] and
    /// read there by [`crate::paged_attention`], so K and V never cross to the host. The CPU,
    /// and `q8_0` on any device (no GPU kernel reads it yet), get host arenas.
    pub fn new_on(
        dtype: KvDtype,
        n_blocks: usize,
        block_size: usize,
        n_kv: usize,
        head_dim: usize,
        device: &burn::tensor::Device,
    ) -> Result<Self, PagedError> {
        #[cfg(feature = "cube")]
        if dtype != KvDtype::Q8_0
            && let burn::backend::DispatchDevice::Cube(cube) = device.as_dispatch()
        {
            // Checks the shape and sizes as `new` does, with no arenas yet.
            let mut store = Self::new(dtype, 0, block_size, n_kv, head_dim)?;
            let rows = n_blocks
                .checked_mul(block_size)
                .and_then(|r| r.checked_mul(n_kv))
                .ok_or(PagedError::TooLarge {
                    n_blocks,
                    block_size,
                    n_kv,
                    head_dim,
                })?;
            store.n_blocks = n_blocks;
            store.arenas = Arenas::Device(crate::cube::kv::DeviceArenas::new(
                cube, dtype, rows, head_dim,
            )?);
            return Ok(store);
        }
        let _ = device;
        Self::new(dtype, n_blocks, block_size, n_kv, head_dim)
    }

    /// A copy of this store with its arenas on the host: read back from the device for a store
    /// on a GPU (the same bytes: f16 values pack two to a little-endian word there), else a
    /// clone. For checks and fallbacks; a pass never needs it.
    pub fn to_host(&self) -> Result<Self, PagedError> {
        #[cfg(feature = "cube")]
        if let Arenas::Device(arenas) = &self.arenas {
            let [k, v] = arenas.read()?;
            let mut host = self.clone();
            host.arenas = match self.dtype {
                KvDtype::F16 => Arenas::F16([k, v].map(|b| {
                    b.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect()
                })),
                _ => Arenas::F32([k, v].map(|b| {
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })),
            };
            return Ok(host);
        }
        Ok(self.clone())
    }

    /// Whether the arenas live on a GPU device ([`new_on`](Self::new_on)).
    pub fn is_on_device(&self) -> bool {
        #[cfg(feature = "cube")]
        if let Arenas::Device(_) = self.arenas {
            return true;
        }
        false
    }

    /// Refuses `device` for this store's arenas: a store on a GPU device is read and written
    /// only with tensors on that device (a host store serves any device).
    pub fn check_device(&self, device: &burn::tensor::Device) -> Result<(), PagedError> {
        #[cfg(feature = "cube")]
        if let Arenas::Device(arenas) = &self.arenas {
            let same = match device.as_dispatch() {
                burn::backend::DispatchDevice::Cube(cube) => arenas.is_on(cube),
                _ => false,
            };
            if !same {
                return Err(PagedError::Placement(
                    "this layer's K and V live on another device than the tensors given",
                ));
            }
        }
        let _ = device;
        Ok(())
    }

    /// Blocks in the pool (valid block ids are `0..n_blocks`).
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Token positions (slots) per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// KV heads per position.
    pub fn n_kv(&self) -> usize {
        self.n_kv
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// How values are stored.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes of one stored row (one head of one position).
    pub fn row_bytes(&self) -> usize {
        match self.dtype {
            KvDtype::Q8_0 => self.row_units,
            KvDtype::F16 => self.head_dim * 2,
            KvDtype::F32 => self.head_dim * 4,
        }
    }

    /// Memory held by the K and V arenas.
    pub fn bytes(&self) -> usize {
        self.arenas.bytes()
    }

    /// Row index of `(block, head, slot)`, unchecked (callers check or validated the ids).
    #[inline(always)]
    pub(crate) fn row_index(&self, block: usize, head: usize, slot: usize) -> usize {
        (block * self.n_kv + head) * self.block_size + slot
    }

    /// Arena units (values, or bytes for q8_0) per row.
    pub(crate) fn row_units(&self) -> usize {
        self.row_units
    }

    fn check(&self, block: usize, slot: usize) -> Result<(), PagedError> {
        if block >= self.n_blocks {
            return Err(PagedError::Block {
                block,
                n_blocks: self.n_blocks,
            });
        }
        if slot >= self.block_size {
            return Err(PagedError::Slot {
                slot,
                block_size: self.block_size,
            });
        }
        Ok(())
    }

    /// Stores one token: `k` and `v` are its `[n_kv * head_dim]` values, converted to the
    /// store's type (f16: round to nearest even; q8_0: ggml's `quantize_row_q8_0_ref` per row).
    pub fn write(
        &mut self,
        block: usize,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), PagedError> {
        self.check(block, slot)?;
        let expected = self.n_kv * self.head_dim;
        for (what, x) in [("k", k), ("v", v)] {
            if x.len() != expected {
                return Err(PagedError::Length {
                    what,
                    expected,
                    got: x.len(),
                });
            }
        }
        let first = self.row_index(block, 0, slot);
        let (n_kv, bs, d, units) = (self.n_kv, self.block_size, self.head_dim, self.row_units);
        // Row of head `h` of this token, in arena units.
        let row = |h: usize| (first + h * bs) * units;
        match &mut self.arenas {
            Arenas::F32(arenas) => {
                for (a, x) in arenas.iter_mut().zip([k, v]) {
                    for h in 0..n_kv {
                        a[row(h)..row(h) + d].copy_from_slice(&x[h * d..(h + 1) * d]);
                    }
                }
            }
            Arenas::F16(arenas) => {
                for (a, x) in arenas.iter_mut().zip([k, v]) {
                    for h in 0..n_kv {
                        a[row(h)..row(h) + d]
                            .reinterpret_cast_mut::<f16>()
                            .convert_from_f32_slice(&x[h * d..(h + 1) * d]);
                    }
                }
            }
            Arenas::Q8_0(arenas) => {
                for (a, x) in arenas.iter_mut().zip([k, v]) {
                    // Blocks never straddle heads (head_dim % 32 == 0): quantize the token in
                    // one call, then copy each head's blocks to its row.
                    let q = ember_quant::quantize(GgmlType::Q8_0, x)
                        .map_err(|_| PagedError::Q8HeadDim { head_dim: d })?;
                    for h in 0..n_kv {
                        a[row(h)..row(h) + units].copy_from_slice(&q[h * units..(h + 1) * units]);
                    }
                }
            }
            #[cfg(feature = "cube")]
            Arenas::Device(_) => return Err(PagedError::Placement(ON_DEVICE)),
        }
        Ok(())
    }

    /// Copies slots `0..slots` of every head, K and V, from `src_block` to `dst_block`: the
    /// copy-on-write of a shared, partly filled block. Equal blocks are a no-op.
    pub fn copy_slots(
        &mut self,
        src_block: usize,
        dst_block: usize,
        slots: usize,
    ) -> Result<(), PagedError> {
        for block in [src_block, dst_block] {
            if block >= self.n_blocks {
                return Err(PagedError::Block {
                    block,
                    n_blocks: self.n_blocks,
                });
            }
        }
        if slots > self.block_size {
            return Err(PagedError::Slot {
                slot: slots,
                block_size: self.block_size,
            });
        }
        if src_block == dst_block || slots == 0 {
            return Ok(());
        }
        let units = self.row_units;
        let len = slots * units;
        // Head h's rows of a block start `h * block_size` rows after its first.
        let (src, dst) = (
            self.row_index(src_block, 0, 0),
            self.row_index(dst_block, 0, 0),
        );
        let (n_kv, bs) = (self.n_kv, self.block_size);
        let heads = (0..n_kv).map(|h| {
            let at = |first: usize| (first + h * bs) * units;
            (at(src), at(dst))
        });
        fn copy<T: Copy>(
            a: &mut [Vec<T>; 2],
            heads: impl Iterator<Item = (usize, usize)>,
            len: usize,
        ) {
            for (src, dst) in heads {
                a.iter_mut()
                    .for_each(|a| a.copy_within(src..src + len, dst));
            }
        }
        match &mut self.arenas {
            Arenas::F32(a) => copy(a, heads, len),
            Arenas::F16(a) => copy(a, heads, len),
            Arenas::Q8_0(a) => copy(a, heads, len),
            #[cfg(feature = "cube")]
            Arenas::Device(d) => d.copy_rows(src, dst, n_kv, bs, slots),
        }
        Ok(())
    }

    /// K row of `(block, head, slot)` as f32 (dequantized).
    pub fn k_row_f32(
        &self,
        block: usize,
        head: usize,
        slot: usize,
        out: &mut [f32],
    ) -> Result<(), PagedError> {
        self.row_f32(0, block, head, slot, out)
    }

    /// V row of `(block, head, slot)` as f32 (dequantized).
    pub fn v_row_f32(
        &self,
        block: usize,
        head: usize,
        slot: usize,
        out: &mut [f32],
    ) -> Result<(), PagedError> {
        self.row_f32(1, block, head, slot, out)
    }

    /// Row of K (`which == 0`) or V (`1`) as f32.
    fn row_f32(
        &self,
        which: usize,
        block: usize,
        head: usize,
        slot: usize,
        out: &mut [f32],
    ) -> Result<(), PagedError> {
        self.check(block, slot)?;
        if head >= self.n_kv {
            return Err(PagedError::Head {
                head,
                n_kv: self.n_kv,
            });
        }
        if out.len() != self.head_dim {
            return Err(PagedError::Length {
                what: "row buffer",
                expected: self.head_dim,
                got: out.len(),
            });
        }
        let (units, row) = (self.row_units, self.row_index(block, head, slot));
        let at = row * units..(row + 1) * units;
        match &self.arenas {
            Arenas::F32(a) => out.copy_from_slice(&a[which][at]),
            Arenas::F16(a) => a[which][at]
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(out),
            Arenas::Q8_0(a) => dequantize_q8_0_row(&a[which][at], out),
            #[cfg(feature = "cube")]
            Arenas::Device(_) => return Err(PagedError::Placement(ON_DEVICE)),
        }
        Ok(())
    }
}

impl PagedLayerStore {
    /// K and V of the keys `seq`'s queries see ([`SeqAttn::visible_keys`]), dequantized into
    /// dense `[n_kv, t, head_dim]` arrays (for the generic fallback and tests).
    pub fn gather_f32(&self, seq: &SeqAttn) -> Result<(Vec<f32>, Vec<f32>), PagedError> {
        if self.is_on_device() {
            return self.to_host()?.gather_f32(seq);
        }
        let keys = seq.visible_keys();
        let (t, d, bs) = (keys.len(), self.head_dim, self.block_size);
        let mut k = vec![0.0f32; self.n_kv * t * d];
        let mut v = vec![0.0f32; self.n_kv * t * d];
        for (j, p) in keys.enumerate() {
            let block = *seq.block_table.get(p / bs).ok_or(PagedError::NoEntry {
                position: p,
                len: seq.block_table.len(),
            })? as usize;
            for h in 0..self.n_kv {
                let at = (h * t + j) * d..(h * t + j + 1) * d;
                self.k_row_f32(block, h, p % bs, &mut k[at.clone()])?;
                self.v_row_f32(block, h, p % bs, &mut v[at])?;
            }
        }
        Ok((k, v))
    }
}

/// Dequantizes whole q8_0 blocks: `q as f32 * d`, ggml's `dequantize_row_q8_0` exactly.
#[inline]
pub(crate) fn dequantize_q8_0_row(src: &[u8], out: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<Q8_0_BYTES>();
    let (outs, _) = out.as_chunks_mut::<Q8_0_BLOCK>();
    for (b, y) in blocks.iter().zip(outs) {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        for (o, &q) in y.iter_mut().zip(&b[2..]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

/// One sequence of a ragged batch.
///
/// Its queries are rows `q_start..q_start + n_q` of the call's `q`, at positions
/// `n_past..n_past + n_q`; its keys are positions `0..n_past + n_q`, position `p` stored at
/// block `block_table[p / block_size]`, slot `p % block_size`. A query at position `qp` sees
/// key `kp` iff `kp <= qp` and, with a window, `qp - kp < window`. Table entries for positions
/// no query sees may be `u32::MAX` (released): they are never read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqAttn {
    /// First row of `q` holding this sequence's queries.
    pub q_start: usize,
    /// Queries (rows of `q`) of this sequence; 0 leaves it out of the call.
    pub n_q: usize,
    /// Positions before the first query: the queries are at `n_past..n_past + n_q`.
    pub n_past: usize,
    /// Block id of each `block_size` positions, as the block allocator hands them out.
    pub block_table: Arc<[u32]>,
    /// Sliding window in positions (`None`: full causal attention; `Some(0)` is invalid).
    pub window: Option<usize>,
    /// Rows of the batch that llama.cpp would compute these queries in when the sequence runs
    /// alone (its ubatch: a prompt's 512-token slice, or 1 for a decoded token). It picks
    /// the arithmetic, as llama.cpp picks it by batch size: the tiled path from 64 rows, the
    /// split-KV path for 1 row over 512+ cells, else the one-row path. Usually `n_q`; a
    /// prompt chunk cut shorter by a batch budget or a cached prefix keeps its solo value, so
    /// its results do not depend on what it was batched with.
    pub path_rows: usize,
}

impl SeqAttn {
    /// Positions some query of this sequence sees: `first..end` (empty without queries).
    pub fn visible_keys(&self) -> std::ops::Range<usize> {
        let end = self.n_past + self.n_q;
        if self.n_q == 0 {
            return end..end;
        }
        first_visible(self.n_past, self.window)..end
    }
}

/// First key position visible to a query at position `qp`.
#[inline]
pub(crate) fn first_visible(qp: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (qp + 1).saturating_sub(w))
}

/// One layer's paged attention call: the store, the batch's sequences and the score scale.
/// Cheap to clone (two `Arc`s).
#[derive(Clone, Debug)]
pub struct PagedAttention {
    /// The layer's K and V.
    pub store: Arc<PagedLayerStore>,
    /// The batch's sequences; their query rows must not overlap.
    pub seqs: Arc<[SeqAttn]>,
    /// Factor applied to every `q . k` score before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

impl PagedAttention {
    /// Checks the call against `q: [n_rows, n_head, head_dim]`: head counts and sizes, query
    /// rows in range and not shared between sequences, positions without overflow, and every
    /// table entry a query can see inside the store. After this the kernels index without
    /// further checks.
    pub fn validate(
        &self,
        n_rows: usize,
        n_head: usize,
        head_dim: usize,
    ) -> Result<(), PagedError> {
        let s = &*self.store;
        if head_dim != s.head_dim {
            return Err(PagedError::HeadDim {
                expected: s.head_dim,
                got: head_dim,
            });
        }
        if n_head == 0 || !n_head.is_multiple_of(s.n_kv) {
            return Err(PagedError::HeadGroups {
                n_head,
                n_kv: s.n_kv,
            });
        }
        let mut ranges = Vec::with_capacity(self.seqs.len());
        for (i, seq) in self.seqs.iter().enumerate() {
            let end = seq.q_start.checked_add(seq.n_q);
            if end.is_none_or(|e| e > n_rows) {
                return Err(PagedError::Rows {
                    seq: i,
                    start: seq.q_start,
                    end: end.unwrap_or(usize::MAX),
                    n_rows,
                });
            }
            if seq.window == Some(0) {
                return Err(PagedError::ZeroWindow { seq: i });
            }
            if seq.n_q == 0 {
                continue;
            }
            ranges.push((seq.q_start, seq.q_start + seq.n_q, i));
            let Some(t) = seq.n_past.checked_add(seq.n_q) else {
                return Err(PagedError::Positions { seq: i });
            };
            let keys = seq.visible_keys();
            let (first, last) = (keys.start / s.block_size, (t - 1) / s.block_size);
            if seq.block_table.len() <= last {
                return Err(PagedError::TableShort {
                    seq: i,
                    len: seq.block_table.len(),
                    last: t - 1,
                    needed: last + 1,
                });
            }
            for (index, &block) in seq.block_table[first..=last].iter().enumerate() {
                if block as usize >= s.n_blocks {
                    return Err(PagedError::TableEntry {
                        seq: i,
                        index: first + index,
                        block,
                        n_blocks: s.n_blocks,
                    });
                }
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(PagedError::Overlap {
                    a: w[0].2,
                    b: w[1].2,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-3.0..3.0f32)).collect()
    }

    #[test]
    fn dtype_names_and_sizes() {
        for t in KvDtype::ALL {
            assert_eq!(t.name().parse::<KvDtype>(), Ok(t));
            assert_eq!(t.to_string(), t.name());
            assert_eq!(t.block_values(), t.ggml_type().block_size());
            assert_eq!(t.block_bytes(), t.ggml_type().type_size());
        }
        assert_eq!("Q8_0".parse::<KvDtype>(), Ok(KvDtype::Q8_0));
        assert!(matches!(
            "q4_0".parse::<KvDtype>(),
            Err(PagedError::UnknownDtype(_))
        ));
        assert_eq!(KvDtype::Q8_0.row_bytes(64), Some(68));
        assert_eq!(KvDtype::Q8_0.row_bytes(48), None);
        assert_eq!(KvDtype::F16.row_bytes(48), Some(96));
        assert_eq!(KvDtype::Q8_0.bytes_per_value(), 34.0 / 32.0);
    }

    #[test]
    fn new_checks_shapes() {
        assert_eq!(
            PagedLayerStore::new(KvDtype::Q8_0, 4, 16, 2, 48).unwrap_err(),
            PagedError::Q8HeadDim { head_dim: 48 }
        );
        assert!(matches!(
            PagedLayerStore::new(KvDtype::F16, 4, 0, 2, 64),
            Err(PagedError::ZeroDim { .. })
        ));
        assert!(matches!(
            PagedLayerStore::new(KvDtype::F32, usize::MAX / 2, 16, 2, 64),
            Err(PagedError::TooLarge { .. })
        ));
        let s = PagedLayerStore::new(KvDtype::Q8_0, 10, 16, 3, 64).unwrap();
        assert_eq!(s.bytes(), 2 * 10 * 16 * 3 * 68);
        assert_eq!(s.row_bytes(), 68);
        let s = PagedLayerStore::new(KvDtype::F16, 10, 16, 3, 64).unwrap();
        assert_eq!(s.bytes(), 2 * 10 * 16 * 3 * 64 * 2);
    }

    /// Rows come back as the dtype's rounding of what was written: exact for f32, ggml's
    /// f16 conversion, and the bytes of ggml's reference q8_0 quantizer.
    #[test]
    fn write_read_round_trip() {
        let mut rng = StdRng::seed_from_u64(1);
        let (n_kv, d, bs) = (3, 64, 4);
        for dtype in KvDtype::ALL {
            let mut s = PagedLayerStore::new(dtype, 5, bs, n_kv, d).unwrap();
            let mut written = Vec::new();
            for (block, slot) in [(0, 0), (4, 3), (2, 1), (2, 2)] {
                let (k, v) = (random(&mut rng, n_kv * d), random(&mut rng, n_kv * d));
                s.write(block, slot, &k, &v).unwrap();
                written.push((block, slot, k, v));
            }
            let mut row = vec![0.0f32; d];
            let mut want = vec![0.0f32; d];
            for (block, slot, k, v) in &written {
                for h in 0..n_kv {
                    for (src, is_k) in [(k, true), (v, false)] {
                        let src = &src[h * d..(h + 1) * d];
                        let bytes = ember_quant::quantize(dtype.ggml_type(), src).unwrap();
                        ember_quant::dequantize(dtype.ggml_type(), &bytes, &mut want).unwrap();
                        if is_k {
                            s.k_row_f32(*block, h, *slot, &mut row).unwrap();
                        } else {
                            s.v_row_f32(*block, h, *slot, &mut row).unwrap();
                        }
                        let same = row
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype} block {block} slot {slot} head {h}");
                    }
                }
            }
            // Untouched rows are zero.
            s.k_row_f32(1, 2, 3, &mut row).unwrap();
            assert!(row.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn q8_0_bytes_match_ggml_quantizer() {
        let mut rng = StdRng::seed_from_u64(2);
        let (n_kv, d) = (2, 64);
        let mut s = PagedLayerStore::new(KvDtype::Q8_0, 2, 2, n_kv, d).unwrap();
        let k = random(&mut rng, n_kv * d);
        let mut v = random(&mut rng, n_kv * d);
        v[..32].iter_mut().for_each(|x| *x = 0.0); // an all-zero block: scale 0
        s.write(1, 1, &k, &v).unwrap();
        let Arenas::Q8_0([arena, _]) = &s.arenas else {
            unreachable!()
        };
        let want = ember_quant::quantize(GgmlType::Q8_0, &k).unwrap();
        for h in 0..n_kv {
            let row = s.row_index(1, h, 1) * 68;
            assert_eq!(&arena[row..row + 68], &want[h * 68..(h + 1) * 68]);
        }
    }

    #[test]
    fn copy_slots_copies_a_prefix_of_every_head() {
        let mut rng = StdRng::seed_from_u64(3);
        let (n_kv, d, bs) = (2, 32, 4);
        for dtype in KvDtype::ALL {
            let mut s = PagedLayerStore::new(dtype, 3, bs, n_kv, d).unwrap();
            for block in 0..3 {
                for slot in 0..bs {
                    let (k, v) = (random(&mut rng, n_kv * d), random(&mut rng, n_kv * d));
                    s.write(block, slot, &k, &v).unwrap();
                }
            }
            let before = s.clone();
            s.copy_slots(0, 2, 3).unwrap();
            let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
            for h in 0..n_kv {
                for slot in 0..bs {
                    let src = if slot < 3 { 0 } else { 2 };
                    before.k_row_f32(src, h, slot, &mut a).unwrap();
                    s.k_row_f32(2, h, slot, &mut b).unwrap();
                    assert_eq!(a, b, "{dtype} k head {h} slot {slot}");
                    before.v_row_f32(src, h, slot, &mut a).unwrap();
                    s.v_row_f32(2, h, slot, &mut b).unwrap();
                    assert_eq!(a, b, "{dtype} v head {h} slot {slot}");
                    // Source and the other block untouched.
                    for block in [0, 1] {
                        before.k_row_f32(block, h, slot, &mut a).unwrap();
                        s.k_row_f32(block, h, slot, &mut b).unwrap();
                        assert_eq!(a, b);
                    }
                }
            }
            s.copy_slots(1, 1, 4).unwrap();
        }
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut s = PagedLayerStore::new(KvDtype::F16, 2, 4, 2, 8).unwrap();
        let x = vec![0.0f32; 16];
        let mut row = vec![0.0f32; 8];
        assert!(matches!(
            s.write(2, 0, &x, &x),
            Err(PagedError::Block { .. })
        ));
        assert!(matches!(
            s.write(0, 4, &x, &x),
            Err(PagedError::Slot { .. })
        ));
        assert!(matches!(
            s.write(0, 0, &x[1..], &x),
            Err(PagedError::Length { what: "k", .. })
        ));
        assert!(matches!(
            s.k_row_f32(0, 2, 0, &mut row),
            Err(PagedError::Head { .. })
        ));
        assert!(matches!(
            s.v_row_f32(0, 0, 0, &mut row[1..]),
            Err(PagedError::Length { .. })
        ));
        assert!(matches!(
            s.copy_slots(0, 2, 1),
            Err(PagedError::Block { .. })
        ));
        assert!(matches!(
            s.copy_slots(0, 1, 5),
            Err(PagedError::Slot { .. })
        ));
    }

    fn seq(
        q_start: usize,
        n_q: usize,
        n_past: usize,
        table: &[u32],
        window: Option<usize>,
    ) -> SeqAttn {
        SeqAttn {
            q_start,
            n_q,
            n_past,
            block_table: table.into(),
            window,
            path_rows: n_q,
        }
    }

    #[test]
    fn validate_reports_each_problem() {
        let store = Arc::new(PagedLayerStore::new(KvDtype::F16, 4, 4, 2, 8).unwrap());
        let call = |seqs: Vec<SeqAttn>| PagedAttention {
            store: Arc::clone(&store),
            seqs: seqs.into(),
            scale: 1.0,
        };
        let ok = call(vec![seq(0, 2, 5, &[0, 1], None), seq(2, 1, 0, &[3], None)]);
        assert_eq!(ok.validate(3, 4, 8), Ok(()));
        assert!(matches!(
            ok.validate(3, 4, 16),
            Err(PagedError::HeadDim { .. })
        ));
        assert!(matches!(
            ok.validate(3, 3, 8),
            Err(PagedError::HeadGroups { .. })
        ));
        assert!(matches!(
            ok.validate(2, 4, 8),
            Err(PagedError::Rows { seq: 1, .. })
        ));
        let overlap = call(vec![seq(0, 2, 0, &[0], None), seq(1, 1, 0, &[3], None)]);
        assert!(matches!(
            overlap.validate(3, 2, 8),
            Err(PagedError::Overlap { .. })
        ));
        let short = call(vec![seq(0, 2, 7, &[0, 1], None)]);
        assert!(matches!(
            short.validate(2, 2, 8),
            Err(PagedError::TableShort { needed: 3, .. })
        ));
        let released = call(vec![seq(0, 1, 8, &[0, u32::MAX, 2], None)]);
        assert!(matches!(
            released.validate(1, 2, 8),
            Err(PagedError::TableEntry { index: 1, .. })
        ));
        // With a window of 4, position 8 sees 5..=8: block 0 may be released.
        let windowed = call(vec![seq(0, 1, 8, &[u32::MAX, 1, 2], Some(4))]);
        assert_eq!(windowed.validate(1, 2, 8), Ok(()));
        let windowed = call(vec![seq(0, 1, 8, &[u32::MAX, u32::MAX, 2], Some(4))]);
        assert!(windowed.validate(1, 2, 8).is_err());
        let zero = call(vec![seq(0, 1, 0, &[0], Some(0))]);
        assert!(matches!(
            zero.validate(1, 2, 8),
            Err(PagedError::ZeroWindow { .. })
        ));
        let overflow = call(vec![seq(0, 1, usize::MAX, &[0], None)]);
        assert!(matches!(
            overflow.validate(1, 2, 8),
            Err(PagedError::Positions { .. })
        ));
        // A sequence without queries needs no table.
        let empty = call(vec![seq(1, 0, 100, &[], None)]);
        assert_eq!(empty.validate(1, 2, 8), Ok(()));
    }
}

#[cfg(test)]
mod alloc_tests {
    use super::*;

    /// Issue #14: an arena larger than the machine is an error, not an abort.
    #[test]
    fn an_impossible_arena_is_an_error() {
        // 2^40 slots x 8 heads x 64 = 2^49 values: 1 PiB of f16 per arena.
        let err = PagedLayerStore::new(KvDtype::F16, 1 << 35, 32, 8, 64).expect_err("1 PiB");
        assert!(matches!(err, PagedError::OutOfMemory { .. }), "{err}");
        assert!(err.to_string().contains("lower the context size"), "{err}");
        let ok = PagedLayerStore::new(KvDtype::Q8_0, 4, 32, 2, 64).expect("small store");
        assert_eq!(ok.n_blocks(), 4);
    }
}
