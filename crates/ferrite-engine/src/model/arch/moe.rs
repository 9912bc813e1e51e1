//! A mixture of experts in place of a layer's MLP (Qwen3-MoE, Mixtral): a router scores every
//! expert for each token, the `top_k` most probable run on it, and their outputs are summed
//! weighted by those probabilities (renormalized to sum to 1 where the family does).
//!
//! The step's flat batch stays one pass: tokens are grouped by expert (each expert's rows in
//! token order), every expert with tokens runs one product over its rows, and the weighted
//! results are added back to their tokens in expert order, as transformers does. A token's
//! output does not depend on who else was routed with it: the CPU products give each row the
//! same sums whatever the rows beside it, and each token's contributions are added in a fixed
//! (expert) order.
//!
//! Routing is read on the host (one small `[tokens, num_experts]` copy per layer), so a routed
//! model's steps are not captured as CUDA graphs; a fused device-side MoE kernel is GPU work
//! still to do.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::layer::{linear, Mlp, MlpNames, MLP_NAMES};
use super::LinearWeights;
use crate::model::hf_config::{ExpertNames, ModelConfig, MoeConfig};
use crate::ops::linear::Linear;

/// Mixtral's expert projections: w1 the gate, w3 the up, w2 the down projection.
const MIXTRAL_NAMES: MlpNames = MlpNames { gate: "w1", up: "w3", down: "w2" };

pub struct MoeBlock {
    /// `[num_experts, hidden]`: the router's logits.
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    renormalize: bool,
}

/// The experts a token goes to, with their weights: `(expert, weight)`, most probable first.
type Route = Vec<(usize, f32)>;

impl MoeBlock {
    /// `vb` at the block (`mlp` or `block_sparse_moe`): the router is its `gate`, the experts
    /// `experts.N`.
    pub fn load(
        cfg: &ModelConfig,
        moe: &MoeConfig,
        vb: VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        let names = match moe.names {
            ExpertNames::Qwen => MLP_NAMES,
            ExpertNames::Mixtral => MIXTRAL_NAMES,
        };
        let experts = (0..moe.num_experts)
            .map(|e| Mlp::load_named(cfg, moe.expert_intermediate_size, names, vb.pp("experts").pp(e), dt))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            router: linear(cfg.hidden_size, moe.num_experts, false, vb.pp("gate"), dt)?,
            experts,
            top_k: moe.top_k,
            renormalize: moe.renormalize,
        })
    }

    pub fn num_bytes(&self) -> usize {
        self.router.num_bytes() + self.experts.iter().map(Mlp::num_bytes).sum::<usize>()
    }

    /// x: `[tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.router.forward(x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let routes: Vec<Route> = logits.iter().map(|l| self.route(l)).collect();
        if let [route] = routes.as_slice() {
            return self.forward_one(x, route);
        }
        // Rows grouped by expert, each expert's in token order: one product per expert.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (t, route) in routes.iter().enumerate() {
            for &(e, w) in route {
                rows[e].push(t as u32);
                weights[e].push(w);
            }
        }
        let device = x.device();
        let (mut all_rows, mut all_outputs) = (Vec::new(), Vec::new());
        for ((expert, rows), weights) in self.experts.iter().zip(&rows).zip(&weights) {
            if rows.is_empty() {
                continue;
            }
            let index = Tensor::new(rows.as_slice(), device)?;
            let out = expert.forward(&x.index_select(&index, 0)?)?;
            // transformers weighs in the router's f32 and adds in the model's dtype.
            let w = Tensor::new(weights.as_slice(), device)?.unsqueeze(1)?;
            all_outputs.push(out.to_dtype(DType::F32)?.broadcast_mul(&w)?.to_dtype(x.dtype())?);
            all_rows.extend_from_slice(rows);
        }
        // One scatter-add, its source rows in expert order: each token's contributions are
        // summed lowest expert first, onto zeros, as transformers' `index_add_` loop does.
        let out = x.zeros_like()?;
        if all_rows.is_empty() {
            return Ok(out);
        }
        let index = Tensor::new(all_rows.as_slice(), device)?;
        out.index_add(&index, &Tensor::cat(&all_outputs, 0)?, 0)
    }

    /// One token (a lone sequence's decode step): its experts' weighted outputs summed lowest
    /// expert first, as the scatter-add onto zeros would sum them (the same bits: `0 + a` is
    /// `a`), without the gathers and scatter a step of many tokens needs.
    fn forward_one(&self, x: &Tensor, route: &Route) -> candle_core::Result<Tensor> {
        let mut by_expert = route.clone();
        by_expert.sort_by_key(|&(e, _)| e);
        let mut sum: Option<Tensor> = None;
        for (e, w) in by_expert {
            let out = self.experts[e].forward(x)?;
            let w = Tensor::new(&[w], x.device())?.unsqueeze(1)?;
            let weighted = out.to_dtype(DType::F32)?.broadcast_mul(&w)?.to_dtype(x.dtype())?;
            sum = Some(match sum {
                Some(acc) => (acc + weighted)?,
                None => weighted,
            });
        }
        Ok(sum.expect("invariant: top_k is at least 1"))
    }

    /// The token's `top_k` experts by router probability (softmax of `logits`; ties to the
    /// lower expert), with their probabilities, divided by their sum where the family
    /// renormalizes.
    fn route(&self, logits: &[f32]) -> Route {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let mut route: Route = order[..self.top_k].iter().map(|&e| (e, exp[e] / total)).collect();
        if self.renormalize {
            let sum: f32 = route.iter().map(|&(_, p)| p).sum();
            route.iter_mut().for_each(|(_, p)| *p /= sum);
        }
        route
    }
}
