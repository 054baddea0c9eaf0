//! Reductions that must match PyTorch's CPU kernels to the bit.

/// `torch.Tensor.sum()` of a contiguous fp32 vector on the CPU, in
/// PyTorch's order of operations (aten/src/ATen/native/cpu/SumKernel.cpp,
/// `vectorized_inner_sum` → `row_sum` → `multi_row_sum`): the input is read
/// as vectors of `lanes` floats, summed in a
/// 4-level cascade of 4 interleaved accumulators, then the tail elements
/// and the lanes are added left to right. fp32 accumulation throughout.
///
/// PyTorch runs this serially below 32,768 elements (its reduction grain
/// size); above, it splits the range over its threads, so its own result
/// then depends on its thread count. This function is the serial order.
pub fn torch_sum_f32(v: &[f32], lanes: usize) -> f32 {
    let n = v.len();
    if n < lanes && lanes > 1 {
        // Too short for a vector: the same cascade over scalars
        // (`scalar_inner_sum` → `row_sum` with one-element "vectors").
        return torch_sum_f32(v, 1);
    }
    let nvec = n / lanes;
    let vec_at = |i: usize| &v[i * lanes..(i + 1) * lanes];
    let add = |acc: &mut [f32], x: &[f32]| {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += *b;
        }
    };

    // row_sum over `nvec` vectors with ilp_factor 4.
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size_ilp = nvec / ILP;
    // multi_row_sum: rows of ILP vectors, cascade over LEVELS levels.
    let level_power = std::cmp::max(4, ceil_log2(size_ilp) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![vec![0f32; lanes]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size_ilp {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], vec_at(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let prev = std::mem::replace(&mut acc[j - 1][k], vec![0f32; lanes]);
                add(&mut acc[j][k], &prev);
            }
            let mask = level_mask << (j as u32 * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size_ilp {
        for k in 0..ILP {
            add(&mut acc[0][k], vec_at(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let lvl = acc[j][k].clone();
            add(&mut acc[0][k], &lvl);
        }
    }
    let mut partial = acc[0].clone();
    for r in size_ilp * ILP..nvec {
        add(&mut partial[0], vec_at(r));
    }
    for k in 1..ILP {
        let p = partial[k].clone();
        add(&mut partial[0], &p);
    }
    // Scalar tail, then the lanes, left to right.
    let mut fin = 0f32;
    for &x in &v[nvec * lanes..] {
        fin += x;
    }
    for &x in &partial[0] {
        fin += x;
    }
    fin
}

/// `ceil(log2(x))` as c10's `CeilLog2` (0 for x ≤ 1).
fn ceil_log2(x: usize) -> u32 {
    if x <= 1 {
        0
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// Vector width of PyTorch's fp32 sum kernel as measured against torch 2.15
/// on an AVX-512 machine (8 lanes matched `Tensor.sum()` and `.mean()`
/// for every length tried from 1 to 32,767; 16 did not).
pub const TORCH_F32_LANES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_on_integers() {
        for n in [0usize, 1, 7, 16, 63, 64, 65, 300, 1000, 5000] {
            let v: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
            let want: f32 = (0..n).map(|i| (i % 13) as f32).sum();
            assert_eq!(torch_sum_f32(&v, 16), want, "{n}");
            assert_eq!(torch_sum_f32(&v, 8), want, "{n}");
        }
    }
}

#[inline(always)]
fn all_finite_body(v: &[f32]) -> bool {
    // Per lane, whether an element with an all-ones exponent (±∞, NaN)
    // was seen: a compare and an or per element, no early exit, so it
    // vectorizes (a scan with `position` did not, and was ~4% of a
    // training step of the default model, checking each linear's input).
    const EXP: u32 = 0x7f80_0000;
    let mut bad = [0u32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (b, x) in bad.iter_mut().zip(c) {
            *b |= ((x.to_bits() & EXP) == EXP) as u32;
        }
    }
    for (b, x) in bad.iter_mut().zip(chunks.remainder()) {
        *b |= ((x.to_bits() & EXP) == EXP) as u32;
    }
    bad.iter().fold(0, |a, &b| a | b) == 0
}

super::vexp::simd_dispatch! {
    /// Whether every element of `v` is finite (no NaN, no ±∞).
    pub fn all_finite(v: &[f32]) -> bool = all_finite_body
}

#[cfg(test)]
mod finite_tests {
    use super::all_finite;

    #[test]
    fn all_finite_finds_every_non_finite_value_anywhere() {
        for n in [0usize, 1, 7, 8, 9, 33, 1000] {
            let v: Vec<f32> = (0..n).map(|i| i as f32 * 3e35 - 3.0).collect();
            assert!(all_finite(&v), "n {n}");
            for at in [0, n / 2, n.saturating_sub(1)] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                    if n == 0 {
                        continue;
                    }
                    let mut w = v.clone();
                    w[at] = bad;
                    assert!(!all_finite(&w), "n {n}, {bad} at {at}");
                }
            }
        }
        assert!(all_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE, f32::from_bits(1), -0.0]));
    }
}
