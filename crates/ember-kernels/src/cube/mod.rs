//! Ember's ops on burn's CubeCL backend, as CubeCL kernels compiled for whichever runtime a
//! tensor's device names (built and tested here: wgpu, on Vulkan).
//!
//! Quantized weights go to the device once, on first use or by [`QuantMatrix::upload`], and stay
//! there in their GGUF blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are read in
//! place by the matmul kernel. Every other type (F16, BF16, Q2_K, Q3_K, the IQ types, and the
//! group-quantized safetensors formats) is dequantized to f32 once, at upload.
//!
//! GPU float order differs from llama.cpp's, so this path is checked against the CPU kernels
//! within a tolerance (`tests/cube.rs`), not bit for bit.

mod blocks;
mod kernels;
pub(crate) mod kv;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeDevice;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use ember_quant::GgmlType;

pub(crate) use blocks::Layout;

use crate::paged::{Arenas, PagedAttention};
use crate::{EmberBackend, QuantMatrix, Storage};

/// A weight's bytes on one device, with the layout the matmul kernel reads them in: one buffer,
/// or several of consecutive rows where the weight is larger than the device's largest buffer.
#[derive(Clone)]
struct DeviceWeight {
    device: CubeDevice,
    layout: Layout,
    /// Bytes from one row's start to the next's.
    row_bytes: usize,
    parts: Vec<WeightPart>,
}

/// Rows `first_row..first_row + rows` of a weight in one device buffer.
#[derive(Clone)]
struct WeightPart {
    handle: Handle,
    /// Length of `handle` in 32-bit words.
    words: usize,
    first_row: usize,
    rows: usize,
}

/// The device copies of one [`QuantMatrix`]'s values, shared by its clones.
#[derive(Clone, Default)]
pub(crate) struct DeviceCopies(Arc<Mutex<Vec<DeviceWeight>>>);

impl std::fmt::Debug for DeviceCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "DeviceCopies({n})")
    }
}

/// The in-place layout of a ggml type, if the kernel reads it in place.
fn in_place_layout(ty: GgmlType) -> Option<Layout> {
    Some(match ty {
        GgmlType::F32 => Layout::F32,
        GgmlType::Q4_0 => Layout::Q4_0,
        GgmlType::Q4_1 => Layout::Q4_1,
        GgmlType::Q5_0 => Layout::Q5_0,
        GgmlType::Q5_1 => Layout::Q5_1,
        GgmlType::Q8_0 => Layout::Q8_0,
        GgmlType::Q4_K => Layout::Q4K,
        GgmlType::Q5_K => Layout::Q5K,
        GgmlType::Q6_K => Layout::Q6K,
        _ => return None,
    })
}

/// Bytes padded to whole 32-bit words (the kernels read `u32`s).
fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len().next_multiple_of(4));
    v.extend_from_slice(bytes);
    v.resize(bytes.len().next_multiple_of(4), 0);
    v
}

impl QuantMatrix {
    /// The layout this matrix takes on a GPU, its bytes per row there, and its bytes (split
    /// into buffers of whole rows, each padded to whole words, at upload).
    fn device_bytes(&self) -> (Layout, usize, Cow<'_, [u8]>) {
        match self.storage() {
            Storage::Ggml { ty, bytes } => match in_place_layout(ty) {
                Some(layout) => {
                    let row_bytes = self.cols() / ty.block_size() * ty.type_size();
                    (layout, row_bytes, Cow::Borrowed(bytes))
                }
                None => self.f32_bytes(),
            },
            Storage::Packed(_) => self.f32_bytes(),
        }
    }

    fn f32_bytes(&self) -> (Layout, usize, Cow<'_, [u8]>) {
        let values = self.dequantize_all();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        (Layout::F32, self.cols() * 4, Cow::Owned(bytes))
    }

    /// This matrix's copy on `client`'s device, uploaded now if it is not there yet.
    fn on_device(&self, client: &ComputeClient, device: &CubeDevice) -> DeviceWeight {
        let mut copies = self
            .device_copies
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = copies.iter().find(|c| &c.device == device) {
            return found.clone();
        }
        let max_buffer = client.properties().memory.max_page_size;
        let copy = self.upload_parts(client, device, max_buffer);
        copies.push(copy.clone());
        copy
    }

    /// Uploads the values in buffers of at most `max_buffer` bytes (the device's largest
    /// allocation), whole rows each.
    fn upload_parts(
        &self,
        client: &ComputeClient,
        device: &CubeDevice,
        max_buffer: u64,
    ) -> DeviceWeight {
        let (layout, row_bytes, bytes) = self.device_bytes();
        // Whole rows, with room for the padding to a 32-bit word; the kernels index bytes with
        // 32-bit arithmetic, so a part never passes 4 GiB either.
        let cap = usize::try_from(max_buffer.min(u32::MAX as u64))
            .unwrap_or(u32::MAX as usize)
            .saturating_sub(3);
        assert!(
            row_bytes <= cap,
            "one {}-value row of this weight takes {row_bytes} bytes on the device, more than \
             its largest buffer ({max_buffer} bytes)",
            self.cols()
        );
        let rows_per_part = (cap / row_bytes).clamp(1, self.rows().max(1));
        let mut parts = Vec::with_capacity(self.rows().div_ceil(rows_per_part));
        let mut first_row = 0;
        while first_row < self.rows() {
            let rows = rows_per_part.min(self.rows() - first_row);
            let part = padded(&bytes[first_row * row_bytes..(first_row + rows) * row_bytes]);
            parts.push(WeightPart {
                handle: client.create_from_slice(&part),
                words: part.len() / 4,
                first_row,
                rows,
            });
            first_row += rows;
        }
        DeviceWeight {
            device: device.clone(),
            layout,
            row_bytes,
            parts,
        }
    }

    /// Copies the values to `device` now, if it is a GPU device and they are not there yet (as
    /// a model's loader does for every weight, so that the first pass does not pay for it).
    /// Returns whether `device` is a GPU device. Without a call, a weight goes to a device on
    /// its first matmul there.
    pub fn upload(&self, device: &burn::tensor::Device) -> bool {
        match device.as_dispatch() {
            burn::backend::DispatchDevice::Cube(cube) => {
                self.on_device(&cube.client(), cube);
                true
            }
            _ => false,
        }
    }

    /// On how many GPU devices this matrix has a copy.
    pub fn device_copy_count(&self) -> usize {
        self.device_copies
            .0
            .lock()
            .map(|v| v.len())
            .unwrap_or_else(|poisoned| poisoned.into_inner().len())
    }
}

/// What a GPU device states about its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuMemoryLimits {
    /// The largest single buffer, in bytes: a weight larger than this is split across buffers
    /// of whole rows; a tensor (an activation, a pass's logits) must fit in one.
    pub max_buffer: u64,
    /// The memory the runtime says the device may be asked to hold, in bytes, where it says
    /// (cubecl 0.11 reads it from CUDA, from Metal's recommended working set, and from
    /// Vulkan's largest device-local heap with the `vulkan` feature; wgpu's portable path
    /// states none).
    pub capacity: Option<u64>,
}

/// The memory limits of `device`, or `None` for a device that is not a GPU.
pub fn gpu_memory_limits(device: &burn::tensor::Device) -> Option<GpuMemoryLimits> {
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => {
            let client = cube.client();
            let memory = &client.properties().memory;
            Some(GpuMemoryLimits {
                max_buffer: memory.max_page_size,
                capacity: memory.max_memory(),
            })
        }
        _ => None,
    }
}

/// `t`'s primitive, if it is a tensor on a cube device.
pub(crate) fn cube_tensor<const D: usize>(t: burn::tensor::Tensor<D>) -> Option<CubeTensor> {
    match t.into_dispatch().kind {
        burn::backend::DispatchTensorKind::Cube(t) => Some(t.float()),
        _ => None,
    }
}

/// The compute client of a cube device.
type ComputeClient = burn_cubecl::cubecl::client::Client;

/// A contiguous f32 copy of `x` (a no-op for the contiguous f32 tensors the models pass).
fn contiguous_f32(x: CubeTensor, op: &str) -> CubeTensor {
    assert_eq!(
        x.dtype,
        DType::F32,
        "{op}: Ember's Cube kernels take f32 tensors"
    );
    let x = into_contiguous(x);
    assert!(x.is_contiguous(), "{op}: a contiguous tensor");
    x
}

fn buffer(t: &CubeTensor) -> BufferArg {
    let n = t.meta.shape().num_elements();
    // SAFETY: `t` is contiguous, so its buffer holds exactly its `n` elements.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), n) }
}

fn empty_f32(client: &ComputeClient, device: &CubeDevice, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(client.clone(), device.clone(), shape, DType::F32)
}

/// The most cubes a dispatch may have along one dimension on every wgpu backend.
const MAX_CUBES: usize = 65535;

/// A grid of at least `n` cubes, as `(x, y)` with `x <= MAX_CUBES`; kernels index
/// `CUBE_POS_X + CUBE_POS_Y * CUBE_COUNT_X` and skip the overhang.
fn grid(n: usize) -> CubeCount {
    let y = n.div_ceil(MAX_CUBES).max(1);
    let x = n.div_ceil(y).max(1);
    CubeCount::Static(x as u32, y as u32, 1)
}

/// From this many activation rows a matmul dequantizes the weight (a tile of rows at a time)
/// and hands it to burn's tiled GEMM, instead of decoding every block once per row.
const GEMM_MIN_ROWS: usize = 8;
/// f32 values of weight dequantized per GEMM tile (64 MiB).
const GEMM_TILE_VALUES: usize = 16 << 20;

/// `x @ w^T` for many rows: each tile of weight rows dequantized on the device, then burn's
/// matmul; tiles stay inside one of the weight's buffers.
fn dequantized_gemm(x: CubeTensor, dw: &DeviceWeight, k: usize, tile_values: usize) -> CubeTensor {
    type B = burn_cubecl::CubeBackend;
    let tile = (tile_values / k).max(1);
    let mut outs = Vec::new();
    for part in &dw.parts {
        let mut first = 0;
        while first < part.rows {
            let rows = tile.min(part.rows - first);
            let w = empty_f32(&x.client, &x.device, Shape::new([rows, k]));
            let chunks = rows * (k / 32);
            let threads = 256u32;
            // SAFETY: thread `g < rows * k / 32` decodes chunk `g` of rows `first..first + rows`
            // of this part (inside its `part.words` words) into its 32 values of `w`
            // (`rows * k`).
            unsafe {
                kernels::dequantize_rows::launch_unchecked(
                    &x.client,
                    grid(chunks.div_ceil(threads as usize)),
                    CubeDim::new_1d(threads),
                    BufferArg::from_raw_parts(part.handle.clone(), part.words),
                    buffer(&w),
                    first,
                    rows,
                    k,
                    dw.row_bytes,
                    dw.layout.code(),
                    dw.layout.block_bytes(),
                    dw.layout.chunks_per_block(),
                );
            }
            outs.push(B::float_matmul(x.clone(), B::float_transpose(w)));
            first += rows;
        }
    }
    if outs.len() == 1 {
        outs.remove(0)
    } else {
        B::float_cat(outs, 1)
    }
}

/// `x @ w^T` (`x: [m, k]`, `w: [n, k]` on the device): one cube per weight row for a few
/// activation rows, the dequantize-then-GEMM path from [`GEMM_MIN_ROWS`].
fn matmul_on_device(x: CubeTensor, dw: &DeviceWeight, n: usize, k: usize) -> CubeTensor {
    let m = x.meta.shape()[0];
    if m >= GEMM_MIN_ROWS {
        return dequantized_gemm(x, dw, k, GEMM_TILE_VALUES);
    }
    let out = empty_f32(&x.client, &x.device, Shape::new([m, n]));
    for part in &dw.parts {
        // SAFETY: the kernel reads `part.words` words of the weight (its rows * row_bytes
        // bytes, padded), `m * k` values of `x`, and writes columns `part.first_row..` (`+
        // part.rows <= n`) of the `m` rows of `out` (`m * n` values); rows past `part.rows`
        // are skipped.
        unsafe {
            kernels::quant_matmul::launch_unchecked(
                &x.client,
                grid(part.rows),
                CubeDim::new_1d(ROW_THREADS),
                BufferArg::from_raw_parts(part.handle.clone(), part.words),
                buffer(&x),
                buffer(&out),
                part.rows,
                n,
                part.first_row,
                k,
                m,
                dw.row_bytes,
                dw.layout.code(),
                dw.layout.block_bytes(),
                dw.layout.chunks_per_block(),
                ROW_THREADS,
            );
        }
    }
    out
}

/// The element-wise kernels of two same-shaped tensors.
enum Elementwise {
    Swiglu,
    Geglu,
    Add,
}

fn elementwise(a: CubeTensor, b: CubeTensor, op: &str, which: Elementwise) -> CubeTensor {
    let (a, b) = (contiguous_f32(a, op), contiguous_f32(b, op));
    let dims = a.meta.shape().clone();
    assert_eq!(&dims, b.meta.shape(), "{op}: shapes must match");
    let n = dims.num_elements();
    let out = empty_f32(&a.client, &a.device, dims);
    if n == 0 {
        return out;
    }
    let (client, count, dim) = (&a.client, grid(n.div_ceil(256)), CubeDim::new_1d(256));
    // SAFETY: thread `i < n` reads `a[i]`, `b[i]` and writes `out[i]`, all `n` long.
    unsafe {
        match which {
            Elementwise::Swiglu => kernels::swiglu::launch_unchecked(
                client,
                count,
                dim,
                buffer(&a),
                buffer(&b),
                buffer(&out),
                n,
            ),
            Elementwise::Geglu => kernels::geglu::launch_unchecked(
                client,
                count,
                dim,
                buffer(&a),
                buffer(&b),
                buffer(&out),
                n,
            ),
            Elementwise::Add => kernels::add::launch_unchecked(
                client,
                count,
                dim,
                buffer(&a),
                buffer(&b),
                buffer(&out),
                n,
            ),
        }
    }
    out
}

/// Threads per cube of the row-reduction kernels.
const ROW_THREADS: u32 = 64;
// The kernels' tree sums halve the cube.
const _: () = assert!(ROW_THREADS.is_power_of_two());

impl EmberBackend for burn_cubecl::CubeBackend {
    fn quant_matmul(x: CubeTensor, w: Arc<QuantMatrix>) -> CubeTensor {
        let x = contiguous_f32(x, "quant_matmul");
        let dims = x.meta.shape().clone();
        let (m, k) = (dims[0], dims[1]);
        assert_eq!(
            k,
            w.cols(),
            "quant_matmul: input width must equal the weight's columns"
        );
        let n = w.rows();
        if m == 0 || n == 0 {
            return empty_f32(&x.client, &x.device, Shape::new([m, n]));
        }
        if k == 0 || !k.is_multiple_of(32) {
            // The kernels read whole 32-value chunks; only F32/F16/BF16 rows can be other
            // widths (or empty). Such a matrix takes the generic path (dequantized per call).
            return crate::quant_matmul_fallback::<Self>(x, &w);
        }
        let dw = w.on_device(&x.client, &x.device);
        matmul_on_device(x, &dw, n, k)
    }

    /// On a store whose arenas are on this device, the flash-attention kernel over them;
    /// on a host store, the generic path (each sequence's keys gathered and uploaded).
    fn paged_attention(q: CubeTensor, attn: PagedAttention) -> CubeTensor {
        let shape = q.meta.shape().clone();
        attn.validate(shape[0], shape[1], shape[2])
            .unwrap_or_else(|e| panic!("paged_attention: {e}"));
        match &attn.store.arenas {
            Arenas::Device(arenas) => {
                assert!(
                    arenas.is_on(&q.device),
                    "paged_attention: q is not on the device holding the layer's K and V"
                );
                kv::attention(q, &attn, arenas)
            }
            _ => crate::paged_attention_fallback::<Self>(q, &attn),
        }
    }

    fn rope(
        x: CubeTensor,
        positions: Arc<[u32]>,
        rope_dim: usize,
        base: f32,
        scaling: crate::ops::RopeScaling,
        neox: bool,
    ) -> CubeTensor {
        let x = contiguous_f32(x, "rope");
        let dims = x.meta.shape().clone();
        let (rows, heads, d) = (dims[0], dims[1], dims[2]);
        let n = rows * heads * d;
        let out = empty_f32(&x.client, &x.device, dims);
        if n == 0 || rope_dim == 0 {
            return if n == 0 { out } else { x };
        }
        let (cos, sin) = crate::ops::rope_angles(&positions, rope_dim, base, &scaling);
        let upload = |v: &[f32]| {
            let handle = x.client.create_from_slice(bytemuck::cast_slice(v));
            // SAFETY: the buffer holds `v.len()` f32 values (`rows * rope_dim / 2`).
            unsafe { BufferArg::from_raw_parts(handle, v.len()) }
        };
        let threads = 256u32;
        // SAFETY: thread `g < n` reads values of its own head in `x` (`n` values) and its
        // row's angles (`rows * rope_dim / 2`, `rope_dim <= d` checked by the caller), and
        // writes `out[g]`.
        unsafe {
            kernels::rope::launch_unchecked(
                &x.client,
                grid(n.div_ceil(threads as usize)),
                CubeDim::new_1d(threads),
                buffer(&x),
                upload(&cos),
                upload(&sin),
                buffer(&out),
                n,
                heads,
                d,
                rope_dim,
                neox,
            );
        }
        out
    }

    fn swiglu(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        elementwise(gate, up, "swiglu", Elementwise::Swiglu)
    }

    fn geglu(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        elementwise(gate, up, "geglu", Elementwise::Geglu)
    }

    fn residual_add(a: CubeTensor, b: CubeTensor) -> CubeTensor {
        elementwise(a, b, "residual_add", Elementwise::Add)
    }

    fn round_to_f16(x: CubeTensor) -> CubeTensor {
        let x = contiguous_f32(x, "round_to_f16");
        let n = x.meta.shape().num_elements();
        let out = empty_f32(&x.client, &x.device, x.meta.shape().clone());
        if n == 0 {
            return out;
        }
        let threads = 256u32;
        // SAFETY: each thread below `n` reads one value of `x` and writes one of `out`.
        unsafe {
            kernels::round_to_f16::launch_unchecked(
                &x.client,
                grid(n.div_ceil(threads as usize)),
                CubeDim::new_1d(threads),
                buffer(&x),
                buffer(&out),
                n,
            );
        }
        out
    }

    fn rms_norm(x: CubeTensor, weight: CubeTensor, eps: f32) -> CubeTensor {
        let x = contiguous_f32(x, "rms_norm");
        let weight = contiguous_f32(weight, "rms_norm");
        let dims = x.meta.shape().clone();
        let (rows, d) = (dims[0], dims[1]);
        let out = empty_f32(&x.client, &x.device, dims);
        if rows == 0 || d == 0 {
            return out;
        }
        // SAFETY: cube `r` (below `rows`) reads row `r` of `x` (`d` values), the `d` weights,
        // and writes row `r` of `out`.
        unsafe {
            kernels::rms_norm::launch_unchecked(
                &x.client,
                grid(rows),
                CubeDim::new_1d(ROW_THREADS),
                buffer(&x),
                buffer(&weight),
                buffer(&out),
                rows,
                d,
                eps,
                ROW_THREADS,
            );
        }
        out
    }
}

// The tests start wgpu devices (`Device::wgpu` exists with burn's `wgpu` feature only).
#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use burn::backend::DispatchDevice;
    use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

    /// The accounting the loader does before uploading ([`crate::gpu_matrix_bytes`]) names
    /// exactly the types the kernels read in place, and the bytes an upload holds.
    #[test]
    fn accounting_matches_uploads() {
        for &ty in ember_quant::ALL_TYPES {
            assert_eq!(
                in_place_layout(ty).is_some(),
                crate::GPU_IN_PLACE_TYPES.contains(&ty),
                "{ty}"
            );
        }
        for ty in [GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F32, GgmlType::F16] {
            let (rows, cols) = (3, 256);
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| (i % 17) as f32 / 8.0 - 1.0)
                .collect();
            let m = QuantMatrix::quantize(ty, rows, cols, &w).expect("quantize");
            // One buffer: the bytes padded to a whole word.
            let (_, _, bytes) = m.device_bytes();
            let padded = bytes.len().next_multiple_of(4);
            assert_eq!(padded, m.device_size(), "{ty}");
            assert_eq!(
                crate::gpu_matrix_bytes(ty, rows as u64, cols as u64),
                Some(padded as u64),
                "{ty}"
            );
        }
    }

    /// A weight split across buffers (a device whose largest buffer is smaller than the
    /// weight) gives what one buffer gives, on both paths: bit for bit one cube per row, and
    /// within float order on the GEMM path.
    #[test]
    fn weights_split_across_buffers_join_up() {
        let Some(device) = wgpu_device() else { return };
        let DispatchDevice::Cube(cube) = device.as_dispatch() else {
            unreachable!("a wgpu device is a cube device")
        };
        let client = cube.client();
        let (n, k) = (11, 256);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 251) as f32 / 125.0 - 1.0)
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F16] {
            let qm = QuantMatrix::quantize(ty, n, k, &w).expect("quantize");
            let whole = qm.upload_parts(&client, cube, u64::MAX);
            // Three rows a buffer, so 4 parts, the last one of 2 rows. Q6_K's 210-byte rows
            // make parts whose bytes are not whole words (each part padded on its own).
            let split = qm.upload_parts(&client, cube, 3 * whole.row_bytes as u64 + 3);
            assert_eq!(whole.parts.len(), 1);
            assert_eq!(split.parts.len(), 4, "{ty}");
            assert_eq!(split.parts[3].rows, 2);
            for m in [1, 9] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 104_729) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                let run = |dw: &DeviceWeight| {
                    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
                    let xt = match xt.into_dispatch().kind {
                        burn::backend::DispatchTensorKind::Cube(t) => t.float(),
                        _ => unreachable!("a tensor on a wgpu device is a cube tensor"),
                    };
                    let out = matmul_on_device(xt, dw, n, k);
                    let data = burn_cubecl::ops::into_data_sync(out);
                    data.try_to_vec::<f32>().expect("f32")
                };
                let (a, b) = (run(&whole), run(&split));
                assert_eq!(a.len(), m * n);
                for (a, b) in a.iter().zip(&b) {
                    if m == 1 {
                        assert_eq!(a.to_bits(), b.to_bits(), "{ty}: {a} vs {b}");
                    } else {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{ty}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// Through Vulkan (SPIR-V), cubecl reads the device's largest device-local heap: the
    /// capacity the loader checks a model against when no limit is given.
    #[cfg(feature = "vulkan")]
    #[test]
    fn vulkan_states_its_memory() {
        let Some(device) = started(Device::vulkan(DeviceKind::DefaultDevice), "vulkan") else {
            return;
        };
        let limits = crate::gpu_memory_limits(&device).expect("a GPU device");
        println!("vulkan: {limits:?}");
        assert!(limits.max_buffer > 0);
        assert!(limits.capacity.is_some_and(|c| c >= limits.max_buffer));
    }

    fn wgpu_device() -> Option<Device> {
        started(Device::wgpu(DeviceKind::DefaultDevice), "wgpu")
    }

    /// `device` once a value made a round trip through it; `None` (saying so) where it cannot
    /// start.
    fn started(device: Device, name: &str) -> Option<Device> {
        let probe = device.clone();
        let up = std::panic::catch_unwind(move || {
            Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &probe)
                .into_data()
                .try_to_vec::<f32>()
                .is_ok()
        });
        if up.ok() != Some(true) {
            println!("skipped: no {name} device");
            return None;
        }
        Some(device)
    }

    /// The GEMM path in several weight tiles (the last one partial) gives what one tile gives.
    #[test]
    fn gemm_tiles_join_up() {
        let Some(device) = wgpu_device() else { return };
        let (n, k, m) = (10, 256, 9);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 251) as f32 / 125.0 - 1.0)
            .collect();
        let qm = QuantMatrix::quantize(GgmlType::Q4_K, n, k, &w).expect("quantize");
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104_729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let run = |tile_values: usize| {
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
            let DispatchDevice::Cube(cube) = device.as_dispatch() else {
                unreachable!("a wgpu device is a cube device")
            };
            let dw = qm.on_device(&cube.client(), cube);
            let xt = match xt.into_dispatch().kind {
                burn::backend::DispatchTensorKind::Cube(t) => t.float(),
                _ => unreachable!("a tensor on a wgpu device is a cube tensor"),
            };
            let out = dequantized_gemm(xt, &dw, k, tile_values);
            let data = burn_cubecl::ops::into_data_sync(out);
            data.try_to_vec::<f32>().expect("f32")
        };
        let whole = run(n * k);
        let tiled = run(3 * k);
        assert_eq!(whole.len(), m * n);
        for (a, b) in whole.iter().zip(&tiled) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
