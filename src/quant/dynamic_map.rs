//! bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`),
//! used by double quantization to store the NF4 block scales in 8 bits.

/// The 256 values of `bitsandbytes.functional.create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`, sorted ascending.
///
/// Construction (bitsandbytes/functional.py): for i in 0..7,
/// `boundaries = torch.linspace(0.1, 1, 2**i + 1)` (fp32),
/// `means = (boundaries[:-1] + boundaries[1:]) / 2`, and both
/// `±10**(i-6) * means` are added; then 0 and 1.0; sorted. The values are
/// computed in fp32 by torch; we reproduce that arithmetic here and the
/// fixtures (`tests/fixtures/nf4/*`, key `*.nested_quant_map`) pin the result.
pub fn signed_dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let b = torch_linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for k in 0..items - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the step is
/// computed in fp32, the first half counts up from `start`, the second half
/// down from `end` (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_of_the_map() {
        let m = signed_dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert!((m[0] + 0.99297).abs() < 1e-4, "{}", m[0]);
        assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    }
}
