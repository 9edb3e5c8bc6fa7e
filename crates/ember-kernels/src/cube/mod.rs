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

use crate::{EmberBackend, QuantMatrix, Storage};

/// A weight's bytes on one device, with the layout the matmul kernel reads them in.
#[derive(Clone)]
struct DeviceWeight {
    device: CubeDevice,
    handle: Handle,
    /// Length of `handle` in 32-bit words.
    words: usize,
    layout: Layout,
    /// Bytes from one row's start to the next's.
    row_bytes: usize,
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
    /// The layout this matrix takes on a GPU, and the bytes a device copy holds.
    fn device_bytes(&self) -> (Layout, usize, Vec<u8>) {
        match self.storage() {
            Storage::Ggml { ty, bytes } => match in_place_layout(ty) {
                Some(layout) => {
                    let row_bytes = self.cols() / ty.block_size() * ty.type_size();
                    (layout, row_bytes, padded(bytes))
                }
                None => self.f32_bytes(),
            },
            Storage::Packed(_) => self.f32_bytes(),
        }
    }

    fn f32_bytes(&self) -> (Layout, usize, Vec<u8>) {
        let values = self.dequantize_all();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        (Layout::F32, self.cols() * 4, bytes)
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
        let (layout, row_bytes, bytes) = self.device_bytes();
        // The kernels index bytes with 32-bit arithmetic.
        assert!(
            u32::try_from(bytes.len()).is_ok(),
            "a {}x{} weight takes {} bytes on the device, more than the 4 GiB its kernels address",
            self.rows(),
            self.cols(),
            bytes.len()
        );
        let handle = client.create_from_slice(&bytes);
        let copy = DeviceWeight {
            device: device.clone(),
            handle,
            words: bytes.len() / 4,
            layout,
            row_bytes,
        };
        copies.push(copy.clone());
        copy
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

    /// Bytes this matrix takes on a GPU ([`QuantMatrix::upload`]): its blocks where the kernels
    /// read them in place, else 4 per value.
    pub fn device_size(&self) -> usize {
        match self.storage() {
            Storage::Ggml { ty, bytes } if in_place_layout(ty).is_some() => {
                bytes.len().next_multiple_of(4)
            }
            _ => self.rows() * self.cols() * 4,
        }
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
/// matmul.
fn dequantized_gemm(
    x: CubeTensor,
    dw: &DeviceWeight,
    n: usize,
    k: usize,
    tile_values: usize,
) -> CubeTensor {
    type B = burn_cubecl::CubeBackend;
    let tile = (tile_values / k).clamp(1, n);
    let mut parts = Vec::with_capacity(n.div_ceil(tile));
    let mut first = 0;
    while first < n {
        let rows = tile.min(n - first);
        let w = empty_f32(&x.client, &x.device, Shape::new([rows, k]));
        let chunks = rows * (k / 32);
        let threads = 256u32;
        // SAFETY: thread `g < rows * k / 32` decodes chunk `g` of rows `first..first + rows`
        // (inside the weight's `dw.words` words) into its 32 values of `w` (`rows * k`).
        unsafe {
            kernels::dequantize_rows::launch_unchecked(
                &x.client,
                grid(chunks.div_ceil(threads as usize)),
                CubeDim::new_1d(threads),
                BufferArg::from_raw_parts(dw.handle.clone(), dw.words),
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
        parts.push(B::float_matmul(x.clone(), B::float_transpose(w)));
        first += rows;
    }
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        B::float_cat(parts, 1)
    }
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
        if !k.is_multiple_of(32) {
            // The kernels read whole 32-value chunks; only F32/F16/BF16 rows can be other
            // widths. Such a matrix takes the generic path (dequantized per call).
            return crate::quant_matmul_fallback::<Self>(x, &w);
        }
        let dw = w.on_device(&x.client, &x.device);
        if m >= GEMM_MIN_ROWS {
            return dequantized_gemm(x, &dw, n, k, GEMM_TILE_VALUES);
        }
        let out = empty_f32(&x.client, &x.device, Shape::new([m, n]));
        // SAFETY: the kernel reads `dw.words` words of the weight (rows * row_bytes bytes,
        // padded), `m * k` values of `x`, and writes `m * n` values of `out`, each index below
        // those bounds (rows past `n` are skipped).
        unsafe {
            kernels::quant_matmul::launch_unchecked(
                &x.client,
                grid(n),
                CubeDim::new_1d(ROW_THREADS),
                BufferArg::from_raw_parts(dw.handle.clone(), dw.words),
                buffer(&x),
                buffer(&out),
                n,
                k,
                m,
                dw.row_bytes,
                dw.layout.code(),
                dw.layout.block_bytes(),
                dw.layout.chunks_per_block(),
                ROW_THREADS,
            );
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::DispatchDevice;
    use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

    /// The GEMM path in several weight tiles (the last one partial) gives what one tile gives.
    #[test]
    fn gemm_tiles_join_up() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let probe = device.clone();
        let up = std::panic::catch_unwind(move || {
            Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &probe)
                .into_data()
                .try_to_vec::<f32>()
                .is_ok()
        });
        if up.ok() != Some(true) {
            println!("skipped: no wgpu device");
            return;
        }
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
            let out = dequantized_gemm(xt, &dw, n, k, tile_values);
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
