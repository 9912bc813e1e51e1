//! Sampling where the logits are. A step's plain rows (no penalty, bias, mask, top-k, top-p
//! or top logprobs: [`super::SequenceSampler::plain_pick`]) are sampled on the logits'
//! device, and only a token id and its logprob per row come back: on a GPU that is 8 bytes
//! instead of a row of f32 logits (600 KB at a 152k vocabulary).
//!
//! The CPU path is [`pick_row`] itself, the rows in parallel; the CUDA path is
//! `kernels/sample.cu`, which follows it (tests/cuda_ops.rs compares the two).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{pick_row, Pick};

/// One row to sample: its index among the logits' rows, and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowPick {
    pub row: usize,
    pub pick: Pick,
}

/// Samples each pick's row of `logits` (`[rows, vocab]` f32, contiguous) on the logits'
/// device. Returns `(token id, raw logprob)` per pick, in order. A pick whose row is outside
/// the logits, or logits of another shape or dtype, are an error before anything runs.
pub fn sample_rows(logits: &Tensor, picks: &[RowPick]) -> candle_core::Result<Vec<(u32, f32)>> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let out = logits.apply_op1_no_bwd(&SampleRows { picks })?;
    let words = out.flatten_all()?.to_vec1::<u32>()?;
    Ok(words.chunks_exact(2).map(|w| (w[0], f32::from_bits(w[1]))).collect())
}

struct SampleRows<'a> {
    picks: &'a [RowPick],
}

fn bail(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl SampleRows<'_> {
    /// The vocabulary and the logits' element range, once every pick's row is inside them.
    fn check(&self, l: &Layout) -> candle_core::Result<(usize, (usize, usize))> {
        let &[rows, vocab] = l.dims() else {
            return Err(bail(format!("sample_rows: logits must be [rows, vocab], got {:?}", l.dims())));
        };
        let Some(range) = l.contiguous_offsets() else {
            return Err(bail("sample_rows: logits must be contiguous".into()));
        };
        if vocab == 0 {
            return Err(bail("sample_rows: an empty vocabulary".into()));
        }
        if let Some(p) = self.picks.iter().find(|p| p.row >= rows) {
            return Err(bail(format!("sample_rows: row {} of logits with {rows} rows", p.row)));
        }
        Ok((vocab, range))
    }

    fn shape(&self) -> Shape {
        Shape::from_dims(&[self.picks.len(), 2])
    }
}

impl CustomOp1 for SampleRows<'_> {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let CpuStorage::F32(all) = s else {
            return Err(bail(format!("sample_rows: logits must be f32, got {:?}", s.dtype())));
        };
        let (vocab, (start, end)) = self.check(l)?;
        let logits = &all[start..end];
        let out: Vec<[u32; 2]> = self
            .picks
            .par_iter()
            .map(|p| {
                let (token, logprob) = pick_row(&logits[p.row * vocab..(p.row + 1) * vocab], &p.pick);
                [token, logprob.to_bits()]
            })
            .collect();
        Ok((CpuStorage::U32(out.into_flattened()), self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use ferrite_kernels::plan::pick_words;

        if s.dtype() != candle_core::DType::F32 {
            return Err(bail(format!("sample_rows: logits must be f32, got {:?}", s.dtype())));
        }
        let (vocab, (start, end)) = self.check(l)?;
        let mut words = Vec::with_capacity(self.picks.len() * ferrite_kernels::plan::PICK_WORDS);
        for p in self.picks {
            let row = u32::try_from(p.row).map_err(|_| bail(format!("sample_rows: row {}", p.row)))?;
            words.extend(pick_words(row, p.pick.inv_temperature, p.pick.min_p, p.pick.u));
        }
        let dev = s.device.clone();
        let picks = dev.clone_htod(&words)?;
        // SAFETY: the kernel writes both words of every pick.
        let mut out = unsafe { dev.alloc::<u32>(self.picks.len() * 2) }?;
        let logits = s.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: `check` verified every pick's row is below the logits' row count.
        unsafe { ferrite_kernels::launch::sample_rows(&dev, &logits, &picks, &mut out, vocab) }?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), self.shape()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn greedy() -> Pick {
        Pick { inv_temperature: 0.0, min_p: 0.0, u: 0.0 }
    }

    #[test]
    fn each_pick_samples_its_own_row_as_pick_row_does() {
        let (rows, vocab) = (5, 1000);
        let data: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 997) as f32 / 50.0 - 10.0).collect();
        let logits = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let picks = [
            RowPick { row: 3, pick: greedy() },
            RowPick { row: 0, pick: Pick { inv_temperature: 1.0, min_p: 0.0, u: 0.5 } },
            RowPick { row: 3, pick: Pick { inv_temperature: 2.0, min_p: 0.1, u: 0.99 } },
        ];
        let got = sample_rows(&logits, &picks).unwrap();
        for (p, g) in picks.iter().zip(&got) {
            let want = pick_row(&data[p.row * vocab..(p.row + 1) * vocab], &p.pick);
            assert_eq!(*g, want, "{p:?}");
        }
        // A view starting mid-tensor reads its own rows.
        let tail = logits.narrow(0, 2, 3).unwrap();
        let got = sample_rows(&tail, &[RowPick { row: 1, pick: greedy() }]).unwrap();
        assert_eq!(got[0], pick_row(&data[3 * vocab..4 * vocab], &greedy()));
    }

    #[test]
    fn bad_rows_shapes_and_dtypes_are_errors_naming_what_is_wrong() {
        let logits = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = sample_rows(&logits, &[RowPick { row: 2, pick: greedy() }]).unwrap_err();
        assert!(err.to_string().contains("row 2 of logits with 2 rows"), "{err}");
        let flat = logits.flatten_all().unwrap();
        let err = sample_rows(&flat, &[RowPick { row: 0, pick: greedy() }]).unwrap_err();
        assert!(err.to_string().contains("[rows, vocab]"), "{err}");
        let half = logits.to_dtype(candle_core::DType::BF16).unwrap();
        let err = sample_rows(&half, &[RowPick { row: 0, pick: greedy() }]).unwrap_err();
        assert!(err.to_string().contains("must be f32"), "{err}");
        let transposed = logits.t().unwrap();
        let err = sample_rows(&transposed, &[RowPick { row: 0, pick: greedy() }]).unwrap_err();
        assert!(err.to_string().contains("contiguous"), "{err}");
        assert!(sample_rows(&logits, &[]).unwrap().is_empty());
    }
}
