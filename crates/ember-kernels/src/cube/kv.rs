//! The paged KV cache on a GPU device: a layer's K and V arenas in device buffers (the layout of
//! [`crate::paged`], f16 two values to a 32-bit word since WGSL has no 16-bit storage), written
//! by [`crate::paged_write`] and read by a flash-attention kernel over the block tables. Nothing
//! crosses to the host but the small per-call tables.

use burn::tensor::Shape;
use burn_cubecl::CubeDevice;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::blocks::{f16_bits_to_f32, round_f32_to_f16};
use super::kernels::cube_index;
use super::{ComputeClient, buffer, contiguous_f32, empty_f32, grid};
use crate::paged::{KvDtype, PagedAttention, PagedError, first_visible};

/// One layer's K and V arenas on a device; a clone shares the buffers.
#[derive(Clone)]
pub(crate) struct DeviceArenas {
    device: CubeDevice,
    k: Handle,
    v: Handle,
    /// 32-bit words in each arena.
    words: usize,
    /// Words per stored row (one kv head of one position): `head_dim / 2` for f16, `head_dim`
    /// for f32.
    row_words: usize,
    f16: bool,
}

impl DeviceArenas {
    /// Zeroed arenas of `rows` rows of `head_dim` values each, in `dtype` (f32 or f16).
    pub(crate) fn new(
        device: &CubeDevice,
        dtype: KvDtype,
        rows: usize,
        head_dim: usize,
    ) -> Result<Self, PagedError> {
        let f16 = match dtype {
            KvDtype::F16 if head_dim.is_multiple_of(2) => true,
            KvDtype::F16 => {
                return Err(PagedError::Placement(
                    "an f16 KV cache on a GPU needs an even head_dim (two values a word)",
                ));
            }
            KvDtype::F32 => false,
            KvDtype::Q8_0 => {
                return Err(PagedError::Placement(
                    "a q8_0 KV cache is not kept on a GPU (no kernel reads it there)",
                ));
            }
        };
        let row_words = if f16 { head_dim / 2 } else { head_dim };
        let too_large = PagedError::DeviceBuffer {
            bytes: usize::MAX,
            max_buffer: 0,
        };
        let words = rows.checked_mul(row_words).ok_or(too_large.clone())?;
        let bytes = words.checked_mul(4).ok_or(too_large)?;
        let client = device.client();
        let max_buffer = client.properties().memory.max_page_size;
        // The kernels index words with 32-bit arithmetic on some runtimes.
        if bytes as u64 > max_buffer.min(u32::MAX as u64) {
            return Err(PagedError::DeviceBuffer { bytes, max_buffer });
        }
        // Zeroed (as the host arenas are), from a lazily zeroed host buffer. A size of zero is
        // one word: a device buffer cannot be empty.
        let zeros = vec![0u8; bytes.max(4)];
        Ok(Self {
            device: device.clone(),
            k: client.create_from_slice(&zeros),
            v: client.create_from_slice(&zeros),
            words,
            row_words,
            f16,
        })
    }

    /// Bytes of both arenas.
    pub(crate) fn bytes(&self) -> usize {
        2 * self.words * 4
    }

    /// Both arenas' bytes, read back from the device (`words * 4` each).
    pub(crate) fn read(&self) -> Result<[Vec<u8>; 2], PagedError> {
        let client = self.device.client();
        let read = client
            .read(vec![self.k.clone(), self.v.clone()])
            .map_err(|e| PagedError::Device(format!("reading the KV cache back: {e:?}")))?;
        let n = self.words * 4;
        let take = |i: usize| {
            read.get(i)
                .and_then(|b| b.get(..n))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| PagedError::Device("a KV arena came back short".into()))
        };
        Ok([take(0)?, take(1)?])
    }

    /// Whether `device` is the one holding the arenas.
    pub(crate) fn is_on(&self, device: &CubeDevice) -> bool {
        &self.device == device
    }

    fn arena(&self, which: &Handle) -> BufferArg {
        // SAFETY: each arena buffer holds `words` 32-bit words (at least one).
        unsafe { BufferArg::from_raw_parts(which.clone(), self.words.max(1)) }
    }

    /// Copies `slots` rows of each of `n_kv` heads, K and V, from the block whose first row is
    /// `src` to the one whose first row is `dst` (head `h`'s rows start `h * block_size` rows
    /// after the first).
    pub(crate) fn copy_rows(
        &self,
        src: usize,
        dst: usize,
        n_kv: usize,
        block_size: usize,
        slots: usize,
    ) {
        let per_head = slots * self.row_words;
        let n = n_kv * per_head;
        if n == 0 {
            return;
        }
        let client = self.device.client();
        let threads = 256u32;
        // SAFETY: the caller checked both blocks and `slots <= block_size`, so every word
        // read and written lies inside the arenas' `words`.
        unsafe {
            kv_copy::launch_unchecked(
                &client,
                grid(n.div_ceil(threads as usize)),
                CubeDim::new_1d(threads),
                self.arena(&self.k),
                self.arena(&self.v),
                n,
                per_head,
                src * self.row_words,
                dst * self.row_words,
                block_size * self.row_words,
            );
        }
    }

    /// Stores rows of `k` and `v` (`[n_rows, n_kv, head_dim]`, on this device): row `i` at
    /// `slots[i] = block * block_size + slot`, every slot already checked.
    pub(crate) fn write(
        &self,
        k: CubeTensor,
        v: CubeTensor,
        slots: &[u32],
        n_kv: usize,
        block_size: usize,
    ) {
        let (k, v) = (
            contiguous_f32(k, "paged_write"),
            contiguous_f32(v, "paged_write"),
        );
        let n = slots.len() * n_kv * self.row_words;
        if n == 0 {
            return;
        }
        let client = self.device.client();
        let slots = upload_u32(&client, slots);
        let threads = 256u32;
        // SAFETY: thread `g < n` reads values of row `g / (n_kv * row_words)` of `k` and `v`
        // (`slots.len() * n_kv * head_dim` values each) and writes one word of each arena, at
        // a row of a checked block and slot.
        unsafe {
            kv_write::launch_unchecked(
                &client,
                grid(n.div_ceil(threads as usize)),
                CubeDim::new_1d(threads),
                buffer(&k),
                buffer(&v),
                slots.arg(),
                self.arena(&self.k),
                self.arena(&self.v),
                n,
                n_kv,
                block_size,
                self.row_words,
                self.f16,
            );
        }
    }
}

/// A `u32` array on the device (never empty: a device buffer cannot be), with its length.
struct DeviceU32 {
    handle: Handle,
    len: usize,
}

impl DeviceU32 {
    fn arg(&self) -> BufferArg {
        // SAFETY: `handle` holds `len` 32-bit words.
        unsafe { BufferArg::from_raw_parts(self.handle.clone(), self.len) }
    }
}

fn upload_u32(client: &ComputeClient, values: &[u32]) -> DeviceU32 {
    let one = [0u32];
    let values = if values.is_empty() { &one[..] } else { values };
    DeviceU32 {
        handle: client.create_from_slice(bytemuck::cast_slice(values)),
        len: values.len(),
    }
}

/// Threads per cube of the attention kernel: keys scored per tile.
const ATTN_THREADS: u32 = 64;

/// Paged attention of `q: [n_rows, n_head, head_dim]` over `attn`'s store on its device (the
/// call validated): one cube per (query row, query head), scoring a tile of keys at a time
/// (one key per thread) with an online softmax; rows of no sequence are zero.
pub(crate) fn attention(q: CubeTensor, attn: &PagedAttention, arenas: &DeviceArenas) -> CubeTensor {
    let q = contiguous_f32(q, "paged_attention");
    let dims = q.meta.shape().clone();
    let (n_rows, n_head, d) = (dims[0], dims[1], dims[2]);
    let store = &*attn.store;
    let out = empty_f32(&q.client, &q.device, Shape::new([n_rows, n_head * d]));
    if n_rows == 0 || n_head == 0 || d == 0 {
        return out;
    }
    let bs = store.block_size();
    // Per row: one past its position (0: no sequence), its first visible key, and where its
    // sequence's block table starts in `tables`.
    let mut meta = vec![0u32; 3 * n_rows];
    let mut tables = Vec::new();
    for seq in attn.seqs.iter().filter(|s| s.n_q > 0) {
        let off = tables.len() as u32;
        let keys = seq.visible_keys();
        tables.extend_from_slice(&seq.block_table[..keys.end.div_ceil(bs)]);
        for i in 0..seq.n_q {
            let qp = seq.n_past + i;
            let r = 3 * (seq.q_start + i);
            meta[r] = (qp + 1) as u32;
            meta[r + 1] = first_visible(qp, seq.window) as u32;
            meta[r + 2] = off;
        }
    }
    let meta = upload_u32(&q.client, &meta);
    let tables = upload_u32(&q.client, &tables);
    // SAFETY: cube `c < n_rows * n_head` reads row `c / n_head`, head `c % n_head` of `q`,
    // its row's `meta` entries, the table entries of its visible keys (validated inside the
    // store, uploaded for exactly those positions), those keys' K and V rows, and writes that
    // head's `d` values of `out` (`n_rows * n_head * d`).
    unsafe {
        paged_attention::launch_unchecked(
            &q.client,
            grid(n_rows * n_head),
            CubeDim::new_1d(ATTN_THREADS),
            buffer(&q),
            arenas.arena(&arenas.k),
            arenas.arena(&arenas.v),
            meta.arg(),
            tables.arg(),
            buffer(&out),
            n_rows * n_head,
            n_head,
            n_head / store.n_kv(),
            store.n_kv(),
            bs,
            attn.scale,
            d as u32,
            arenas.f16,
            ATTN_THREADS,
        );
    }
    out
}

/// An f32 as the bits of the nearest f16 (ties to even, overflow to infinity), in the low 16
/// bits.
#[cube]
fn f16_bits(x: f32) -> u32 {
    let bits = u32::reinterpret(round_f32_to_f16(x));
    let sign = (bits >> 16u32) & 0x8000u32;
    let abs = bits & 0x7FFF_FFFFu32;
    let mant = (abs >> 13u32) & 0x3FFu32;
    let h = if abs >= 0x7F80_0000u32 {
        // Infinity, or NaN kept a NaN.
        if abs > 0x7F80_0000u32 && mant == 0u32 {
            0x7E00u32
        } else {
            0x7C00u32 | mant
        }
    } else if abs >= 0x3880_0000u32 {
        (((abs >> 23u32) - 112u32) << 10u32) | mant
    } else {
        // Zero or an f16 subnormal: the rounded value is a whole number of 2^-24.
        u32::cast_from(f32::reinterpret(abs) * 16_777_216.0f32)
    };
    sign | h
}

/// Value `e` of the row starting at word `base`.
#[cube]
fn kv_value(arena: &[u32], base: usize, e: usize, #[comptime] f16: bool) -> f32 {
    if f16 {
        let word = arena[base + e / 2];
        f16_bits_to_f32((word >> (((e % 2) * 16) as u32)) & 0xFFFFu32)
    } else {
        f32::reinterpret(arena[base + e])
    }
}

#[cube(launch_unchecked)]
fn kv_write(
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    k_arena: &mut [u32],
    v_arena: &mut [u32],
    n: usize,
    n_kv: usize,
    block_size: usize,
    row_words: usize,
    #[comptime] f16: bool,
) {
    let g = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if g >= n {
        terminate!();
    }
    let w = g % row_words;
    let row_head = g / row_words;
    let (row, h) = (row_head / n_kv, row_head % n_kv);
    let at = slots[row] as usize;
    let (block, slot) = (at / block_size, at % block_size);
    let dst = ((block * n_kv + h) * block_size + slot) * row_words + w;
    if f16 {
        let src = row_head * row_words * 2 + 2 * w;
        k_arena[dst] = f16_bits(k[src]) | (f16_bits(k[src + 1]) << 16u32);
        v_arena[dst] = f16_bits(v[src]) | (f16_bits(v[src + 1]) << 16u32);
    } else {
        let src = row_head * row_words + w;
        k_arena[dst] = u32::reinterpret(k[src]);
        v_arena[dst] = u32::reinterpret(v[src]);
    }
}

#[cube(launch_unchecked)]
fn kv_copy(
    k_arena: &mut [u32],
    v_arena: &mut [u32],
    n: usize,
    per_head: usize,
    src: usize,
    dst: usize,
    head_stride: usize,
) {
    let g = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if g >= n {
        terminate!();
    }
    let (h, i) = (g / per_head, g % per_head);
    let (from, to) = (src + h * head_stride + i, dst + h * head_stride + i);
    k_arena[to] = k_arena[from];
    v_arena[to] = v_arena[from];
}

/// One cube per (query row, head): the row's visible keys in tiles of one key per thread. Each
/// thread scores its key (`q . k * scale`), the tile's maximum and weights `exp(s - max)` go
/// through shared memory, and each thread rescales and accumulates its own dimensions of the
/// output (`e = tid, tid + threads, ...`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn paged_attention(
    q: &[f32],
    k_arena: &[u32],
    v_arena: &[u32],
    meta: &[u32],
    tables: &[u32],
    out: &mut [f32],
    n_cubes: usize,
    n_head: usize,
    group: usize,
    n_kv: usize,
    block_size: usize,
    scale: f32,
    #[comptime] head_dim: u32,
    #[comptime] f16: bool,
    #[comptime] threads: u32,
) {
    let c = cube_index();
    if c >= n_cubes {
        terminate!();
    }
    let (row, h) = (c / n_head, c % n_head);
    let kvh = h / group;
    let tid = UNIT_POS_X as usize;
    let t = threads as usize;
    let d = head_dim as usize;
    let row_words = if f16 { d / 2 } else { d };
    let mut qs = Shared::<[f32]>::new_slice(head_dim as usize);
    let mut acc = Shared::<[f32]>::new_slice(head_dim as usize);
    let mut weights = Shared::<[f32]>::new_slice(threads as usize);
    let mut bases = Shared::<[u32]>::new_slice(threads as usize);
    let qbase = c * d;
    let mut e = tid;
    while e < d {
        qs[e] = q[qbase + e];
        acc[e] = 0.0f32;
        e += t;
    }
    sync_cube();
    let end = meta[3 * row] as usize;
    let lo = meta[3 * row + 1] as usize;
    let off = meta[3 * row + 2] as usize;
    // Below every score (WGSL cannot be relied on to make an infinity at run time): the
    // running maximum before the first key.
    let mut m = f32::new(-3.0e38);
    let mut l = f32::new(0.0);
    let mut t0 = lo;
    while t0 < end {
        let j = t0 + tid;
        let mut s = f32::new(-3.0e38);
        let mut base = 0usize;
        if j < end {
            let block = tables[off + j / block_size] as usize;
            base = ((block * n_kv + kvh) * block_size + j % block_size) * row_words;
            let mut dot = 0.0f32;
            let mut i = 0usize;
            while i < d {
                dot += qs[i] * kv_value(k_arena, base, i, f16);
                i += 1;
            }
            s = dot * scale;
        }
        weights[tid] = s;
        bases[tid] = base as u32;
        sync_cube();
        let n_here = if end - t0 < t { end - t0 } else { t };
        let mut mx = m;
        let mut jj = 0usize;
        while jj < n_here {
            let sj = weights[jj];
            if sj > mx {
                mx = sj;
            }
            jj += 1;
        }
        // Everyone has the maximum before the scores become weights.
        sync_cube();
        if tid < n_here {
            weights[tid] = f32::exp(s - mx);
        }
        sync_cube();
        let corr = f32::exp(m - mx);
        let mut sum = 0.0f32;
        jj = 0;
        while jj < n_here {
            sum += weights[jj];
            jj += 1;
        }
        l = l * corr + sum;
        let mut e = tid;
        while e < d {
            let mut a = acc[e] * corr;
            jj = 0;
            while jj < n_here {
                a += weights[jj] * kv_value(v_arena, bases[jj] as usize, e, f16);
                jj += 1;
            }
            acc[e] = a;
            e += t;
        }
        m = mx;
        // Nobody overwrites the weights until everyone has used them.
        sync_cube();
        t0 += t;
    }
    let mut e = tid;
    while e < d {
        out[qbase + e] = if l > 0.0f32 { acc[e] / l } else { 0.0f32 };
        e += t;
    }
}
