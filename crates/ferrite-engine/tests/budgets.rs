//! Deadlines through the engine (issue 25): a generation cut at its deadline returns what it
//! made, which is the start of the unbudgeted output; a first-token budget the engine predicts
//! it cannot meet is refused at submission, with the estimate, once it has timed a few steps
//! (before that, a request that misses it ends without tokens); under the deadline policy the
//! earliest deadline overtakes the queue. Budgets never change a token.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrite_engine::{
    load, Deadlines, EngineConfig, FinishReason, LoadOptions, Request, RequestEvent, RequestStream,
    SchedulerConfig, SchedulingPolicy, StopReason, SubmitError, Usage,
};

fn engine(policy: SchedulingPolicy, max_num_seqs: usize) -> TestEngine {
    let m = load(fixture("qwen2").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let c = test_config();
    let scheduler = SchedulerConfig { policy, max_num_seqs, max_num_batched_tokens: 256, ..c.scheduler };
    TestEngine::start(m, EngineConfig { scheduler, max_model_len: 1024, ..c })
}

/// One sample's tokens, text, how it ended and the usage.
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    finish: (FinishReason, Option<StopReason>),
    usage: Usage,
}

fn outcome(mut stream: RequestStream) -> Outcome {
    let (mut tokens, mut text, mut finish) = (vec![], String::new(), None);
    loop {
        match stream.blocking_next() {
            Some(RequestEvent::Token(t)) => {
                assert!(finish.is_none(), "no token after the finish");
                tokens.push(t.token_id);
                text.push_str(&t.text);
                finish = t.finish;
            }
            Some(RequestEvent::Stopped { index, text: rest, finish: f }) => {
                assert_eq!(index, 0);
                assert!(finish.is_none(), "stopped after its finish");
                text.push_str(&rest);
                finish = Some(f);
            }
            Some(RequestEvent::Finished(usage)) => {
                let finish = finish.expect("the sample ended before the usage");
                return Outcome { tokens, text, finish, usage };
            }
            Some(RequestEvent::Error(e)) => panic!("request failed: {e}"),
            Some(RequestEvent::Embedding { .. }) => panic!("a generation request got an embedding"),
            None => panic!("stream ended without Finished"),
        }
    }
}

fn with_deadlines(request: Request, deadlines: Deadlines) -> Request {
    Request { deadlines, arrival: Instant::now(), ..request }
}

/// A deadline a third of the way through a long generation stops it there: finish length,
/// stop reason deadline, fewer tokens than asked, and those tokens and their text the start of
/// the same request's unbudgeted output.
#[test]
fn a_deadline_cuts_generation_and_returns_what_was_made() {
    let r = reference(&fixture("qwen2"));
    let prompt = &r.prompts[0].prompt_ids;
    let max_tokens = 1000 - prompt.len();
    let e = engine(SchedulingPolicy::Fcfs, 4);
    let started = Instant::now();
    let free = outcome(e.handle.submit(greedy(prompt, max_tokens)).unwrap());
    let whole = started.elapsed();
    assert_eq!(free.tokens.len(), max_tokens);
    assert_eq!(free.finish, (FinishReason::Length, None));

    let deadline = Deadlines { total: Some(whole / 3), first_token: None };
    let cut = outcome(e.handle.submit(with_deadlines(greedy(prompt, max_tokens), deadline)).unwrap());
    assert_eq!(cut.finish, (FinishReason::Length, Some(StopReason::Deadline)));
    assert!(cut.tokens.len() < max_tokens, "it ran to the end: the deadline cut nothing");
    assert_eq!(cut.tokens[..], free.tokens[..cut.tokens.len()], "a deadline changed a token");
    assert!(free.text.starts_with(&cut.text), "{:?} is not the start of {:?}", cut.text, free.text);
    assert_eq!(cut.usage.completion_tokens, cut.tokens.len());
    assert_eq!(e.handle.stats().num_used_blocks, 0, "the cut request's blocks are back");
}

/// Before the engine has timed a step, nothing is predicted: a first-token budget too short
/// for anything is taken, and ends without a token. Once it has, the same budget is refused at
/// submission with the estimate, the budget and the field; a whole-request deadline tighter
/// than it is the one named; a budget that can be met gives the reference tokens.
#[test]
fn a_first_token_budget_that_cannot_be_met_is_refused_once_steps_are_timed() {
    let r = reference(&fixture("qwen2"));
    let p = &r.prompts[1];
    let e = engine(SchedulingPolicy::Fcfs, 4);
    let instant = Deadlines { total: None, first_token: Some(Duration::from_micros(1)) };

    let missed = outcome(e.handle.submit(with_deadlines(greedy(&p.prompt_ids, 4), instant)).unwrap());
    assert_eq!(missed.finish, (FinishReason::Length, Some(StopReason::FirstTokenDeadline)));
    assert!(missed.tokens.is_empty() && missed.text.is_empty());
    assert_eq!(missed.usage.first_token, None);

    // A few steps for the step model.
    for _ in 0..3 {
        outcome(e.handle.submit(greedy(&p.prompt_ids, 4)).unwrap());
    }
    let refused = e.handle.submit(with_deadlines(greedy(&p.prompt_ids, 4), instant));
    let Err(err @ SubmitError::Infeasible { param, estimate_us, budget_us, .. }) = refused else {
        panic!("an impossible first-token budget was taken")
    };
    assert_eq!((param, budget_us), ("ttft_deadline_ms", 1));
    assert!(estimate_us > budget_us);
    let message = err.to_string();
    assert!(message.contains("ttft_deadline_ms 0.001 ms") && message.contains("predicted"), "{message}");

    let tighter =
        Deadlines { total: Some(Duration::from_micros(2)), first_token: Some(Duration::from_secs(60)) };
    let refused = e.handle.submit(with_deadlines(greedy(&p.prompt_ids, 4), tighter));
    let refused = refused.err();
    assert!(matches!(refused, Some(SubmitError::Infeasible { param: "deadline_ms", .. })), "{refused:?}");

    let roomy =
        Deadlines { total: Some(Duration::from_secs(600)), first_token: Some(Duration::from_secs(60)) };
    let met = outcome(e.handle.submit(with_deadlines(greedy(&p.prompt_ids, 4), roomy)).unwrap());
    assert_eq!(met.tokens, p.greedy_ids[..4]);
    assert_eq!(met.finish, (FinishReason::Length, None));
}

/// Under `--scheduling-policy deadline`, a request with a deadline submitted behind 32 long
/// requests without one (two run at a time) gets its first token before every one of them that
/// had not started when it arrived, and every output is the reference's.
#[test]
fn the_earliest_deadline_overtakes_the_queue() {
    let r = reference(&fixture("qwen2"));
    let long = r.prompts.iter().max_by_key(|p| p.prompt_ids.len()).unwrap();
    let short = &r.prompts[3];
    let e = engine(SchedulingPolicy::Deadline, 2);
    let queued: Vec<_> = (0..32).map(|_| e.handle.submit(greedy(&long.prompt_ids, 16)).unwrap()).collect();
    let budget = Deadlines { total: Some(Duration::from_secs(600)), first_token: None };
    let urgent = e.handle.submit(with_deadlines(greedy(&short.prompt_ids, 4), budget)).unwrap();
    let urgent = outcome(urgent);
    assert_eq!(urgent.tokens, short.greedy_ids[..4]);
    let (scheduled, first) = (urgent.usage.first_scheduled.unwrap(), urgent.usage.first_token.unwrap());
    let mut overtaken = 0;
    for s in queued {
        let o = outcome(s);
        assert_eq!(o.tokens, long.greedy_ids[..16], "an output changed");
        if o.usage.first_scheduled.unwrap() > scheduled {
            assert!(o.usage.first_token.unwrap() > first, "a request without a deadline went first");
            overtaken += 1;
        }
    }
    assert!(overtaken >= 28, "only {overtaken} of 32 were still waiting: the check would say little");
}
