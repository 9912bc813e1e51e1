//! Unit tests of `sampler`, beside it so that file stays about what it does.

use std::collections::BTreeMap;

use super::*;

fn sampler(params: SamplingParams) -> SequenceSampler {
    SequenceSampler::new(params, &[], &[])
}

fn random(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed: Some(seed), ..Default::default() }
}

/// How often each token comes out in `draws` samples of the same row.
fn histogram(s: &mut SequenceSampler, row: &[f32], draws: usize) -> Vec<usize> {
    let mut seen = vec![0; row.len()];
    for _ in 0..draws {
        seen[s.sample(row).token_id as usize] += 1;
    }
    seen
}

/// The row `apply_bias_mask_penalties` makes of `row`.
fn processed(s: &SequenceSampler, row: &[f32]) -> Vec<f32> {
    let mut row = row.to_vec();
    s.apply_bias_mask_penalties(&mut row);
    row
}

/// A deterministic, irregular logits row in [-5, 5).
fn test_row(salt: u64, vocab: usize) -> Vec<f32> {
    (0..vocab as u64).map(|i| ((i * 2_654_435_761 + salt * 40_503) % 1000) as f32 / 100.0 - 5.0).collect()
}

fn ln(x: f32) -> f32 {
    x.ln()
}

#[test]
fn greedy_takes_the_first_maximum_with_its_raw_logprob() {
    let mut s = sampler(SamplingParams::default());
    let out = s.sample(&[0.0, 2.0, 2.0, -1.0]);
    assert_eq!(out.token_id, 1);
    // log(e^2 / (1 + 2e^2 + e^-1))
    let expected = (2f64 - (1.0 + 2.0 * 2f64.exp() + (-1f64).exp()).ln()) as f32;
    assert!((out.logprob - expected).abs() < 1e-6);
    assert!(out.top_logprobs.is_empty());
}

#[test]
fn argmax_never_takes_a_nan_even_first() {
    assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
    assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
    // A row that cannot be drawn from (an infinite logit) is greedy: the same rule.
    let row = [f32::NAN, 1.0, f32::INFINITY];
    let pick = Pick { inv_temperature: 1.0, min_p: 0.0, u: 0.3 };
    assert_eq!(pick_row(&row, &pick).0, 2);
    let mut s = sampler(SamplingParams { presence_penalty: 0.1, ..random(1.0, 3) });
    assert_eq!(s.sample(&row).token_id, 2, "the host path too");
}

#[test]
fn one_pass_stats_match_the_two_pass_log_softmax() {
    let increasing: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect(); // rescales every step
    let rows = [
        vec![f32::NEG_INFINITY, 3.0, -2.5, 3.0, 100.0, f32::NEG_INFINITY, 7.25],
        increasing,
        test_row(3, 500),
    ];
    for row in rows {
        let stats = RawStats::of(&row);
        assert_eq!(stats.argmax, argmax(&row));
        for (i, &l) in row.iter().enumerate() {
            let (got, want) = (stats.logprob(l), log_softmax_at(&row, i));
            assert!(got == want || (got - want).abs() < 1e-6, "token {i}: {got} vs {want}");
        }
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let params = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
    let mut s = SequenceSampler::new(params.clone(), &[0, 1, 1], &[]);
    let row = [2.0, -1.0, 0.5, 3.0];
    assert_eq!(processed(&s, &row), [1.0, -2.0, 0.5, 3.0]);
    // Output tokens count too.
    s.record(3);
    assert_eq!(processed(&s, &row), [1.0, -2.0, 0.5, 1.5]);
    // Enough to change the greedy choice: 2.0 / 2 < 1.5.
    assert_eq!(SequenceSampler::new(params, &[0], &[]).sample(&[2.0, 1.5]).token_id, 1);
    assert_eq!(SequenceSampler::new(SamplingParams::default(), &[0], &[]).sample(&[2.0, 1.5]).token_id, 0);
}

#[test]
fn frequency_and_presence_penalties_count_output_tokens_only() {
    let params = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
    let mut s = SequenceSampler::new(params, &[2], &[]);
    let row = [0.0; 4];
    assert_eq!(processed(&s, &row), [0.0; 4], "nothing generated yet; prompt token 2 is not penalized");
    for t in [3, 3, 1] {
        s.record(t);
    }
    // token 1: 1 * 0.5 + 0.25; token 3: 2 * 0.5 + 0.25.
    assert_eq!(processed(&s, &row), [0.0, -0.75, 0.0, -1.25]);
    assert_eq!(s.num_generated_tokens(), 3);
}

#[test]
fn logit_bias_is_added_first_and_can_force_or_ban_a_token() {
    let raw = [5.0, 0.0, 0.0];
    let params = SamplingParams { logit_bias: BTreeMap::from([(2, 10.0)]), ..Default::default() };
    let mut s = sampler(params);
    assert_eq!(processed(&s, &raw), [5.0, 0.0, 10.0]);
    let out = s.sample(&raw);
    assert_eq!(out.token_id, 2);
    assert_eq!(out.logprob, log_softmax_at(&raw, 2), "the logprob is of the raw logits");

    let banned = SamplingParams { logit_bias: BTreeMap::from([(0, -100.0)]), ..random(1.0, 5) };
    let seen = histogram(&mut sampler(banned), &[1.0, 0.0], 500);
    assert_eq!(seen[0], 0, "{seen:?}");
}

#[test]
fn min_tokens_masks_eos_and_stop_token_ids_until_reached() {
    let row = [5.0, 4.0, 3.0, 0.0];
    let eos = [0];
    let params = SamplingParams { min_tokens: 2, stop_token_ids: vec![1], ..Default::default() };
    let mut s = SequenceSampler::new(params.clone(), &[], &eos);
    let tokens: Vec<u32> = (0..3).map(|_| s.sample(&row).token_id).collect();
    assert_eq!(tokens, [2, 2, 0]);

    let mut s = SequenceSampler::new(params.clone(), &[], &eos);
    let first = s.sample(&row);
    assert_eq!(first.logprob, log_softmax_at(&row, 2), "the logprob is of the raw logits");

    // ignore_eos: EOS is an ordinary token, so only the stop token is masked.
    let ignoring = SamplingParams { ignore_eos: true, ..params.clone() };
    assert_eq!(SequenceSampler::new(ignoring, &[], &eos).sample(&row).token_id, 0);
    // min_tokens 0 masks nothing.
    let none = SamplingParams { min_tokens: 0, ..params };
    assert_eq!(SequenceSampler::new(none, &[], &eos).sample(&row).token_id, 0);
}

#[test]
fn temperature_sharpens_and_flattens_the_distribution() {
    // p(token 1) = 3^(1/T) / (1 + 3^(1/T)).
    let row = [0.0, ln(3.0)];
    for (t, expected) in [(1.0f32, 0.75), (0.5, 0.9), (2.0, 3f64.sqrt() / (1.0 + 3f64.sqrt()))] {
        let seen = histogram(&mut sampler(random(t, 42)), &row, 4000);
        let p1 = seen[1] as f64 / 4000.0;
        assert!((p1 - expected).abs() < 0.025, "T={t}: p(1) = {p1}, expected {expected}");
    }
}

#[test]
fn same_seed_same_tokens_and_top_k_one_is_greedy() {
    let logits = test_row(1, 50);
    let run = |p: SamplingParams| {
        let mut s = sampler(p);
        (0..20).map(|_| s.sample(&logits).token_id).collect::<Vec<_>>()
    };
    assert_eq!(run(random(1.0, 7)), run(random(1.0, 7)));
    assert_ne!(run(random(1.0, 7)), run(random(1.0, 8)));
    for seed in 0..5 {
        let k1 = run(SamplingParams { top_k: Some(1), ..random(1.5, seed) });
        assert!(k1.iter().all(|&t| t as usize == argmax(&logits)), "{k1:?}");
    }
}

#[test]
fn a_temperature_whose_reciprocal_overflows_or_an_infinite_logit_is_greedy() {
    let logits = test_row(2, 50);
    let best = argmax(&logits) as u32;
    assert_ne!(best, 0, "the test needs a row whose best token is not the fallback 0");
    assert_eq!(sampler(random(1e-40, 1)).sample(&logits).token_id, best);
    let mut inf_row = logits.clone();
    inf_row[7] = f32::INFINITY;
    assert_eq!(sampler(random(1.0, 1)).sample(&inf_row).token_id, 7);
}

#[test]
fn top_k_keeps_the_k_largest_with_ties_to_the_lower_id() {
    let row = [1.0, 3.0, 2.0, 0.5, 2.0];
    let seen = histogram(&mut sampler(SamplingParams { top_k: Some(2), ..random(1.0, 3) }), &row, 2000);
    assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");
    assert_eq!(seen[0] + seen[3] + seen[4], 0, "{seen:?}");
}

#[test]
fn top_p_keeps_the_nucleus_of_the_top_k_renormalized() {
    let row = [ln(0.5), ln(0.3), ln(0.2)];
    let top_p =
        |top_p, top_k| histogram(&mut sampler(SamplingParams { top_p, top_k, ..random(1.0, 9) }), &row, 4000);
    // 0.5 < 0.6 <= 0.5 + 0.3: two tokens, renormalized to 0.625 / 0.375.
    let seen = top_p(0.6, None);
    assert_eq!(seen[2], 0, "{seen:?}");
    assert!((seen[0] as f64 / 4000.0 - 0.625).abs() < 0.025, "{seen:?}");
    assert_eq!(top_p(0.4, None), [4000, 0, 0]);
    // After top_k = 2 the first token alone has 0.625 >= 0.6.
    assert_eq!(top_p(0.6, Some(2)), [4000, 0, 0]);
    let seen = top_p(0.85, None);
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
}

#[test]
fn the_nucleus_found_block_by_block_matches_a_full_sort() {
    let row = test_row(7, 3000);
    let weight = |id: usize| f64::from(row[id] - 5.0).exp();
    let mut reference: Vec<u32> = (0..row.len() as u32).collect();
    reference.sort_by(by_logit_desc(&row));
    let total: f64 = reference.iter().map(|&id| weight(id as usize)).sum();
    for top_p in [0.01, 0.3, 0.9, 0.999] {
        let target = top_p * total;
        let mut cumulative = 0.0;
        let want = 1 + reference
            .iter()
            .position(|&id| {
                cumulative += weight(id as usize);
                cumulative >= target
            })
            .unwrap();
        let mut ids: Vec<u32> = (0..row.len() as u32).rev().collect();
        let got = nucleus_len(&mut ids, &row, weight, target);
        assert_eq!(got, want, "top_p {top_p}");
        assert_eq!(ids[..got], reference[..want], "top_p {top_p}");
    }
    // The big ones need several blocks (64, 256, 1024, ...).
    assert!(nucleus_len(&mut (0..3000).collect::<Vec<u32>>(), &row, weight, 0.9 * total) > 400);
}

#[test]
fn min_p_cuts_relative_to_the_most_likely_token() {
    // Relative to the first: 1, 0.5, 0.2, 0.05. min_p 0.3 keeps the first two.
    let row = [0.0, ln(0.5), ln(0.2), ln(0.05)];
    for top_p in [1.0, 0.999] {
        // top_p < 1 takes the sorted-list path, 1 the whole-row path: same cut.
        let params = SamplingParams { min_p: 0.3, top_p, ..random(1.0, 4) };
        let seen = histogram(&mut sampler(params), &row, 3000);
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "top_p {top_p}: {seen:?}");
    }
    // Uniform over 100 tokens (each 0.01 < 0.5): all stay, as each is as likely as the top.
    let params = SamplingParams { min_p: 0.5, ..random(1.0, 4) };
    let seen = histogram(&mut sampler(params), &[0.0; 100], 2000);
    assert!(seen.iter().filter(|&&n| n > 0).count() > 90, "{seen:?}");
}

#[test]
fn top_logprobs_are_the_raw_log_softmax_sorted_descending() {
    let row = [0.5, 2.0, -1.0, 2.0, 3.5, f32::NEG_INFINITY, 1.0];
    // Everything that changes the sampled distribution is on; the logprobs must not see it.
    let params = SamplingParams {
        top_logprobs: 4,
        logit_bias: BTreeMap::from([(2, 50.0)]),
        repetition_penalty: 1.7,
        presence_penalty: 1.0,
        ..random(0.8, 2)
    };
    let mut s = SequenceSampler::new(params, &[4], &[]);
    for _ in 0..3 {
        let out = s.sample(&row);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [4, 1, 3, 6], "ties: the lower id first");
        for &(id, lp) in &out.top_logprobs {
            assert!((lp - log_softmax_at(&row, id as usize)).abs() < 1e-6, "token {id}");
        }
        assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(out.logprob, RawStats::of(&row).logprob(row[out.token_id as usize]));
    }
    let mut all = sampler(SamplingParams { top_logprobs: 20, ..Default::default() });
    assert_eq!(all.sample(&row).top_logprobs.len(), row.len(), "at most the vocabulary");
    assert!(sampler(SamplingParams::default()).sample(&row).top_logprobs.is_empty());
}

#[test]
fn seeded_sequences_sample_the_same_alone_and_in_any_batch() {
    let vocab = 300;
    let prompt = [1, 2, 3, 250];
    let params = [
        SamplingParams { top_p: 0.9, repetition_penalty: 1.3, top_logprobs: 2, ..random(1.0, 11) },
        SamplingParams { top_k: Some(5), frequency_penalty: 0.5, ..random(0.7, 12) },
        SamplingParams { min_p: 0.05, logit_bias: BTreeMap::from([(7, 2.0)]), ..random(1.2, 13) },
        SamplingParams { presence_penalty: 1.5, ..random(2.0, 14) },
    ];
    let new = |p: &SamplingParams| SequenceSampler::new(p.clone(), &prompt, &[0]);
    let steps = 12;
    let row_of = |seq: usize, step: usize| test_row((seq * 100 + step) as u64, vocab);

    // Alone, one at a time.
    let alone: Vec<Vec<SampleOutput>> = params
        .iter()
        .enumerate()
        .map(|(seq, p)| {
            let mut s = new(p);
            (0..steps).map(|step| sample_batch(&row_of(seq, step), vocab, &mut [&mut s]).remove(0)).collect()
        })
        .collect();

    // Together in two orders, the second with an unseeded stranger in the middle.
    for order in [vec![Some(0), Some(1), Some(2), Some(3)], vec![Some(3), None, Some(1), Some(0), Some(2)]] {
        let mut samplers: Vec<SequenceSampler> = order
            .iter()
            .map(|&seq| match seq {
                Some(seq) => new(&params[seq]),
                None => sampler(SamplingParams { temperature: 1.0, ..Default::default() }),
            })
            .collect();
        let mut together: Vec<Vec<SampleOutput>> = vec![Vec::new(); params.len()];
        for step in 0..steps {
            let logits: Vec<f32> = order.iter().flat_map(|&seq| row_of(seq.unwrap_or(99), step)).collect();
            let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
            let outs = sample_batch(&logits, vocab, &mut refs);
            assert_eq!(outs.len(), order.len());
            for (&seq, out) in order.iter().zip(outs) {
                if let Some(seq) = seq {
                    together[seq].push(out);
                }
            }
        }
        assert_eq!(together, alone, "order {order:?}");
    }
    // And the sequences really sample: not all greedy.
    let greedy: Vec<u32> = (0..steps).map(|step| argmax(&row_of(0, step)) as u32).collect();
    assert_ne!(alone[0].iter().map(|o| o.token_id).collect::<Vec<_>>(), greedy);
}

/// `pick_row` against a naive f64 reference with libm's exp: greedy is the first maximum,
/// a draw is the first token whose cumulative weight passes `u` × total (or, when `u` sits
/// on a boundary within rounding, its neighbour), and the logprob is the raw log-softmax.
#[test]
fn pick_row_matches_a_naive_inverse_cdf_and_log_softmax() {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..300 {
        let vocab = [1, 2, 63, 64, 65, 1000, 50_000][case % 7];
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        if vocab > 2 && case % 5 == 0 {
            row[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
        }
        if vocab > 2 && case % 11 == 0 {
            let at = rng.random_range(1..vocab);
            row[at] = row[at - 1]; // ties
        }
        let (inv_t, min_p) = match case % 4 {
            0 => (0.0, 0.0),
            1 => (1.0, 0.0),
            2 => (1.0 / rng.random_range(0.2f32..2.0), 0.0),
            _ => (1.0 / rng.random_range(0.2f32..2.0), rng.random_range(0.0f32..0.5)),
        };
        let u = rng.random::<f64>();
        let (token, logprob) = pick_row(&row, &Pick { inv_temperature: inv_t, min_p, u });
        let t = token as usize;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
        let want_logprob = f64::from(row[t] - max) - lse;
        assert!((f64::from(logprob) - want_logprob).abs() < 1e-5, "case {case}: logprob");
        if inv_t == 0.0 {
            assert_eq!(t, row.iter().position(|&v| v == max).unwrap(), "case {case}: first maximum");
            continue;
        }
        let w: Vec<f64> = row
            .iter()
            .map(|&v| {
                let w = (f64::from(v - max) * f64::from(inv_t)).exp();
                if w >= f64::from(min_p) {
                    w
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        let before: f64 = w[..t].iter().sum();
        let target = u * total;
        let slack = 1e-5 * total;
        assert!(w[t] > 0.0, "case {case}: drew a token of weight 0");
        assert!(
            before - slack <= target && target < before + w[t] + slack,
            "case {case}: token {t} covers [{before}, {}), target {target}",
            before + w[t]
        );
    }
}

#[test]
fn a_plain_pick_draws_the_same_uniform_as_sample_and_accepting_records_the_token() {
    let row = test_row(3, 500);
    let params = random(0.8, 42);
    let (mut a, mut b) = (sampler(params.clone()), sampler(params));
    for _ in 0..20 {
        let pick = a.plain_pick(row.len()).expect("no penalties, top-k, top-p or logprobs");
        let (token, logprob) = pick_row(&row, &pick);
        a.accept(token);
        let out = b.sample(&row);
        assert_eq!((token, logprob), (out.token_id, out.logprob));
    }
    assert_eq!(a.num_generated_tokens(), 20);
    // Rows that need the host have no pick, and draw nothing.
    for p in [
        SamplingParams { top_p: 0.9, ..random(1.0, 1) },
        SamplingParams { top_k: Some(10), ..random(1.0, 1) },
        SamplingParams { top_logprobs: 1, ..random(1.0, 1) },
        SamplingParams { presence_penalty: 0.5, ..random(1.0, 1) },
    ] {
        assert!(sampler(p.clone()).plain_pick(row.len()).is_none(), "{p:?}");
    }
    // top_k at or above the vocabulary keeps everything: still plain.
    assert!(sampler(SamplingParams { top_k: Some(500), ..random(1.0, 1) }).plain_pick(500).is_some());
}

#[test]
#[should_panic(expected = "logits must be [num_seqs (2) * vocab_size (3)]")]
fn a_batch_whose_logits_do_not_match_panics() {
    let (mut a, mut b) = (sampler(SamplingParams::default()), sampler(SamplingParams::default()));
    sample_batch(&[0.0; 5], 3, &mut [&mut a, &mut b]);
}
