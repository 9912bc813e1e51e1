//! The cache write: each new K/V row of the step goes to its slot (`slot_mapping`), padding
//! rows ([`PAD_SLOT`]) nowhere; every slot is checked against the cache before anything is
//! written.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout};

use super::{bail, write_dtype_error, AttentionMetadata, PAD_SLOT};

pub(super) struct WriteSlots<'a> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) meta: &'a AttentionMetadata,
    pub(super) slot_mapping: &'a [u32],
}

/// Where a `write_kv` call reads and writes, checked before any copy.
pub(super) struct WriteDims {
    /// Elements of one slot: `num_kv_heads * head_dim`.
    pub(super) row_elems: usize,
    /// Element ranges of the cache and of the new K/V inside their storages.
    pub(super) cache: std::ops::Range<usize>,
    pub(super) src: std::ops::Range<usize>,
}

impl WriteSlots<'_> {
    /// Shapes, contiguity, and every slot inside the cache: a bad call is an error before
    /// anything is written (on the GPU, never an out-of-bounds write).
    pub(super) fn check(&self, cache_l: &Layout, src_l: &Layout) -> candle_core::Result<WriteDims> {
        let (num_blocks, block_size, kv_heads, head_dim) = cache_l.shape().dims4()?;
        let (t, src_heads, src_dim) = src_l.shape().dims3()?;
        if (src_heads, src_dim) != (kv_heads, head_dim) || t != self.slot_mapping.len() {
            return Err(bail(format!(
                "write_kv: new K/V {:?} do not fit cache {:?} with {} slots",
                src_l.shape(),
                cache_l.shape(),
                self.slot_mapping.len()
            )));
        }
        let (Some((c0, c1)), Some((s0, s1))) = (cache_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            return Err(bail("write_kv: cache and K/V must be contiguous".into()));
        };
        let num_slots = num_blocks * block_size;
        if let Some(slot) = self.slot_mapping.iter().find(|&&s| s != PAD_SLOT && s as usize >= num_slots) {
            return Err(bail(format!("write_kv: slot {slot} is outside the cache ({num_slots} slots)")));
        }
        Ok(WriteDims { row_elems: kv_heads * head_dim, cache: c0..c1, src: s0..s1 })
    }

    fn write<T: Copy>(
        &self,
        cache: &mut [T],
        cache_l: &Layout,
        src: &[T],
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let w = self.check(cache_l, src_l)?;
        let cache = &mut cache[w.cache];
        let src = &src[w.src];
        let row = w.row_elems;
        for (token, &slot) in self.slot_mapping.iter().enumerate().filter(|(_, &s)| s != PAD_SLOT) {
            let slot = slot as usize;
            cache[slot * row..(slot + 1) * row].copy_from_slice(&src[token * row..(token + 1) * row]);
        }
        Ok(())
    }
}

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "write-kv-slots"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => self.write(c, l1, s, l2),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => self.write(c, l1, s, l2),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => self.write(c, l1, s, l2),
            (c, s) => Err(write_dtype_error(c.dtype(), s.dtype())),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        self.cuda_write(s1, l1, s2, l2)
    }
}
