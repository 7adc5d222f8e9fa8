//! CPU kernels for f32 products: `x W^T` and `a @ b` for any number of rows (inference
//! and the training products), the grouped SwiGLU experts of an MoE layer in one call, and
//! attention against the latent caches of a whole batch in one call.
//!
//! candle's general matmul packs the weight matrix on every call and sums each output in
//! an order that depends on the matrix sizes. These kernels read each weight row straight
//! from the tensor, multiply it with up to 4 rows at a time in register tiles ([`simd`]:
//! AVX-512, or AVX2 with FMA), each output one sum in a fixed order, and split the work
//! across threads by output tiles (products), by expert rows and columns (MoE) or by query
//! token and heads (attention). Without either instruction set they fall back to one dot
//! product per output, and callers use them only where that still wins, or where the
//! weights are stored narrower than f32: weight rows may be bf16 or f16 (widened as they
//! are read, [`simd::Stored`]), which candle's matmul cannot multiply with f32 inputs.

mod activations;
mod attention;
mod experts;
mod matmul;
mod simd;

pub use attention::{latent_attention, LatentSeq, RowParts};
pub use experts::{gather_rows, grouped_swiglu, scatter_add_rows, ExpertGroup};
pub use matmul::{
    heads_linear, linear, matmul, matmul_slices, matmul_storage, product, product_dims, RhsRows,
};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::{bf16, f16};

/// Without register tiles: most rows for which [`linear`] beats candle's gemm (measured on
/// the runtime benchmark's shapes), and most rows per expert for which [`grouped_swiglu`]
/// beats per-expert gemm calls. With them (AVX-512, or AVX2 with FMA) the kernels win at
/// every size (numbers in the README), so they take every product.
const DOT_LINEAR_ROWS: usize = 16;
const DOT_GROUPED_ROWS: usize = 128;

/// Whether `x` (and weights like it) can use these kernels.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether the products run in register tiles on this CPU (AVX-512, or AVX2 with FMA).
pub fn tiled() -> bool {
    simd::tiled()
}

/// Whether [`linear`] is the faster product for `rows` rows on this CPU.
pub fn linear_wins(rows: usize) -> bool {
    tiled() || rows <= DOT_LINEAR_ROWS
}

/// Whether the weight `w` may be a kernel's weight rows: on the CPU in f32, bf16 or f16.
pub fn holds_rows(w: &Tensor) -> bool {
    w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Whether `x [rows, k] @ w^T` runs in [`linear`]: where it is the faster product, and
/// always for a weight stored narrower than `x` (candle multiplies equal dtypes only).
pub fn takes_linear(x: &Tensor, w: &Tensor, rows: usize) -> bool {
    applies(x) && holds_rows(w) && (linear_wins(rows) || w.dtype() != DType::F32)
}

/// Whether [`grouped_swiglu`] is the faster expert product when no expert has more than
/// `largest` rows.
pub fn grouped_wins(largest: usize) -> bool {
    tiled() || largest <= DOT_GROUPED_ROWS
}

/// The `len` f32 values of a CPU storage from the start of `layout`.
fn cpu_f32<'a>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
    len: usize,
) -> Result<&'a [f32]> {
    match cpu_stored(storage, layout, len)? {
        StoredRows::F32(data) => Ok(data),
        _ => candle_core::bail!("cpu kernel: expected f32 values"),
    }
}

/// The values of a weight, in the dtype it is stored in.
#[derive(Clone, Copy)]
enum StoredRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Evaluates `$body` with `$s` bound to the typed slice of a [`StoredRows`] (one
/// instantiation of the generic kernels per stored dtype).
macro_rules! on_stored {
    ($rows:expr, |$s:ident| $body:expr) => {
        match $rows {
            $crate::model::cpu_kernels::StoredRows::F32($s) => $body,
            $crate::model::cpu_kernels::StoredRows::Bf16($s) => $body,
            $crate::model::cpu_kernels::StoredRows::F16($s) => $body,
        }
    };
}
use on_stored;

/// The `len` values of a CPU weight storage from the start of `layout`.
fn cpu_stored<'a>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
    len: usize,
) -> Result<StoredRows<'a>> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("cpu kernel on a non-CPU tensor")
    };
    let range = layout.start_offset()..layout.start_offset() + len;
    let short = || candle_core::Error::Msg("cpu kernel: storage shorter than its layout".into());
    Ok(match cpu {
        CpuStorage::F32(v) => StoredRows::F32(v.get(range).ok_or_else(short)?),
        CpuStorage::BF16(v) => StoredRows::Bf16(v.get(range).ok_or_else(short)?),
        CpuStorage::F16(v) => StoredRows::F16(v.get(range).ok_or_else(short)?),
        other => candle_core::bail!("cpu kernel: weights in {:?}", other.dtype()),
    })
}

/// Runs `f` on the contiguous values of the weight `t`, in its stored dtype.
fn with_stored<R>(t: &Tensor, f: impl FnOnce(StoredRows<'_>) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    Ok(f(cpu_stored(&storage, layout, t.elem_count())?))
}

/// Runs `f` on the contiguous f32 data of `t`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    Ok(f(cpu_f32(&storage, layout, t.elem_count())?))
}

/// An output buffer that parallel tasks fill at disjoint positions.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: every user writes a set of positions no other task touches, and the buffer
// outlives the parallel section (rayon joins it before the buffer is read).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The position `i` of the buffer (a method, so closures capture the whole wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Weight rows (output columns) per parallel task of the products: a block of the weight
/// stays in L2 while the rows of `x` pass over it.
const LINEAR_BLOCK: usize = 64;

/// The bits of every value of an f32 tensor (the kernel tests' identity check).
#[cfg(test)]
fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().and_then(|f| f.to_vec1::<f32>());
    v.expect("an f32 tensor")
        .iter()
        .map(|f| f.to_bits())
        .collect()
}

/// Largest absolute difference of two tensors (the kernel tests' measure).
#[cfg(test)]
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar())
        .unwrap_or(f32::INFINITY)
}
