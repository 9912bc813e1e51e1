//! Runs a step's flat batch through the model, eagerly or, on CUDA, by replaying a captured
//! graph of a decode step (`cuda_graph`), and samples it: plain rows where the logits are
//! (`sampler::device`), the rest, and the prompt rows being scored, on the host.

use std::borrow::Cow;

use candle_core::Tensor;

use crate::error::Result;
use crate::forward_input::{ForwardInput, HostInput};
use crate::kv_cache::KvCache;
use crate::model::arch::Model;
use crate::output::Outputs;
use crate::request::PromptLogprob;
use crate::sampler::device::{sample_rows, RowPick};
use crate::sampler::{sample_batch, score_token, SampleOutput};
use crate::sched::{Scheduler, SchedulerPlan, SeqId};

/// Batch sizes decode graphs are captured for, up to `max_num_seqs`: 1, 2, 4, then every
/// multiple of 8 (vLLM's capture sizes), and `max_num_seqs` itself. A step runs in the graph
/// of the smallest size that holds it, padded.
pub fn capture_sizes(max_num_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> =
        [1, 2, 4].into_iter().chain((8..).step_by(8)).take_while(|&s| s < max_num_seqs).collect();
    sizes.push(max_num_seqs.max(1));
    sizes.dedup();
    sizes
}

/// What one forward pass gave.
pub struct StepOutput {
    pub input: ForwardInput,
    /// `[rows, vocab]` f32, a row per `input.logits_indices` entry.
    pub logits: Tensor,
    /// `[rows, hidden]` f32, a row per `input.hidden_indices` entry, where it has any.
    pub hidden: Option<Tensor>,
}

/// What decode graphs did, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GraphStats {
    pub captures: usize,
    pub capture_secs: f64,
    pub replays: usize,
    pub evictions: usize,
}

/// The engine's forward pass and sampling: owns the decode graphs where there are any.
pub struct StepRunner {
    #[cfg(feature = "cuda")]
    graphs: Option<crate::cuda_graph::DecodeGraphs>,
    /// Where a GPU step's logits are copied, reused across steps (see `HostLogits`).
    logits_buf: Vec<f32>,
}

impl StepRunner {
    /// `cuda_graphs`: replay decode steps of up to `max_num_seqs` sequences from CUDA graphs
    /// when the model is on a GPU (ignored elsewhere).
    pub fn new(model: &dyn Model, cuda_graphs: bool, max_num_seqs: usize) -> Self {
        #[cfg(feature = "cuda")]
        {
            let graphs = (cuda_graphs && model.device().is_cuda())
                .then(|| crate::cuda_graph::DecodeGraphs::new(max_num_seqs));
            Self { graphs, logits_buf: Vec::new() }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, cuda_graphs, max_num_seqs);
            Self { logits_buf: Vec::new() }
        }
    }

    /// The step's input as the model read it (padded rows last, when a graph ran it), its
    /// logits, a row per entry of `host.logits_indices`, and the hidden states of
    /// `host.hidden_indices` where it has any (never in a graph: such a step is no decode).
    pub fn forward(
        &mut self,
        model: &dyn Model,
        kv: &mut KvCache,
        host: HostInput,
    ) -> candle_core::Result<StepOutput> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &mut self.graphs {
            if let Some((input, logits)) = graphs.forward(model, kv, &host)? {
                return Ok(StepOutput { input, logits, hidden: None });
            }
        }
        let input = host.upload(model.device())?;
        let (logits, hidden) = model.forward_with_hidden(&input, kv)?;
        Ok(StepOutput { input, logits, hidden })
    }

    /// Why decode graphs were turned off (a capture failed), if they were.
    pub fn graph_failure(&self) -> Option<&str> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            return graphs.failure();
        }
        None
    }

    pub fn graph_stats(&self) -> GraphStats {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            return graphs.stats();
        }
        GraphStats::default()
    }
}

/// The rows of a step that end a sequence's tokens, one per sampling sequence, in plan order.
struct SampleRows {
    ids: Vec<SeqId>,
    /// Each one's row of the logits.
    rows: Vec<usize>,
}

impl StepRunner {
    /// Samples every sequence of `plan` that reached its end (`samples`) from `logits` (a row
    /// per `input.logits_rows` entry), and scores the prompt rows of sequences that asked
    /// for prompt logprobs. Plain rows are sampled where the logits are (8 bytes per row come
    /// back from a GPU); the rest on the host.
    pub(crate) fn sample(
        &mut self,
        plan: &SchedulerPlan,
        input: &ForwardInput,
        logits: &Tensor,
        outputs: &mut Outputs,
        scheduler: &Scheduler,
    ) -> Result<Vec<(SeqId, SampleOutput)>> {
        let sampling: Vec<usize> =
            plan.seqs.iter().enumerate().filter(|(_, s)| s.samples).map(|(i, _)| i).collect();
        let scoring = input.all_logits.iter().any(|&a| a);
        let step = SampleRows {
            ids: sampling.iter().map(|&i| plan.seqs[i].seq_id).collect(),
            rows: sampling.iter().map(|&i| input.logits_rows[i].end - 1).collect(),
        };
        let vocab = logits.dim(candle_core::D::Minus1)?;
        let mut picks: Vec<(usize, RowPick)> = Vec::new();
        let mut on_host: Vec<usize> = Vec::new();
        for (k, (&id, &row)) in step.ids.iter().zip(&step.rows).enumerate() {
            match outputs.sampler_mut(id).plain_pick(vocab) {
                Some(pick) => picks.push((k, RowPick { row, pick })),
                None => on_host.push(k),
            }
        }
        let mut sampled: Vec<Option<SampleOutput>> = vec![None; step.ids.len()];
        let row_picks: Vec<RowPick> = picks.iter().map(|&(_, p)| p).collect();
        for (&(k, _), (token_id, logprob)) in picks.iter().zip(sample_rows(logits, &row_picks)?) {
            outputs.sampler_mut(step.ids[k]).accept(token_id);
            sampled[k] = Some(SampleOutput { token_id, logprob, top_logprobs: Vec::new() });
        }
        if scoring || !on_host.is_empty() {
            let ids: Vec<SeqId> = on_host.iter().map(|&k| step.ids[k]).collect();
            let rows: Vec<usize> = on_host.iter().map(|&k| step.rows[k]).collect();
            let host = SampleRows { ids, rows };
            let scores = scoring.then_some((plan, input, scheduler));
            for (&k, s) in on_host.iter().zip(self.sample_on_host(logits, &host, scores, outputs)?) {
                sampled[k] = Some(s);
            }
        }
        Ok(step
            .ids
            .into_iter()
            .zip(sampled.into_iter().map(|s| s.expect("invariant: every row sampled once")))
            .collect())
    }

    /// Samples `host`'s rows on the host, in that order, and, with `scores`, scores every
    /// prompt row of the step. A CPU's logits are read in place; from a GPU only the host rows
    /// are copied, unless prompts are scored.
    fn sample_on_host(
        &mut self,
        logits: &Tensor,
        host: &SampleRows,
        scores: Option<(&SchedulerPlan, &ForwardInput, &Scheduler)>,
        outputs: &mut Outputs,
    ) -> Result<Vec<SampleOutput>> {
        let vocab = logits.dim(candle_core::D::Minus1)?;
        let mut rows = host.rows.clone();
        let gathered;
        let source = if scores.is_some() || logits.device().is_cpu() {
            logits
        } else {
            let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let index = Tensor::from_vec(index, rows.len(), logits.device())?;
            gathered = logits.index_select(&index, 0)?;
            rows = (0..rows.len()).collect();
            &gathered
        };
        let mut buf = std::mem::take(&mut self.logits_buf);
        let on_host = HostLogits::of(source, &mut buf)?;
        let all = on_host.as_slice();
        if let Some((plan, input, scheduler)) = scores {
            score_prompts(plan, input, scheduler, outputs, all, vocab);
        }
        let mut sampled = Vec::new();
        if !rows.is_empty() {
            // Consecutive rows are read where they are; others are copied together first.
            let flat: Cow<[f32]> = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
                Cow::Borrowed(&all[rows[0] * vocab..(rows[rows.len() - 1] + 1) * vocab])
            } else {
                let mut flat = Vec::with_capacity(rows.len() * vocab);
                for &r in &rows {
                    flat.extend_from_slice(&all[r * vocab..(r + 1) * vocab]);
                }
                Cow::Owned(flat)
            };
            sampled = sample_batch(&flat, vocab, &mut outputs.samplers_mut(&host.ids));
        }
        drop(on_host);
        self.logits_buf = buf;
        Ok(sampled)
    }
}

/// Scores the prompt tokens of chunks computed with all their logits (`logits`: `[rows,
/// vocab]` row-major, one per token): row `j` predicts the token after it.
fn score_prompts(
    plan: &SchedulerPlan,
    input: &ForwardInput,
    scheduler: &Scheduler,
    outputs: &mut Outputs,
    logits: &[f32],
    vocab: usize,
) {
    for (i, planned) in plan.seqs.iter().enumerate() {
        if !input.all_logits[i] {
            continue; // only the last row: the chunk is past the prompt
        }
        let Some(scores) = outputs.prompt_scores_mut(planned.seq_id) else { continue };
        let Some(seq) = scheduler.get(planned.seq_id) else { continue };
        let (rows, chunk) = (&input.logits_rows[i], &input.attention.seqs()[i]);
        let first_pos = chunk.context_len - chunk.query_len;
        for (row, pos) in rows.clone().zip(first_pos..) {
            if pos + 1 >= seq.num_prompt_tokens {
                break;
            }
            let token_id = seq.token_ids[pos + 1];
            let (logprob, top_logprobs) =
                score_token(&logits[row * vocab..(row + 1) * vocab], token_id, scores.top);
            scores.entries[pos + 1] = Some(PromptLogprob { token_id, logprob: Some(logprob), top_logprobs });
        }
    }
}

/// A step's f32 logits on the host: the CPU tensor's own storage, read in place under its read
/// lock, or a copy in the engine's reused buffer (a GPU's logits: 39 MB a step for 64 rows of a
/// 152k vocabulary, so a fresh allocation would fault in every page of it every step).
enum HostLogits<'a> {
    InPlace(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Copied(&'a [f32]),
}

impl<'a> HostLogits<'a> {
    fn of(logits: &'a Tensor, buf: &'a mut Vec<f32>) -> candle_core::Result<Self> {
        if logits.dtype() == candle_core::DType::F32 && logits.is_contiguous() {
            let (storage, layout) = logits.storage_and_layout();
            let range = layout.start_offset()..layout.start_offset() + logits.elem_count();
            match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)) => {
                    return Ok(HostLogits::InPlace(storage, range));
                }
                #[cfg(feature = "cuda")]
                candle_core::Storage::Cuda(cuda) => {
                    copy_from_gpu(cuda, range, buf)?;
                    return Ok(HostLogits::Copied(&buf[..logits.elem_count()]));
                }
                _ => {}
            }
        }
        *buf = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(HostLogits::Copied(buf))
    }

    fn as_slice(&self) -> &[f32] {
        match self {
            HostLogits::InPlace(storage, range) => match &**storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[range.clone()],
                _ => unreachable!("HostLogits::of keeps only CPU f32 storage in place"),
            },
            HostLogits::Copied(v) => v,
        }
    }
}

/// Copies `range` of a GPU f32 buffer into the front of `buf`, which only grows: after the
/// first steps its pages are mapped, and the copy is the only cost.
#[cfg(feature = "cuda")]
fn copy_from_gpu(
    cuda: &candle_core::CudaStorage,
    range: std::ops::Range<usize>,
    buf: &mut Vec<f32>,
) -> candle_core::Result<()> {
    let n = range.len();
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    let src = cuda.as_cuda_slice::<f32>()?.slice(range);
    let stream = cuda.device.cuda_stream();
    stream.memcpy_dtoh(&src, &mut buf[..n]).map_err(candle_core::Error::wrap)?;
    // A copy to pageable memory returns when done; waiting on the stream makes it certain.
    stream.synchronize().map_err(candle_core::Error::wrap)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn capture_sizes_follow_vllm_and_end_at_the_batch_limit() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(3), vec![1, 2, 3]);
        assert_eq!(capture_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(capture_sizes(20), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(capture_sizes(32), vec![1, 2, 4, 8, 16, 24, 32]);
    }

    #[test]
    fn host_logits_read_cpu_storage_in_place_and_copy_other_layouts() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
        let rows = t.narrow(0, 1, 2).unwrap(); // contiguous, starting at element 6
        let mut buf = Vec::new();
        let h = HostLogits::of(&rows, &mut buf).unwrap();
        assert!(matches!(h, HostLogits::InPlace(..)));
        assert_eq!(h.as_slice(), (6..18).map(|x| x as f32).collect::<Vec<_>>());
        let transposed = t.t().unwrap(); // not contiguous: copied in logical order
        let mut buf = Vec::new();
        let h = HostLogits::of(&transposed, &mut buf).unwrap();
        assert!(matches!(h, HostLogits::Copied(_)));
        let want: Vec<f32> = (0..6).flat_map(|c| (0..4).map(move |r| (r * 6 + c) as f32)).collect();
        assert_eq!(h.as_slice(), want);
    }
}
