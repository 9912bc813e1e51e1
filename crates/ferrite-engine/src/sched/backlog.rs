//! The prompt work queued in the scheduler, as the engine publishes it after each step: from it
//! a submitting thread predicts when a new request's first token would come, so that one whose
//! budget cannot be met is refused at once instead of failing after its wait, and what its
//! prompt alone would cost.
//!
//! The prediction is the step model's ([`Estimate`]): the prompt tokens served before the
//! request's first token (those ahead of it, then its own) take `per_prompt_token` each, and
//! every step they need pays the step's fixed part and its decodes. It over-estimates where
//! the prefix cache will serve part of a prompt (the cache is not consulted until a prompt is
//! admitted), and it does not see sequences waiting for a free seat (`max_num_seqs`) behind
//! long generations.

use super::step_cost::Estimate;
use super::Place;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// The step model, once the engine has timed enough steps.
    pub step: Option<Estimate>,
    /// Sequences decoding: each step carries one token of each.
    pub decode_rows: usize,
    /// Prompt tokens one step takes at most (the token budget less the decodes, or what the
    /// latency target allows).
    pub prompt_tokens_per_step: usize,
    /// Prompt tokens still to compute of the running sequences (served before any waiting one).
    pub running_prompt_tokens: usize,
    /// Each waiting sequence's place and prompt tokens (all of them: the prefix cache is
    /// consulted only at admission).
    pub waiting: Vec<(Place, usize)>,
}

/// When a new request's first token is predicted, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstToken {
    /// Seconds from now.
    pub secs: f64,
    /// Prompt tokens served before the request's own.
    pub tokens_ahead: usize,
}

impl Backlog {
    /// Prompt tokens served before a new request at `place`: every running prompt, and every
    /// waiting one at a place as good (those arrived earlier, so they win the tie).
    pub fn tokens_ahead(&self, place: Place) -> usize {
        let waiting: usize = self.waiting.iter().filter(|(p, _)| *p <= place).map(|(_, n)| n).sum();
        self.running_prompt_tokens + waiting
    }

    /// The first token of a new request of `prompt_tokens` at `place`, with `pending_tokens`
    /// submitted since this backlog was published (counted ahead of it: their places are not
    /// known yet). `None` until the step model answers.
    pub fn first_token(
        &self,
        place: Place,
        prompt_tokens: usize,
        pending_tokens: usize,
    ) -> Option<FirstToken> {
        let e = self.step?;
        let tokens_ahead = self.tokens_ahead(place) + pending_tokens;
        let tokens = tokens_ahead + prompt_tokens;
        let steps = tokens.div_ceil(self.prompt_tokens_per_step.max(1));
        let per_step = e.fixed + e.per_decode * self.decode_rows as f64;
        let secs = steps as f64 * per_step + e.per_prompt_token * tokens as f64;
        Some(FirstToken { secs, tokens_ahead })
    }

    /// Seconds of device time `prompt_tokens` take at the least: each prompt token's own cost,
    /// none of the fixed part it shares with the rest of its steps. `None` until the step model
    /// answers.
    pub fn prompt_secs(&self, prompt_tokens: usize) -> Option<f64> {
        self.step.map(|e| e.per_prompt_token * prompt_tokens as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::sched::SchedulingPolicy;

    fn backlog(policy: SchedulingPolicy, now: Instant) -> Backlog {
        let at = |ms| Some(now + Duration::from_millis(ms));
        Backlog {
            step: Some(Estimate { fixed: 0.010, per_prompt_token: 0.001, per_decode: 0.002 }),
            decode_rows: 5,
            prompt_tokens_per_step: 100,
            running_prompt_tokens: 40,
            waiting: vec![
                (Place::new(policy, 0, at(500)), 100),
                (Place::new(policy, 5, None), 200),
                (Place::new(policy, 0, at(100)), 60),
            ],
        }
    }

    /// By hand: 40 running + the waiting ones ahead + 50 of its own; steps of 100 prompt
    /// tokens, each paying 10 ms fixed and 5 decodes at 2 ms; 1 ms per prompt token.
    #[test]
    fn the_first_token_counts_the_work_ahead_under_each_policy() {
        let now = Instant::now();
        let cases = [
            // FCFS: everything queued is ahead.
            (SchedulingPolicy::Fcfs, Place::new(SchedulingPolicy::Fcfs, 0, None), 400),
            // Priority 0: ahead of the priority-5 one, behind the two at 0.
            (SchedulingPolicy::Priority, Place::new(SchedulingPolicy::Priority, 0, None), 200),
            // A deadline 300 ms out: behind the 100 ms one only.
            (
                SchedulingPolicy::Deadline,
                Place::new(SchedulingPolicy::Deadline, 0, Some(now + Duration::from_millis(300))),
                100,
            ),
            // No deadline: last.
            (SchedulingPolicy::Deadline, Place::new(SchedulingPolicy::Deadline, 0, None), 400),
        ];
        for (policy, place, ahead) in cases {
            let b = backlog(policy, now);
            let got = b.first_token(place, 50, 0).unwrap();
            assert_eq!(got.tokens_ahead, ahead, "{policy:?}");
            let tokens = ahead + 50;
            let steps = tokens.div_ceil(100) as f64;
            let want = steps * (0.010 + 5.0 * 0.002) + tokens as f64 * 0.001;
            assert!((got.secs - want).abs() < 1e-12, "{policy:?}: {} vs {want}", got.secs);
        }
        // Tokens submitted since the backlog was published count ahead.
        let b = backlog(SchedulingPolicy::Fcfs, now);
        let place = Place::new(SchedulingPolicy::Fcfs, 0, None);
        assert_eq!(b.first_token(place, 50, 30).unwrap().tokens_ahead, 430);
    }

    #[test]
    fn nothing_is_predicted_before_the_step_model_answers() {
        let b = Backlog { step: None, ..backlog(SchedulingPolicy::Fcfs, Instant::now()) };
        assert_eq!(b.first_token(Place::new(SchedulingPolicy::Fcfs, 0, None), 10, 0), None);
        assert_eq!(b.prompt_secs(10), None);
        let b = backlog(SchedulingPolicy::Fcfs, Instant::now());
        let secs = b.prompt_secs(250).unwrap();
        assert!((secs - 0.25).abs() < 1e-12, "{secs}");
    }
}
