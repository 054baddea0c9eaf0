//! bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`),
//! used by double quantization to store the NF4 block scales in 8 bits.

/// The 256 values of `bitsandbytes.functional.create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)` as fp32 bit patterns, sorted
/// ascending, copied from bitsandbytes 0.50.2 with torch 2.15.0+cu132 (CPU capability
/// AVX512); they are also the `nested_quant_map` of every double-quantized
/// fixture. The construction is reproduced approximately by
/// [`approximate_signed_dynamic_map`] (the test checks it to 2 ulp): its
/// exact bits depend on how torch's vectorized `linspace` rounds, so the
/// table is authoritative.
static SIGNED_DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic map (see `SIGNED_DYNAMIC_MAP_BITS`).
pub fn signed_dynamic_map() -> [f32; 256] {
    SIGNED_DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The map's construction (bitsandbytes/functional.py): for i in 0..7,
/// `boundaries = torch.linspace(0.1, 1, 2**i + 1)` (fp32),
/// `means = (boundaries[:-1] + boundaries[1:]) / 2`, both `±10**(i-6) *
/// means`, then 0 and 1.0, sorted.
pub fn approximate_signed_dynamic_map() -> [f32; 256] {
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

/// Decision thresholds of bitsandbytes' CPU 8-bit blockwise quantizer with
/// the signed dynamic map: the code of a normalized value `z` is
/// `#{k : z >= THRESHOLDS[k]}`. bitsandbytes 0.50's native kernel maps
/// `t = (clamp(z, -1, 1) + 1) / 2` to `trunc(fma(t, 65535, 0.5))` and looks
/// the code up in a 65,536-entry table of midpoint comparisons; that grid
/// is coarse where the map is dense, so near 0 the result is not the
/// nearest entry (all of (0, 2.1e-5) maps to entry 131). The composition is
/// a monotone step function of `z`, fully described by its 255 steps. These thresholds were measured from bitsandbytes itself by
/// scripts/fixtures/probe_blockwise8.py (bisection over fp32 bit patterns,
/// then verified as an exact step function on 5·10^5 samples):
/// Measured with bitsandbytes 0.50.2, torch 2.15.0+cu132: 501025 samples verified
static BLOCKWISE8_SIGNED_THRESHOLD_BITS: [u32; 255] = [
    0xbf7c66fc, 0xbf78ccf8, 0xbf7532f5, 0xbf7198f1, 0xbf6e00ee, 0xbf6a66ea, 0xbf66cce6, 0xbf6332e3,
    0xbf5f98df, 0xbf5c00dc, 0xbf5866d8, 0xbf54ccd4, 0xbf5132d1, 0xbf4d98cd, 0xbf4a00ca, 0xbf4666c6,
    0xbf42ccc2, 0xbf3f32bf, 0xbf3b98bb, 0xbf3800b8, 0xbf3466b4, 0xbf30ccb1, 0xbf2d32ad, 0xbf2998a9,
    0xbf2600a6, 0xbf2266a2, 0xbf1ecc9f, 0xbf1b329b, 0xbf179a97, 0xbf140094, 0xbf106690, 0xbf0ccc8d,
    0xbf093289, 0xbf059a85, 0xbf020082, 0xbefcccfd, 0xbef598f6, 0xbeee64ee, 0xbee734e9, 0xbee000e1,
    0xbed8ccd9, 0xbed198d2, 0xbeca64ca, 0xbec334c5, 0xbebc00bd, 0xbeb4ccb5, 0xbead98ae, 0xbea664a6,
    0xbe9f34a1, 0xbe980099, 0xbe90cc91, 0xbe89988a, 0xbe826482, 0xbe7668fa, 0xbe6800ea, 0xbe5998da,
    0xbe4b30cd, 0xbe3cd0bd, 0xbe2e68b2, 0xbe2000a2, 0xbe119892, 0xbe033085, 0xbde9a0eb, 0xbdd290d4,
    0xbdc710cb, 0xbdc140c4, 0xbdbb80bb, 0xbdb5c0bb, 0xbdb000b4, 0xbdaa40ab, 0xbda480ab, 0xbd9eb0a4,
    0xbd98f09b, 0xbd933094, 0xbd8d7094, 0xbd87b08b, 0xbd81f084, 0xbd786108, 0xbd6cc0f7, 0xbd6140e8,
    0xbd55c0d7, 0xbd4a40d7, 0xbd3ec0c8, 0xbd3340b7, 0xbd27a0a8, 0xbd1c20a8, 0xbd10a097, 0xbd052088,
    0xbcf34110, 0xbcdc40ef, 0xbcc500d0, 0xbcae00af, 0xbc9700af, 0xbc800090, 0xbc5200df, 0xbc2d00df,
    0xbc1a80a0, 0xbc1180a0, 0xbc0800a0, 0xbbfe0140, 0xbbec0140, 0xbbd90140, 0xbbc70140, 0xbbb400bf,
    0xbba200bf, 0xbb8f00bf, 0xbb7a017f, 0xbb54017f, 0xbb30017f, 0xbb0c017f, 0xbacc0100, 0xba900100,
    0xba680200, 0xba480200, 0xba300200, 0xba100200, 0xb9e00400, 0xb9b00400, 0xb9600800, 0xb9000800,
    0xb8c01000, 0xb8801000, 0xb8002000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000,
    0xb3000000, 0xb3000000, 0xb3000000, 0x37ff8000, 0x387fc000, 0x38bfe000, 0x38ffe000, 0x395ff000,
    0x39aff800, 0x39dff800, 0x3a0ffc00, 0x3a2ffc00, 0x3a47fc00, 0x3a67fc00, 0x3a8ffe00, 0x3acbfe00,
    0x3b0bff00, 0x3b2fff00, 0x3b53ff00, 0x3b79ff00, 0x3b8f0081, 0x3ba20081, 0x3bb40081, 0x3bc70081,
    0x3bd90081, 0x3bec0081, 0x3bfe0081, 0x3c080041, 0x3c118041, 0x3c1a8041, 0x3c2d0041, 0x3c5200c0,
    0x3c800060, 0x3c970060, 0x3cae00a1, 0x3cc500a1, 0x3cdc40a1, 0x3cf340e0, 0x3d052070, 0x3d10a091,
    0x3d1c2091, 0x3d27a091, 0x3d3340b0, 0x3d3ec0b0, 0x3d4a40b0, 0x3d55c0d1, 0x3d6140d1, 0x3d6cc0d1,
    0x3d7860f0, 0x3d81f078, 0x3d87b078, 0x3d8d7089, 0x3d933089, 0x3d98f098, 0x3d9eb098, 0x3da48098,
    0x3daa40a9, 0x3db000a9, 0x3db5c0a9, 0x3dbb80b8, 0x3dc140b8, 0x3dc710b8, 0x3dd290c9, 0x3de9a0e9,
    0x3e03307c, 0x3e11988c, 0x3e20009c, 0x3e2e68ac, 0x3e3cd0bc, 0x3e4b30c5, 0x3e5998d5, 0x3e6800e5,
    0x3e7668f5, 0x3e826483, 0x3e899886, 0x3e90cc8e, 0x3e980096, 0x3e9f349e, 0x3ea664a6, 0x3ead98ab,
    0x3eb4ccb3, 0x3ebc00bb, 0x3ec334c3, 0x3eca64cb, 0x3ed198ce, 0x3ed8ccd6, 0x3ee000de, 0x3ee734e6,
    0x3eee64ee, 0x3ef598f3, 0x3efcccfb, 0x3f020082, 0x3f059a86, 0x3f09328a, 0x3f0ccc8b, 0x3f10668f,
    0x3f140093, 0x3f179a97, 0x3f1b329b, 0x3f1ecc9e, 0x3f2266a2, 0x3f2600a6, 0x3f2998aa, 0x3f2d32ae,
    0x3f30ccaf, 0x3f3466b3, 0x3f3800b7, 0x3f3b98bb, 0x3f3f32bf, 0x3f42ccc2, 0x3f4666c6, 0x3f4a00ca,
    0x3f4d98ce, 0x3f5132d2, 0x3f54ccd3, 0x3f5866d7, 0x3f5c00db, 0x3f5f98df, 0x3f6332e3, 0x3f66cce6,
    0x3f6a66ea, 0x3f6e00ee, 0x3f7198f2, 0x3f7532f6, 0x3f78ccf7, 0x3f7c66fb, 0x3f7f18ff,
];

/// The code bitsandbytes' CPU `quantize_blockwise` assigns to the
/// normalized value `z` with the signed dynamic map (see
/// `BLOCKWISE8_SIGNED_THRESHOLD_BITS`).
#[inline]
pub fn blockwise8_signed_code(z: f32) -> u8 {
    BLOCKWISE8_SIGNED_THRESHOLD_BITS.partition_point(|&t| f32::from_bits(t) <= z) as u8
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

    #[test]
    fn table_follows_the_construction() {
        let (t, a) = (signed_dynamic_map(), approximate_signed_dynamic_map());
        for i in 0..256 {
            let d = (t[i].to_bits() as i64 - a[i].to_bits() as i64).abs();
            assert!(d <= 2, "entry {i}: table {} vs construction {}", t[i], a[i]);
        }
    }
}
