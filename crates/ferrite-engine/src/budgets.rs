//! How the budgets requests carry ended, for Prometheus: each budget kind's outcome
//! (`ferrite:request_budget_outcome_total{kind, outcome}`), goodput, the share of the
//! requests finished over the last minute that met every budget they carried
//! (`ferrite:request_goodput_ratio`; a request without budgets meets them all), and the queue
//! time of each priority class (`ferrite:request_queue_time_by_priority_seconds{priority_class}`:
//! `high` below 0, `default` at 0, `low` above; three series, whatever priorities clients send).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::metrics::PREFIX;

/// A budget a request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKind {
    /// The whole request's (`deadline_ms`).
    Deadline,
    /// The first token's (`ttft_deadline_ms`).
    FirstTokenDeadline,
    /// `max_cost_usd`.
    Cost,
}

impl BudgetKind {
    pub const ALL: [BudgetKind; 3] = [BudgetKind::Deadline, BudgetKind::FirstTokenDeadline, BudgetKind::Cost];

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Deadline => "deadline",
            BudgetKind::FirstTokenDeadline => "ttft_deadline",
            BudgetKind::Cost => "cost",
        }
    }
}

/// How a budget ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOutcome {
    /// The request finished within it.
    Met,
    /// The request was stopped by it (what it had generated returned).
    Cut,
    /// The request was refused at submission: it could not be met.
    Rejected,
    /// The request finished, but past it (the engine's forecast of a step was short).
    Missed,
}

impl BudgetOutcome {
    pub const ALL: [BudgetOutcome; 4] =
        [BudgetOutcome::Met, BudgetOutcome::Cut, BudgetOutcome::Rejected, BudgetOutcome::Missed];

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetOutcome::Met => "met",
            BudgetOutcome::Cut => "cut",
            BudgetOutcome::Rejected => "rejected",
            BudgetOutcome::Missed => "missed",
        }
    }
}

/// The window goodput is measured over.
const GOODPUT_WINDOW: Duration = Duration::from_secs(60);

/// The class a priority's queue time is reported under.
pub fn priority_class(priority: i32) -> &'static str {
    match priority {
        p if p < 0 => "high",
        0 => "default",
        _ => "low",
    }
}

pub(crate) struct BudgetMetrics {
    outcomes: IntCounterVec,
    goodput: Gauge,
    queue_by_priority: HistogramVec,
    /// When each request of the window finished, and whether it met its budgets.
    finished: Mutex<VecDeque<(Instant, bool)>>,
}

impl BudgetMetrics {
    /// `queue_buckets`: the edges of the queue-time histogram (vLLM's request latency ones).
    pub fn new(registry: &Registry, model_name: &str, queue_buckets: Vec<f64>) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(format!("{PREFIX}{name}"), help).const_label("model_name", model_name)
        };
        let outcomes = IntCounterVec::new(
            opts("request_budget_outcome_total", "Requests by budget kind and how that budget ended"),
            &["kind", "outcome"],
        )?;
        registry.register(Box::new(outcomes.clone()))?;
        for kind in BudgetKind::ALL {
            for outcome in BudgetOutcome::ALL {
                outcomes.with_label_values(&[kind.as_str(), outcome.as_str()]); // every series from the start
            }
        }
        let goodput = Gauge::with_opts(opts(
            "request_goodput_ratio",
            "Share of the requests finished in the last minute that met every budget they carried",
        ))?;
        registry.register(Box::new(goodput.clone()))?;
        goodput.set(1.0);
        let queue_by_priority = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}request_queue_time_by_priority_seconds"),
                "Time a request waited to be scheduled, by priority class (high < 0 = default < low)",
            )
            .const_label("model_name", model_name)
            .buckets(queue_buckets),
            &["priority_class"],
        )?;
        registry.register(Box::new(queue_by_priority.clone()))?;
        for class in ["high", "default", "low"] {
            queue_by_priority.with_label_values(&[class]);
        }
        Ok(Self { outcomes, goodput, queue_by_priority, finished: Mutex::new(VecDeque::new()) })
    }

    /// A request of `priority` waited `seconds` to be scheduled.
    pub fn observe_queue(&self, priority: i32, seconds: f64) {
        self.queue_by_priority.with_label_values(&[priority_class(priority)]).observe(seconds);
    }

    pub fn observe(&self, kind: BudgetKind, outcome: BudgetOutcome) {
        self.outcomes.with_label_values(&[kind.as_str(), outcome.as_str()]).inc();
    }

    /// A request finished at `now` (not aborted or failed) having met all its budgets or not.
    pub fn observe_finished(&self, now: Instant, met: bool) {
        let mut window = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        window.push_back((now, met));
        while window.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > GOODPUT_WINDOW) {
            window.pop_front();
        }
        let good = window.iter().filter(|(_, met)| *met).count();
        self.goodput.set(good as f64 / window.len() as f64);
    }

    #[cfg(test)]
    fn count(&self, kind: BudgetKind, outcome: BudgetOutcome) -> u64 {
        self.outcomes.with_label_values(&[kind.as_str(), outcome.as_str()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodput_is_the_share_met_over_the_last_minute() {
        let m = BudgetMetrics::new(&Registry::new(), "m", vec![1.0]).unwrap();
        assert_eq!(m.goodput.get(), 1.0, "nothing finished: nothing missed");
        let t0 = Instant::now();
        m.observe_finished(t0, false);
        m.observe_finished(t0 + Duration::from_secs(1), true);
        m.observe_finished(t0 + Duration::from_secs(2), true);
        m.observe_finished(t0 + Duration::from_secs(3), true);
        assert_eq!(m.goodput.get(), 0.75);
        // A minute later the miss has left the window.
        m.observe_finished(t0 + Duration::from_secs(61), true);
        assert_eq!(m.goodput.get(), 1.0);
        m.observe(BudgetKind::Cost, BudgetOutcome::Cut);
        assert_eq!(m.count(BudgetKind::Cost, BudgetOutcome::Cut), 1);
        assert_eq!(m.count(BudgetKind::Deadline, BudgetOutcome::Cut), 0);
        m.observe_queue(-3, 0.5);
        m.observe_queue(7, 0.5);
        m.observe_queue(9, 2.0);
        let count = |class: &str| m.queue_by_priority.with_label_values(&[class]).get_sample_count();
        assert_eq!((count("high"), count("default"), count("low")), (1, 0, 2));
    }
}
