//! The CUDA kernels of `write_kv` and `paged_attention` against their CPU reference, on random
//! batches: decode (long contexts split into partitions), prefill and chunked prefill, mixed
//! batches, GQA groups 1 to 8, block sizes 16 and 32, sliding windows, soft-capping, every
//! supported head_dim, f32/f16/bf16. And `sample_rows` (GPU sampling) against its CPU
//! reference, `pick_row`. And the fused layer ops (`qkv_rope`, `silu_mul`, `add_rms_norm`)
//! against their CPU references.
//!
//! Caches start filled with NaN on both devices, so a slot the kernels should not touch (or
//! read) shows: untouched slots must still be NaN and every output must be finite. Runs only
//! with `--features cuda` on a GPU machine; without a usable device every test fails loudly.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use ferrite_engine::ops::paged_attention::{
    paged_attention, write_kv, AttentionMetadata, AttentionParams, SeqAttention,
};
use ferrite_engine::sampler::device::{sample_rows, RowPick};
use ferrite_engine::sampler::Pick;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];
/// (sliding_window, softcap) combinations the cases rotate through.
const VARIANTS: [(Option<usize>, Option<f32>); 4] =
    [(None, None), (Some(1000), None), (None, Some(5.0)), (Some(700), Some(5.0))];

fn gpu() -> Device {
    match ferrite_engine::device::open_cuda(0) {
        Ok(dev) => dev,
        Err(e) => panic!("CUDA device 0 is unavailable, so the CUDA op tests cannot run: {e}"),
    }
}

/// One batch to compare: each sequence is `(context_len, query_len)`.
#[derive(Debug, Clone)]
struct Case {
    seqs: Vec<(usize, usize)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    sliding_window: Option<usize>,
    softcap: Option<f32>,
    dtype: DType,
}

impl Case {
    fn new(
        seqs: Vec<(usize, usize)>,
        group: usize,
        head_dim: usize,
        block_size: usize,
        dtype: DType,
    ) -> Self {
        Case {
            seqs,
            num_heads: 2 * group,
            num_kv_heads: 2,
            head_dim,
            block_size,
            sliding_window: None,
            softcap: None,
            dtype,
        }
    }

    fn with_variant(self, seed: usize) -> Self {
        let (sliding_window, softcap) = VARIANTS[seed % VARIANTS.len()];
        Case { sliding_window, softcap, ..self }
    }

    fn params(&self) -> AttentionParams {
        AttentionParams {
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window: self.sliding_window,
            softcap: self.softcap,
        }
    }
}

/// Inputs of one step, on the CPU: the cached prefix of every context and the step's new rows.
struct Batch {
    num_blocks: usize,
    prefix_slots: Vec<u32>,
    k_prefix: Tensor,
    v_prefix: Tensor,
    step: AttentionMetadata,
    q: Tensor,
    k_step: Tensor,
    v_step: Tensor,
}

fn random_tensor(rng: &mut StdRng, rows: usize, heads: usize, case: &Case, amplitude: f32) -> Tensor {
    let n = rows * heads * case.head_dim;
    let data: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amplitude).collect();
    let t = Tensor::from_vec(data, (rows, heads, case.head_dim), &Device::Cpu).expect("host tensor");
    t.to_dtype(case.dtype).expect("dtype conversion")
}

/// Shuffled block tables (odd sequences get one unused spare block at the end of their table),
/// random K/V for every context position and random queries (scaled so softmax is peaked).
fn build(case: &Case, rng: &mut StdRng) -> Batch {
    let bs = case.block_size;
    let needed: usize = case.seqs.iter().map(|(ctx, _)| ctx.div_ceil(bs)).sum();
    let num_blocks = needed + case.seqs.len() + 2;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let (mut used, mut spare) = (ids[..needed].iter(), ids[needed..].iter());
    let (mut prefix_slots, mut step_slots, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    let mut query_start = 0;
    for (i, &(context_len, query_len)) in case.seqs.iter().enumerate() {
        let mut block_table: Vec<u32> = used.by_ref().take(context_len.div_ceil(bs)).copied().collect();
        if i % 2 == 1 {
            block_table.extend(spare.next());
        }
        let slot = |pos: usize| block_table[pos / bs] * bs as u32 + (pos % bs) as u32;
        prefix_slots.extend((0..context_len - query_len).map(slot));
        step_slots.extend((context_len - query_len..context_len).map(slot));
        seqs.push(SeqAttention { query_start, query_len, context_len, block_table });
        query_start += query_len;
    }
    let (n_prefix, n_step) = (prefix_slots.len(), step_slots.len());
    Batch {
        num_blocks,
        k_prefix: random_tensor(rng, n_prefix, case.num_kv_heads, case, 1.0),
        v_prefix: random_tensor(rng, n_prefix, case.num_kv_heads, case, 1.0),
        prefix_slots,
        q: random_tensor(rng, n_step, case.num_heads, case, 6.0),
        k_step: random_tensor(rng, n_step, case.num_kv_heads, case, 1.0),
        v_step: random_tensor(rng, n_step, case.num_kv_heads, case, 1.0),
        step: AttentionMetadata::new(step_slots, seqs, bs),
    }
}

/// K and V caches of `num_blocks`, every element NaN.
fn poisoned_caches(num_blocks: usize, case: &Case, dev: &Device) -> (Tensor, Tensor) {
    let shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim);
    let n = num_blocks * case.block_size * case.num_kv_heads * case.head_dim;
    let make = || {
        Tensor::from_vec(vec![f32::NAN; n], shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(case.dtype))
            .and_then(|t| t.to_device(dev))
            .expect("poisoned cache")
    };
    (make(), make())
}

/// Leaves a freed NaN buffer of the output's size in the CUDA allocator's pool, which the op's
/// own output allocation (same size, same stream) normally reuses: an output element the
/// kernels never write then reads as NaN, in release builds too (debug builds poison always).
fn poison_next_output(case: &Case, num_tokens: usize, dev: &Device) {
    let n = num_tokens * case.num_heads * case.head_dim;
    let poison = Tensor::from_vec(vec![f32::NAN; n], n, &Device::Cpu)
        .and_then(|t| t.to_dtype(case.dtype))
        .and_then(|t| t.to_device(dev))
        .expect("poison buffer");
    drop(poison);
}

/// The step on one device: write the prefix, write the step's rows, attend.
fn forward(case: &Case, b: &Batch, dev: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (kc, vc) = poisoned_caches(b.num_blocks, case, dev);
    if !b.prefix_slots.is_empty() {
        let prefix = AttentionMetadata::new(b.prefix_slots.clone(), Vec::new(), case.block_size);
        write_kv(&b.k_prefix.to_device(dev)?, &b.v_prefix.to_device(dev)?, &kc, &vc, &prefix)?;
    }
    write_kv(&b.k_step.to_device(dev)?, &b.v_step.to_device(dev)?, &kc, &vc, &b.step)?;
    let q = b.q.to_device(dev)?;
    if dev.is_cuda() {
        poison_next_output(case, b.step.num_tokens(), dev);
    }
    let out = paged_attention(&q, &kc, &vc, &b.step, &case.params())?;
    Ok((out, kc, vc))
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    let t = t.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).expect("copy to host");
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("flatten")
}

/// Same bits where written, NaN where not, and exactly `written_elems` elements written.
fn assert_same_cache(gpu: &Tensor, cpu: &Tensor, written_elems: usize, what: &str) {
    let (g, c) = (host_f32(gpu), host_f32(cpu));
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!(a == b || (a.is_nan() && b.is_nan()), "{what}: element {i} is {a} on CUDA, {b} on CPU");
    }
    let written = g.iter().filter(|x| !x.is_nan()).count();
    assert_eq!(written, written_elems, "{what}: elements written (the rest must stay NaN)");
}

fn tolerance(dtype: DType) -> f32 {
    // Outputs are convex combinations of V in [-1, 1]: one rounding step of the storage type
    // at most (2^-11 for f16, 2^-8 for bf16), twice over to be safe.
    match dtype {
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
        _ => 1e-4,
    }
}

fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: output shape");
    let (g, w) = (host_f32(got), host_f32(want));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            a.is_finite(),
            "{what}: CUDA output element {i} is {a} (never written, or a NaN slot was read)"
        );
        if (a - b).abs() > worst {
            (worst, at) = ((a - b).abs(), i);
        }
    }
    let tol = tolerance(dtype);
    assert!(
        worst <= tol,
        "{what}: max |cuda - cpu| = {worst} at element {at} (cuda {}, cpu {}), tolerance {tol}",
        g[at],
        w[at]
    );
}

/// Runs the case on both devices and compares caches and outputs.
fn check(gpu: &Device, case: &Case, seed: u64) {
    let batch = build(case, &mut StdRng::seed_from_u64(seed));
    let what = format!("seed {seed}, {case:?}");
    let (cpu_out, cpu_k, cpu_v) = forward(case, &batch, &Device::Cpu).expect("CPU reference");
    let (gpu_out, gpu_k, gpu_v) =
        forward(case, &batch, gpu).unwrap_or_else(|e| panic!("{what}: CUDA op failed: {e}"));
    let tokens: usize = case.seqs.iter().map(|(ctx, _)| ctx).sum();
    let written = tokens * case.num_kv_heads * case.head_dim;
    assert_same_cache(&gpu_k, &cpu_k, written, &format!("K cache, {what}"));
    assert_same_cache(&gpu_v, &cpu_v, written, &format!("V cache, {what}"));
    assert_close(&gpu_out, &cpu_out, case.dtype, &what);
}

/// Every (dtype, group, block size); head_dim, window and softcap rotate with the seed.
fn for_each_config(mut seqs: impl FnMut(&mut StdRng) -> Vec<(usize, usize)>) {
    let gpu = gpu();
    let mut seed = 0;
    for dtype in DTYPES {
        for group in [1, 2, 4, 8] {
            for block_size in [16, 32] {
                seed += 1;
                let mut rng = StdRng::seed_from_u64(1000 + seed as u64);
                let head_dim = HEAD_DIMS[seed % HEAD_DIMS.len()];
                let case = Case::new(seqs(&mut rng), group, head_dim, block_size, dtype).with_variant(seed);
                check(&gpu, &case, seed as u64);
            }
        }
    }
}

#[test]
fn decode_matches_cpu() {
    // Partition edges (511, 512, 513 keys), 8k contexts (16 partitions), and a random one.
    for_each_config(|rng| {
        vec![(1, 1), (511, 1), (512, 1), (513, 1), (8192, 1), (rng.random_range(2..8192), 1)]
    });
}

/// Decode blocks serve up to 8 query heads of one KV head: groups that are not a power of two
/// (Qwen2.5-0.5B's 7) or need two blocks (12, 16) too.
#[test]
fn decode_with_uneven_and_large_gqa_groups_matches_cpu() {
    let gpu = gpu();
    for (seed, group) in [7usize, 12, 16].into_iter().enumerate() {
        for dtype in [DType::BF16, DType::F32] {
            let mut rng = StdRng::seed_from_u64(500 + seed as u64);
            let seqs = vec![(1, 1), (600, 1), (rng.random_range(2..3000), 1)];
            let case = Case::new(seqs, group, 64, 16, dtype).with_variant(seed);
            check(&gpu, &case, 500 + seed as u64);
        }
    }
}

#[test]
fn prefill_and_chunked_prefill_match_cpu() {
    for_each_config(|rng| {
        vec![(300, 300), (2000, 257), (8192, 64), (17, 5), (33, 2), (rng.random_range(130..1500), 129)]
    });
}

#[test]
fn mixed_batches_match_cpu() {
    for_each_config(|rng| {
        vec![(1, 1), (4000, 1), (600, 600), (1500, 100), (8192, 1), (40, 3), (rng.random_range(2..3000), 1)]
    });
}

#[test]
fn every_head_dim_multiple_of_8_up_to_256() {
    let gpu = gpu();
    for (i, head_dim) in (8..=256).step_by(8).enumerate() {
        let dtype = [DType::F32, DType::BF16][i % 2];
        let decode = Case::new(vec![(600, 1), (3, 1)], 2, head_dim, 16, dtype).with_variant(i);
        check(&gpu, &decode, i as u64);
        let prefill =
            Case::new(vec![(70, 70), (600, 1), (45, 20)], 2, head_dim, 16, dtype).with_variant(i + 1);
        check(&gpu, &prefill, i as u64);
    }
}

#[test]
fn write_kv_matches_cpu_and_touches_only_its_slots() {
    let gpu = gpu();
    let mut seed = 0;
    for dtype in DTYPES {
        for block_size in [16, 32] {
            for (num_kv_heads, head_dim) in [(1, 64), (8, 128), (3, 80)] {
                seed += 1;
                let case = Case { num_kv_heads, ..Case::new(Vec::new(), 1, head_dim, block_size, dtype) };
                let mut rng = StdRng::seed_from_u64(seed);
                let num_blocks = 20;
                let mut slots: Vec<u32> = (0..(num_blocks * block_size) as u32).collect();
                slots.shuffle(&mut rng);
                slots.truncate(77);
                let meta = AttentionMetadata::new(slots, Vec::new(), block_size);
                let k = random_tensor(&mut rng, 77, num_kv_heads, &case, 1.0);
                let v = random_tensor(&mut rng, 77, num_kv_heads, &case, 1.0);
                let on = |dev: &Device| {
                    let (kc, vc) = poisoned_caches(num_blocks, &case, dev);
                    write_kv(&k.to_device(dev)?, &v.to_device(dev)?, &kc, &vc, &meta)?;
                    candle_core::Result::Ok((kc, vc))
                };
                let (cpu_k, cpu_v) = on(&Device::Cpu).expect("CPU write_kv");
                let (gpu_k, gpu_v) = on(&gpu).expect("CUDA write_kv");
                let what = format!("write_kv {dtype:?}, block_size {block_size}, {num_kv_heads}x{head_dim}");
                assert_same_cache(&gpu_k, &cpu_k, 77 * num_kv_heads * head_dim, &format!("K, {what}"));
                assert_same_cache(&gpu_v, &cpu_v, 77 * num_kv_heads * head_dim, &format!("V, {what}"));
            }
        }
    }
}

#[test]
fn unsupported_shapes_and_bad_metadata_are_errors_not_launches() {
    let gpu = gpu();
    let meta = |block_table: Vec<u32>, context_len, slot| {
        let seq = SeqAttention { query_start: 0, query_len: 1, context_len, block_table };
        AttentionMetadata::new(vec![slot], vec![seq], 16)
    };
    let params = AttentionParams { scale: 0.1, sliding_window: None, softcap: None };
    for head_dim in [12, 264] {
        let case = Case::new(Vec::new(), 1, head_dim, 16, DType::F32);
        let (kc, vc) = poisoned_caches(2, &case, &gpu);
        let q = Tensor::zeros((1, 2, head_dim), DType::F32, &gpu).expect("q");
        let err =
            paged_attention(&q, &kc, &vc, &meta(vec![0], 1, 0), &params).expect_err("unsupported head_dim");
        assert!(err.to_string().contains("head_dim"), "head_dim {head_dim}: {err}");
    }

    let case = Case::new(Vec::new(), 1, 64, 16, DType::BF16);
    let (kc, vc) = poisoned_caches(2, &case, &gpu);
    let q = Tensor::zeros((1, 2, 64), DType::BF16, &gpu).expect("q");
    let k = Tensor::zeros((1, 2, 64), DType::BF16, &gpu).expect("k");
    assert!(
        paged_attention(&q, &kc, &vc, &meta(vec![5], 1, 0), &params).is_err(),
        "block id outside the cache"
    );
    assert!(
        paged_attention(&q, &kc, &vc, &meta(vec![0], 17, 0), &params).is_err(),
        "table shorter than context"
    );
    let window0 = AttentionParams { sliding_window: Some(0), ..params };
    assert!(paged_attention(&q, &kc, &vc, &meta(vec![0], 1, 0), &window0).is_err(), "empty window");
    let q32 = q.to_dtype(DType::F32).expect("q f32");
    assert!(paged_attention(&q32, &kc, &vc, &meta(vec![0], 1, 0), &params).is_err(), "dtype mismatch");
    assert!(write_kv(&k, &k, &kc, &vc, &meta(vec![0], 1, 32)).is_err(), "slot outside the cache");
    assert_eq!(host_f32(&kc).iter().filter(|x| !x.is_nan()).count(), 0, "a rejected write_kv wrote nothing");
}

/// Two picks a row on average, of every kind: greedy, plain draws, temperatures, min_p, and a
/// target at the very end of the distribution.
fn random_picks(rng: &mut StdRng, rows: usize) -> Vec<RowPick> {
    (0..2 * rows)
        .map(|i| {
            let pick = match i % 4 {
                0 => Pick { inv_temperature: 0.0, min_p: 0.0, u: 0.0 },
                1 => Pick { inv_temperature: 1.0, min_p: 0.0, u: rng.random() },
                2 => {
                    Pick { inv_temperature: 1.0 / rng.random_range(0.1f32..2.0), min_p: 0.0, u: rng.random() }
                }
                _ => Pick {
                    inv_temperature: 1.0 / rng.random_range(0.1f32..2.0),
                    min_p: rng.random_range(0.0f32..0.3),
                    u: if i % 8 == 3 { 1.0 - 1e-12 } else { rng.random() },
                },
            };
            RowPick { row: rng.random_range(0..rows), pick }
        })
        .collect()
}

/// GPU sampling against the CPU's: greedy gives the same token (the first maximum, ties
/// included: the rows are rounded to bf16, so ties are common) and a draw the same token,
/// except where its target sits within rounding of a boundary between two tokens (the GPU's
/// expf and sums differ from the CPU's in the last bits); logprobs agree to 1e-5 or are both NaN.
#[test]
fn sample_rows_matches_cpu() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    for (case, vocab) in [1usize, 2, 7, 255, 256, 257, 4096, 49_152, 151_936].into_iter().enumerate() {
        let rows = 1 + case % 5 * 13;
        let mut data: Vec<f32> = (0..rows * vocab)
            .map(|_| half::bf16::from_f32(rng.random_range(-12.0f32..12.0)).to_f32())
            .collect();
        for r in 0..rows {
            let row = &mut data[r * vocab..(r + 1) * vocab];
            match r % 7 {
                1 if vocab > 3 => row[rng.random_range(0..vocab)] = f32::NEG_INFINITY,
                2 => row.fill(f32::NEG_INFINITY), // nothing to draw from
                3 if vocab > 3 => row[vocab / 2] = f32::NAN,
                4 => row[rng.random_range(0..vocab)] = f32::INFINITY,
                _ => {}
            }
        }
        let picks = random_picks(&mut rng, rows);
        let cpu_logits = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).expect("cpu logits");
        let gpu_logits = cpu_logits.to_device(&gpu).expect("gpu logits");
        let want = sample_rows(&cpu_logits, &picks).expect("cpu sample_rows");
        let got = sample_rows(&gpu_logits, &picks).expect("gpu sample_rows");
        for ((p, &(gt, glp)), &(wt, wlp)) in picks.iter().zip(&got).zip(&want) {
            let row = &data[p.row * vocab..(p.row + 1) * vocab];
            let what = format!("vocab {vocab}, row {} ({:?}): GPU {gt}, CPU {wt}", p.row, p.pick);
            assert!(
                (glp.is_nan() && wlp.is_nan()) || (glp - wlp).abs() <= 1e-5 * wlp.abs().max(1.0),
                "{what}: logprob {glp} vs {wlp}"
            );
            if gt == wt {
                continue;
            }
            assert!(p.pick.inv_temperature != 0.0, "{what}: greedy tokens differ");
            // Each token's cumulative interval must hold the target, within rounding.
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = row
                .iter()
                .map(|&v| {
                    let w = (f64::from(v - max) * f64::from(p.pick.inv_temperature)).exp();
                    if w >= f64::from(p.pick.min_p) && w > 0.0 {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let (target, slack) = (p.pick.u * total, 1e-5 * total);
            assert!(w[gt as usize] > 0.0, "{what}: the GPU drew a token of weight 0");
            for t in [gt as usize, wt as usize] {
                let before: f64 = w[..t].iter().sum();
                assert!(
                    before - slack <= target && target < before + w[t] + slack,
                    "{what}: token {t} covers [{before}, {}), the target is {target}",
                    before + w[t]
                );
            }
        }
    }
    // Bad input is an error before any launch.
    let logits = Tensor::zeros((2, 8), DType::F32, &gpu).expect("logits");
    let greedy = Pick { inv_temperature: 0.0, min_p: 0.0, u: 0.0 };
    assert!(sample_rows(&logits, &[RowPick { row: 2, pick: greedy }]).is_err(), "row outside the logits");
    let bf16 = logits.to_dtype(DType::BF16).expect("bf16");
    assert!(sample_rows(&bf16, &[RowPick { row: 0, pick: greedy }]).is_err(), "bf16 logits");
}

/// A step's metadata is uploaded by its first layer and reused by the rest: one metadata used
/// by "layers" of different shapes (window, softcap) and dtypes, in turn and again,
/// still gives the CPU reference's output every time.
#[test]
fn one_metadata_serves_layers_of_different_shapes() {
    let gpu = gpu();
    let seqs = vec![(700, 1), (40, 40), (1500, 1), (300, 17)];
    let base = Case::new(seqs, 2, 64, 16, DType::BF16);
    let batch = build(&base, &mut StdRng::seed_from_u64(77));
    let layers = [
        base.clone(),
        Case { sliding_window: Some(256), ..base.clone() },
        Case { softcap: Some(5.0), dtype: DType::F32, ..base.clone() },
        base.clone(),
    ];
    let cpu_caches = forward(&base, &batch, &Device::Cpu).expect("CPU reference");
    let gpu_caches = forward(&base, &batch, &gpu).expect("CUDA step");
    for (i, layer) in layers.iter().enumerate() {
        let what = format!("layer {i}: {layer:?}");
        let on = |dev: &Device, (k, v): (&Tensor, &Tensor)| {
            let (k, v) = (k.to_dtype(layer.dtype)?, v.to_dtype(layer.dtype)?);
            let q = batch.q.to_dtype(layer.dtype)?.to_device(dev)?;
            paged_attention(&q, &k, &v, &batch.step, &layer.params())
        };
        let want = on(&Device::Cpu, (&cpu_caches.1, &cpu_caches.2)).expect("CPU attention");
        let got = on(&gpu, (&gpu_caches.1, &gpu_caches.2)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&got, &want, layer.dtype, &what);
    }
}

/// `|cuda - cpu| <= tol · max(1, |cpu|)`: the fused ops compute in f32 and round once, so
/// the two devices differ by FMA contraction, at most a rounding step of the storage type.
fn assert_close_relative(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: output shape");
    let tol = match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        _ => 1e-5,
    };
    let (g, w) = (host_f32(got), host_f32(want));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(a.is_finite(), "{what}: CUDA element {i} is {a}");
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: element {i} is {a} on CUDA, {b} on CPU");
    }
}

fn uniform(rng: &mut StdRng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("random tensor")
}

#[test]
fn fused_layer_ops_match_cpu() {
    use ferrite_engine::ops::activation::silu_mul;
    use ferrite_engine::ops::fused::{add_rms_norm, qkv_rope, QkvHeads};
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(21);
    let on_gpu = |t: &Tensor| t.to_device(&gpu).expect("to gpu");
    for dtype in DTYPES {
        for (tokens, num_heads, num_kv_heads, head_dim, biased) in
            [(1, 14, 2, 64, true), (7, 4, 4, 128, false), (300, 8, 1, 256, true), (3, 2, 1, 8, false)]
        {
            let what = format!("qkv_rope {dtype:?} {tokens} tokens, {num_heads}/{num_kv_heads} x {head_dim}");
            let heads = QkvHeads { num_heads, num_kv_heads, head_dim };
            let row = (num_heads + 2 * num_kv_heads) * head_dim;
            let qkv = uniform(&mut rng, &[tokens, row], dtype);
            let bias = biased.then(|| uniform(&mut rng, &[row], dtype));
            let angles =
                uniform(&mut rng, &[tokens, head_dim / 2], DType::F32).affine(50.0, 0.0).expect("angles");
            let cos = angles.cos().and_then(|t| t.to_dtype(dtype)).expect("cos");
            let sin = angles.sin().and_then(|t| t.to_dtype(dtype)).expect("sin");
            let want = qkv_rope(&qkv, bias.as_ref(), &cos, &sin, heads).expect("cpu qkv_rope");
            let gpu_bias = bias.as_ref().map(on_gpu);
            let got = qkv_rope(&on_gpu(&qkv), gpu_bias.as_ref(), &on_gpu(&cos), &on_gpu(&sin), heads)
                .expect("cuda qkv_rope");
            for (name, g, w) in [("q", &got.0, &want.0), ("k", &got.1, &want.1), ("v", &got.2, &want.2)] {
                assert!(g.is_contiguous(), "{what}: {name} contiguous");
                assert_close_relative(g, w, dtype, &format!("{what}: {name}"));
            }
        }
        for (tokens, width) in [(1, 4864), (33, 1536), (5, 7)] {
            let what = format!("silu_mul {dtype:?} {tokens} x {width}");
            let gate_up = uniform(&mut rng, &[tokens, 2 * width], dtype).affine(8.0, 0.0).expect("scale");
            // Reference: candle's SiLU and product on the CPU, in f32 from the same values.
            let f = gate_up.to_dtype(DType::F32).expect("f32");
            let gate = candle_nn::ops::silu(&f.narrow(1, 0, width).expect("gate")).expect("silu");
            let want = (gate * f.narrow(1, width, width).expect("up")).expect("product");
            let got = silu_mul(&on_gpu(&gate_up), width).expect("cuda silu_mul");
            assert_close_relative(&got, &want, dtype, &what);
        }
        for (tokens, hidden) in [(1, 896), (300, 576), (2, 4096), (3, 8)] {
            let what = format!("add_rms_norm {dtype:?} {tokens} x {hidden}");
            let (x, y) =
                (uniform(&mut rng, &[tokens, hidden], dtype), uniform(&mut rng, &[tokens, hidden], dtype));
            let w = uniform(&mut rng, &[hidden], dtype);
            let want = add_rms_norm(&x, &y, &w, 1e-6).expect("cpu add_rms_norm");
            let got = add_rms_norm(&on_gpu(&x), &on_gpu(&y), &on_gpu(&w), 1e-6).expect("cuda add_rms_norm");
            assert_close_relative(&got.0, &want.0, dtype, &format!("{what}: sum"));
            assert_close_relative(&got.1, &want.1, dtype, &format!("{what}: normed"));
        }
    }
}

/// The decode-step product (`gemv`, a warp per output feature) against its CPU loop, f16 and
/// bf16, at the layer shapes of a 0.5B model and odd ones; and `Linear` takes it for up to 8
/// rows (the same bits), cuBLAS above.
#[test]
fn gemv_matches_cpu() {
    use ferrite_engine::ops::linear::{gemv, Linear, GEMV_MAX_ROWS};
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in [DType::F16, DType::BF16] {
        let rel = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
        for (m, k, n) in [(1, 896, 1152), (2, 64, 40), (5, 136, 7), (8, 4864, 896), (1, 8, 1), (9, 64, 24)] {
            let mut values = |len: usize| -> Tensor {
                let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                Tensor::from_vec(v, len, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
            };
            let x = values(m * k).reshape((m, k)).unwrap();
            let w = values(n * k).reshape((n, k)).unwrap();
            let (xg, wg) = (x.to_device(&gpu).unwrap(), w.to_device(&gpu).unwrap());
            let host = |t: Tensor| {
                t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
            };
            let via_linear = host(Linear::new(wg.clone(), None, dtype).unwrap().forward(&xg).unwrap());
            if m > GEMV_MAX_ROWS {
                assert!(gemv(&xg, &wg).is_err(), "{m} rows is over the kernel's limit");
                continue;
            }
            let want = host(gemv(&x, &w).unwrap());
            let got = host(gemv(&xg, &wg).unwrap());
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                for (c, (g, w)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (g - w).abs() <= rel * w.abs() + 1e-3,
                        "{dtype:?} ({m}, {k}, {n}) [{r}, {c}]: {g} vs {w}"
                    );
                }
            }
            assert_eq!(via_linear, got, "{dtype:?} ({m}, {k}, {n}): Linear runs gemv");
        }
    }
}
