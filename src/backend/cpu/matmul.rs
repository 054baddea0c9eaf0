//! Dense fp32 matrix products on the CPU, through the `gemm` crate.

use gemm::Parallelism;

/// A row-major matrix operand: `rows × cols` with row stride `ld`, read
/// transposed when `t` is set (then it is `cols × rows` as stored).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub t: bool,
}

impl<'a> Mat<'a> {
    /// The matrix as stored (row-major, leading dimension `ld`).
    pub fn n(data: &'a [f32], ld: usize) -> Self {
        Mat { data, ld, t: false }
    }
    /// The transpose of the stored row-major matrix with leading dim `ld`.
    pub fn t(data: &'a [f32], ld: usize) -> Self {
        Mat { data, ld, t: true }
    }
    /// (row stride, column stride) of the logical operand.
    fn strides(&self) -> (isize, isize) {
        if self.t { (1, self.ld as isize) } else { (self.ld as isize, 1) }
    }
}

/// `C[m×n] = beta·C + alpha·A[m×k]·B[k×n]` (beta ∈ {0, 1}: overwrite or
/// accumulate), `C` row-major with leading dimension `ldc`. fp32
/// accumulation; multithreaded on the current rayon pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(c: &mut [f32], ldc: usize, a: Mat<'_>, b: Mat<'_>, m: usize, n: usize, k: usize, alpha: f32, accumulate: bool, parallel: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // Bounds: the last element each operand touches must be in range.
    let last = |mat: &Mat<'_>, rows: usize, cols: usize| {
        let (rs, cs) = mat.strides();
        (rows - 1) as isize * rs + (cols - 1) as isize * cs
    };
    assert!((last(&a, m, k) as usize) < a.data.len(), "gemm: A out of bounds");
    assert!((last(&b, k, n) as usize) < b.data.len(), "gemm: B out of bounds");
    assert!((m - 1) * ldc + n <= c.len(), "gemm: C out of bounds");
    let (ars, acs) = a.strides();
    let (brs, bcs) = b.strides();
    let par = if parallel && m * n * k >= 1 << 15 { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: all three operands were bounds-checked above for the strides
    // passed; C does not alias A or B (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            acs,
            ars,
            b.data.as_ptr(),
            bcs,
            brs,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transpositions() {
        let (m, n, k) = (13, 7, 11);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(&a, &b, m, n, k, ta, tb);
            let am = if ta { Mat::t(&a, m) } else { Mat::n(&a, k) };
            let bm = if tb { Mat::t(&b, k) } else { Mat::n(&b, n) };
            let mut c = vec![1f32; m * n];
            gemm_f32(&mut c, n, am, bm, m, n, k, 2.0, true, false);
            for i in 0..m * n {
                assert!((c[i] - (1.0 + 2.0 * want[i])).abs() < 1e-4, "{ta} {tb} {i}");
            }
        }
    }
}
