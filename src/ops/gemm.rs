//! Matrix products on strided slices, backed by the `gemm` crate.

use crate::tensor::Float;

/// A read-only strided matrix view: `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    /// Backing storage.
    pub data: &'a [T],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [T], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }
}

/// Whether matrix products may use several threads (off when the caller already parallelises).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Threads {
    /// One thread.
    One,
    /// rayon's pool.
    Pool,
}

/// `c[m×n] (row-major) = a[m×k] · b[k×n]`, adding to `c` when `accumulate`.
// A BLAS-shaped signature: bundling the sizes into a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<T>,
    b: Mat<T>,
    c: &mut [T],
    accumulate: bool,
    threads: Threads,
) {
    matmul_ld(m, n, k, a, b, c, n, accumulate, threads)
}

/// [`matmul`] into an output with row stride `ldc` (≥ n): `c[i·ldc + j]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ld<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<T>,
    b: Mat<T>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    threads: Threads,
) {
    // SAFETY: `c` is initialised and its length is the bound.
    unsafe { matmul_raw(m, n, k, a, b, c.as_mut_ptr(), c.len(), ldc, accumulate, threads, None) }
}

/// Runs on a finished part of a product's output while it is still in cache: `(row, first
/// column, that row's segment of the part)`. A bias and an activation, for example.
pub type Epilogue<'e, T> = &'e (dyn Fn(usize, usize, &mut [T]) + Sync);

/// [`matmul_ld`] into raw memory of `c_len` elements, which may be uninitialised when not
/// `accumulate` (the product writes every element of the output block before anything reads
/// it), then `epi` on each part of the output as soon as it is computed. With an epilogue the
/// output is split into parts of about a megabyte, so that the epilogue reads what the product
/// has just written from cache instead of making another pass over memory.
///
/// # Safety
/// `c` must be valid for writes of `c_len` elements, not aliased during the call, and initialised
/// where `accumulate` reads it.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<T>,
    b: Mat<T>,
    c: *mut T,
    c_len: usize,
    ldc: usize,
    accumulate: bool,
    threads: Threads,
    epi: Option<Epilogue<'_, T>>,
) {
    assert!(ldc >= n, "matmul output row stride below its width");
    assert!(m == 0 || n == 0 || c_len >= (m - 1) * ldc + n, "matmul output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in 0..m {
            // SAFETY: within the bound asserted above; written before the slice is made.
            let seg = unsafe {
                if !accumulate {
                    (0..n).for_each(|j| c.add(row * ldc + j).write(T::zero()));
                }
                std::slice::from_raw_parts_mut(c.add(row * ldc), n)
            };
            if let Some(f) = epi {
                f(row, 0, seg);
            }
        }
        return;
    }
    let last_a = (m - 1) * a.rs + (k - 1) * a.cs;
    let last_b = (k - 1) * b.rs + (n - 1) * b.cs;
    assert!(last_a < a.data.len() && last_b < b.data.len(), "matmul operand too small");
    let parts = match threads {
        Threads::Pool if m * n * k >= 1 << 18 => rayon::current_num_threads().max(1),
        _ => 1,
    };
    // The gemm crate's own threading gains nothing on this machine (2 048³ runs at the same speed on 1 and
    // 2 threads, while two single-threaded products side by side each keep full speed), so split the
    // output into independent blocks here, each computed single-threaded.
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    // Blocks on 16-column / 8-row boundaries keep the kernels' vector tails out of the middle.
    let align = if split_rows { 8 } else { 16 };
    let parts = match epi {
        // Parts of ~256k elements, at least one per thread, and as many per thread: five parts
        // on two threads left one thread a part behind (EfficientNet-Lite0's 16→96 layer on
        // 112×112 ran 1.24× faster on two threads than on one).
        Some(_) => (m * n).div_ceil(1 << 18).div_ceil(parts).max(1) * parts,
        _ => parts,
    };
    let parts = parts.min(len.div_ceil(align)).max(1);
    let step = len.div_ceil(parts).div_ceil(align) * align;
    let cp = SendPtr(c);
    let block = |p: usize| {
        let lo = p * step;
        let hi = ((p + 1) * step).min(len);
        if lo >= hi {
            return;
        }
        let cp = &cp;
        let (mm, nn, a_off, b_off, c_off) =
            if split_rows { (hi - lo, n, lo * a.rs, 0, lo * ldc) } else { (m, hi - lo, 0, lo * b.cs, lo) };
        // SAFETY: the asserts above bound every index of the full product; each block writes a
        // disjoint set of `c`'s elements (its rows or its columns) and reads `a` and `b` only.
        unsafe {
            gemm::gemm(
                mm,
                nn,
                k,
                cp.0.add(c_off),
                1,
                ldc as isize,
                accumulate,
                a.data.as_ptr().add(a_off),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(b_off),
                b.cs as isize,
                b.rs as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if let Some(f) = epi {
            let (rows, cols) = if split_rows { (lo..hi, 0..n) } else { (0..m, lo..hi) };
            for row in rows {
                // SAFETY: this block's own elements (as above), now written by the product.
                let seg = unsafe { std::slice::from_raw_parts_mut(cp.0.add(row * ldc + cols.start), cols.len()) };
                f(row, cols.start, seg);
            }
        }
    };
    if parts == 1 || threads == Threads::One {
        (0..parts).for_each(block);
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(block);
    }
}

/// A raw output pointer shared by threads that write disjoint elements.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: used only for disjoint writes, see `matmul`.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat<f64>, b: Mat<f64>) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
            }
        }
        c
    }

    #[test]
    fn matmul_ld_writes_a_strided_block_only() {
        let (m, n, k, ldc) = (70, 300, 33, 520);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) * 0.5 - 2.0).collect();
        let want = naive(m, n, k, Mat::rows(&a, k), Mat::rows(&b, n));
        let mut c = vec![7.0; m * ldc];
        matmul_ld(m, n, k, Mat::rows(&a, k), Mat::rows(&b, n), &mut c, ldc, true, Threads::Pool);
        for i in 0..m {
            for j in 0..ldc {
                let expect = if j < n { want[i * n + j] + 7.0 } else { 7.0 };
                assert_eq!(c[i * ldc + j], expect, "({i}, {j})");
            }
        }
    }

    #[test]
    fn matmul_matches_naive_with_transposes() {
        // One-row products too (a dense layer at batch 1), some large enough to split.
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 1, 9), (1, 300, 257), (1, 20, 5000), (1, 37, 50)] {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
            let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) * 0.5 - 2.0).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let am = if ta { Mat::rows_t(&a, m) } else { Mat::rows(&a, k) };
                let bm = if tb { Mat::rows_t(&b, k) } else { Mat::rows(&b, n) };
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, am, bm, &mut c, false, Threads::Pool);
                assert_eq!(c, naive(m, n, k, am, bm));
                // Added onto an initial output.
                let mut c32 = vec![0.5f32; m * n];
                let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
                let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
                let am32 = Mat { data: &a32[..], rs: am.rs, cs: am.cs };
                let bm32 = Mat { data: &b32[..], rs: bm.rs, cs: bm.cs };
                matmul(m, n, k, am32, bm32, &mut c32, true, Threads::One);
                for (x, y) in c32.iter().zip(naive(m, n, k, am, bm)) {
                    assert!((*x as f64 - (y + 0.5)).abs() < 1e-3);
                }
            }
        }
    }
}
