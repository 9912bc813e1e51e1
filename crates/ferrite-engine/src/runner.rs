//! Runs a step's flat batch through the model: eagerly, or, on CUDA, by replaying a captured
//! graph of a decode step (`cuda_graph`). Both give the engine the step's input and its logits.

use candle_core::Tensor;

use crate::forward_input::{ForwardInput, HostInput};
use crate::kv_cache::KvCache;
use crate::models::Model;

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

/// What decode graphs did, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GraphStats {
    pub captures: usize,
    pub capture_secs: f64,
    pub replays: usize,
    pub evictions: usize,
}

/// The engine's forward pass: owns the decode graphs where there are any.
pub struct StepRunner {
    #[cfg(feature = "cuda")]
    graphs: Option<crate::cuda_graph::DecodeGraphs>,
}

impl StepRunner {
    /// `cuda_graphs`: replay decode steps of up to `max_num_seqs` sequences from CUDA graphs
    /// when the model is on a GPU (ignored elsewhere).
    pub fn new(model: &dyn Model, cuda_graphs: bool, max_num_seqs: usize) -> Self {
        #[cfg(feature = "cuda")]
        {
            let graphs = (cuda_graphs && model.device().is_cuda())
                .then(|| crate::cuda_graph::DecodeGraphs::new(max_num_seqs));
            Self { graphs }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, cuda_graphs, max_num_seqs);
            Self {}
        }
    }

    /// The step's input as the model read it (padded rows last, when a graph ran it) and its
    /// logits, a row per entry of `host.logits_indices`.
    pub fn forward(
        &mut self,
        model: &dyn Model,
        kv: &mut KvCache,
        host: HostInput,
    ) -> candle_core::Result<(ForwardInput, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &mut self.graphs {
            if let Some(done) = graphs.forward(model, kv, &host)? {
                return Ok(done);
            }
        }
        let input = host.upload(model.device())?;
        let logits = model.forward(&input, kv)?;
        Ok((input, logits))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sizes_follow_vllm_and_end_at_the_batch_limit() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(3), vec![1, 2, 3]);
        assert_eq!(capture_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(capture_sizes(20), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(capture_sizes(32), vec![1, 2, 4, 8, 16, 24, 32]);
    }
}
