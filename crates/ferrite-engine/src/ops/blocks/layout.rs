//! How a panel holds a block-panel's values ([`Values`]) and the scales of its rows
//! ([`Scaling`]), and how a weight follows from them.

use super::formats::Row;
use super::{BLOCK, PANEL_ROWS, SUPER};

/// Where a block-panel puts the value of row j, column c: its index `n` among the 512 that
/// [`Values`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    /// Column by column (`n = 16c + j`): a column's 16 rows side by side, each x broadcast
    /// against them in f32 (the tiles in `blocks.rs` and `x86.rs`).
    Columns,
    /// In lanes of four columns (`n = 64 (c / 4) + 4j + c % 4`): 64 values hold columns
    /// `4g..4g + 4` of the 16 rows, row j's four in 32-bit lane j, the operand of a
    /// four-product int8 dot product per lane (`lanes.rs`). As nibbles, value n and
    /// n + 256 share a byte, so one 64-byte load gives columns `4g..4g + 4` and `16 + 4g..`.
    Lanes,
}

impl Order {
    pub(super) const fn index(self, c: usize, j: usize) -> usize {
        match self {
            Order::Columns => c * PANEL_ROWS + j,
            Order::Lanes => (c / 4) * 64 + 4 * j + c % 4,
        }
    }
}

/// How a block-panel (16 rows × 32 columns) holds its values, value n ([`Order`]) after value
/// n − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Values {
    /// 512 int8 values, value n at byte n.
    Int8,
    /// Values in `[-bias, 2^(4 + high) - bias)` biased by `bias`, at their file's size: the
    /// low four bits as nibbles in 256 bytes (byte n holds value n in its low nibble and value
    /// n + 256 in its high one), then `high` planes of 64 bytes, plane h holding bit 4 + h of
    /// value n at bit n. In [`Order::Columns`] AVX-512 tiles read them in place, and the
    /// others, and tiles of many tokens, unpack a block-panel to the int8 form first (the same
    /// products); in [`Order::Lanes`] the VNNI tiles read them in place, and AMX unpacks a
    /// panel to signed int8 first.
    Packed { high: u8, bias: u8 },
}

/// Q4_0's values: nibbles less 8.
pub(super) const Q4_0_VALUES: Values = Values::Packed { high: 0, bias: 8 };
/// Q5_0's: five bits less 16.
pub(super) const Q5_0_VALUES: Values = Values::Packed { high: 1, bias: 16 };
/// Q4_K's and Q5_K's: four and five bits as they are (their offset is in the scaling).
pub(super) const Q4_K_VALUES: Values = Values::Packed { high: 0, bias: 0 };
pub(super) const Q5_K_VALUES: Values = Values::Packed { high: 1, bias: 0 };
/// Q6_K's: six bits less 32.
pub(super) const Q6_K_VALUES: Values = Values::Packed { high: 2, bias: 32 };

/// Bytes of a block-panel's nibbles; each bit plane is a quarter of that.
pub(super) const NIBBLE_BYTES: usize = BLOCK * PANEL_ROWS / 2;
pub(super) const PLANE_BYTES: usize = BLOCK * PANEL_ROWS / 8;

impl Values {
    /// Bytes of one block-panel.
    pub(super) const fn block_bytes(self) -> usize {
        match self {
            Values::Int8 => BLOCK * PANEL_ROWS,
            Values::Packed { high, .. } => NIBBLE_BYTES + high as usize * PLANE_BYTES,
        }
    }

    /// Writes value `n` of the block-panel at `block`.
    pub(super) fn put(self, block: &mut [u8], n: usize, v: i8) {
        match self {
            Values::Int8 => block[n] = v as u8,
            Values::Packed { high, bias } => {
                let u = (i16::from(v) + i16::from(bias)) as u16;
                debug_assert!(u < 1 << (4 + high), "invariant: {v} fits {self:?}");
                let (byte, shift) = if n < NIBBLE_BYTES { (n, 0) } else { (n - NIBBLE_BYTES, 4) };
                block[byte] |= ((u & 0xF) as u8) << shift;
                for h in 0..usize::from(high) {
                    if (u >> (4 + h)) & 1 == 1 {
                        block[NIBBLE_BYTES + h * PLANE_BYTES + n / 8] |= 1 << (n % 8);
                    }
                }
            }
        }
    }

    /// The block-panel at `block` as its 512 int8 values, value n at n.
    pub(super) fn unpack(self, block: &[u8], out: &mut [i8; BLOCK * PANEL_ROWS]) {
        match self {
            Values::Int8 => {
                for (o, &b) in out.iter_mut().zip(block) {
                    *o = b as i8;
                }
            }
            Values::Packed { high, bias } => {
                for (n, o) in out.iter_mut().enumerate() {
                    let byte = block[n % NIBBLE_BYTES];
                    let mut u = if n < NIBBLE_BYTES { byte & 0xF } else { byte >> 4 };
                    for h in 0..usize::from(high) {
                        u |= ((block[NIBBLE_BYTES + h * PLANE_BYTES + n / 8] >> (n % 8)) & 1) << (4 + h);
                    }
                    *o = (i16::from(u) - i16::from(bias)) as i8;
                }
            }
        }
    }
}

/// How a row's weights follow from its values `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scaling {
    /// `d · q`, `d` an f16 per 32 columns (Q8_0, Q5_0, Q4_0).
    Block,
    /// `d · sc · q`, `d` an f16 per 256 columns and `sc` an int8 per 16 (Q6_K): a block-panel's
    /// two factor runs are columns 0–15's and 16–31's `sc`.
    Super16,
    /// `d · sc · q − dmin · m`, `d` and `dmin` f16s per 256 columns (two runs) and `sc` and `m`
    /// six-bit integers per 32 (a block-panel's two factor runs) (Q4_K, Q5_K).
    SuperMin,
}

impl Scaling {
    /// Block-panels under one run of `d`.
    pub(super) const fn group_blocks(self) -> usize {
        match self {
            Scaling::Block => 1,
            Scaling::Super16 | Scaling::SuperMin => SUPER / BLOCK,
        }
    }

    /// Runs of 16 f16 per group: `d`, and `dmin`.
    pub(super) const fn d_runs(self) -> usize {
        match self {
            Scaling::SuperMin => 2,
            Scaling::Block | Scaling::Super16 => 1,
        }
    }

    /// Runs of 16 factor bytes per block-panel.
    pub(super) const fn factor_runs(self) -> usize {
        match self {
            Scaling::Block => 0,
            Scaling::Super16 | Scaling::SuperMin => 2,
        }
    }

    /// Whether a tile closes its partial sums after the first 16 columns of a block as well as
    /// after all 32.
    pub(super) const fn per_16(self) -> bool {
        matches!(self, Scaling::Super16)
    }

    /// `d` run `i` of block-panel `b` of panel `panel`, for panels of `blocks` block-panels.
    pub(super) const fn d_index(self, blocks: usize, panel: usize, b: usize, i: usize) -> usize {
        let groups = blocks / self.group_blocks();
        ((panel * groups + b / self.group_blocks()) * self.d_runs() + i) * PANEL_ROWS
    }

    /// Factor run `i` of block-panel `b` of panel `panel`, for panels of `blocks` block-panels.
    pub(super) const fn factor_index(self, blocks: usize, panel: usize, b: usize, i: usize) -> usize {
        ((panel * blocks + b) * self.factor_runs() + i) * PANEL_ROWS
    }

    /// The weight of value `v` at column `c` of `row`, as candle's dequantization computes it
    /// (`d · q`, `(d · sc) · q`, `(d · sc) · q − dmin · m`).
    pub(super) fn weight(self, row: &Row, c: usize, v: i8) -> f32 {
        let (group, b) = (c / (BLOCK * self.group_blocks()), c / BLOCK);
        let d = row.d[group * self.d_runs()].to_f32();
        match self {
            Scaling::Block => d * f32::from(v),
            Scaling::Super16 => {
                let sc = row.factors[2 * b + (c % BLOCK) / (BLOCK / 2)] as i8;
                d * f32::from(sc) * f32::from(v)
            }
            Scaling::SuperMin => {
                let (sc, m) = (row.factors[2 * b], row.factors[2 * b + 1]);
                let dmin = row.d[group * 2 + 1].to_f32();
                d * f32::from(sc) * f32::from(v) - dmin * f32::from(m)
            }
        }
    }
}
