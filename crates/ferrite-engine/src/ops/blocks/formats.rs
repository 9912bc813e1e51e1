//! Each format's values and scales, read from its ggml blocks as llama.cpp lays them out
//! (`ggml-common.h`; the same structs candle's `k_quants` reads).

use half::f16;

use super::{BLOCK, SUPER};
use candle_core::quantized::GgmlDType;

/// One row of a matrix: its `k` values and the parts of its scales as
/// [`super::Scaling`] reads them: per group of columns its f16s (`d`, and `dmin`), per 32
/// columns its factors (none, `sc` of each 16, or `sc` and `m`).
pub(super) struct Row {
    pub values: Vec<i8>,
    pub d: Vec<f16>,
    pub factors: Vec<u8>,
}

/// The row whose blocks of `dtype` are `bytes` (Q8_0, Q5_0, Q4_0, Q4_K, Q5_K or Q6_K).
pub(super) fn row(dtype: GgmlDType, bytes: &[u8]) -> Row {
    let k = bytes.len() / dtype.type_size() * dtype.block_size();
    let mut row = Row { values: Vec::with_capacity(k), d: Vec::new(), factors: Vec::new() };
    for block in bytes.chunks_exact(dtype.type_size()) {
        match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q4_0 => {
                row.d.push(f16_at(block, 0));
                block_values(dtype, &block[2..], &mut row.values);
            }
            GgmlDType::Q4K | GgmlDType::Q5K => offset_block(dtype, block, &mut row),
            GgmlDType::Q6K => q6_k_block(block, &mut row),
            _ => unreachable!("invariant: only the formats BlockPanels takes come here"),
        }
    }
    row
}

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Appends the 32 values of a block of `dtype` (Q8_0, Q5_0 or Q4_0) from its bytes after the
/// f16 scale: Q8_0 32 int8; Q4_0 16 bytes, value c in the low nibble of byte c and value
/// 16 + c in its high one, less 8; Q5_0 a little-endian u32 of fifth bits (value c's at bit c)
/// before those nibbles, less 16.
fn block_values(dtype: GgmlDType, block: &[u8], out: &mut Vec<i8>) {
    match dtype {
        GgmlDType::Q8_0 => out.extend(block[..BLOCK].iter().map(|&b| b as i8)),
        GgmlDType::Q4_0 => {
            let nibbles = &block[..BLOCK / 2];
            out.extend(nibbles.iter().map(|&b| (b & 0xF) as i8 - 8));
            out.extend(nibbles.iter().map(|&b| (b >> 4) as i8 - 8));
        }
        _ => {
            let fifth = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            let nibbles = &block[4..4 + BLOCK / 2];
            let value = |c: usize, nibble: u8| (nibble | (((fifth >> c) & 1) as u8) << 4) as i8 - 16;
            out.extend(nibbles.iter().enumerate().map(|(c, &b)| value(c, b & 0xF)));
            out.extend(nibbles.iter().enumerate().map(|(c, &b)| value(BLOCK / 2 + c, b >> 4)));
        }
    }
}

/// A Q4_K (144 bytes) or Q5_K (176) super-block: f16 `d` and `dmin`, 12 bytes of eight
/// six-bit `sc` and `m` (`get_scale_min_k4`), Q5_K's 32 bytes of fifth bits, then 128 bytes
/// of nibbles: byte 32i + l holds value 64i + l in its low nibble and 64i + 32 + l in its
/// high one, with (Q5_K) bits 2i and 2i + 1 of fifth-bit byte l above them.
fn offset_block(dtype: GgmlDType, block: &[u8], row: &mut Row) {
    row.d.extend([f16_at(block, 0), f16_at(block, 2)]);
    let scales = &block[4..16];
    for j in 0..SUPER / BLOCK {
        let (sc, m) = if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            (
                (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
            )
        };
        row.factors.extend([sc, m]);
    }
    let (fifths, nibbles) = match dtype {
        GgmlDType::Q5K => (Some(&block[16..48]), &block[48..176]),
        _ => (None, &block[16..144]),
    };
    for (i, chunk) in nibbles.chunks_exact(BLOCK).enumerate() {
        for (upper, shift) in [(0, 0), (1, 4)] {
            row.values.extend(chunk.iter().enumerate().map(|(l, &b)| {
                let fifth = fifths.map_or(0, |f| (f[l] >> (2 * i + upper)) & 1);
                (((b >> shift) & 0xF) | fifth << 4) as i8
            }));
        }
    }
}

/// A Q6_K super-block (210 bytes): 128 bytes of low nibbles, 64 of high bit pairs, 16 int8
/// scales (one per 16 values), f16 `d`. Value `128h + 32a + l` (h < 2, a < 4, l < 32) has the
/// low (a < 2) or high nibble of low byte `64h + 32(a % 2) + l`, and bits 2a, 2a + 1 of high
/// byte `32h + l`, less 32.
fn q6_k_block(block: &[u8], row: &mut Row) {
    let (low, high, scales) = (&block[..128], &block[128..192], &block[192..208]);
    row.d.push(f16_at(block, 208));
    row.factors.extend_from_slice(scales);
    for h in 0..2 {
        for a in 0..4 {
            row.values.extend((0..BLOCK).map(|l| {
                let nibble = (low[64 * h + 32 * (a % 2) + l] >> (4 * (a / 2))) & 0xF;
                let pair = (high[32 * h + l] >> (2 * a)) & 3;
                (nibble | pair << 4) as i8 - 32
            }));
        }
    }
}
