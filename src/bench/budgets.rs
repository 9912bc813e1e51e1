//! `bench serve`'s budgets: deadlines attached to every request (`--deadline-ms`,
//! `--ttft-deadline-ms`, sent as ferrite's body extras), and what became of them: requests the
//! server refused at admission (429 `deadline_infeasible`), requests a deadline cut
//! (`stop_reason` "deadline" or "ttft_deadline"), the share of admitted requests that met the
//! `--goodput` objectives (a cut request never does), and how far the server's first-token prediction
//! (`x-ferrite-ttft-estimate-ms`) was from the TTFT measured.

use clap::Args;
use serde_json::{json, Map, Value};

use super::request::Output;
use super::stats::percentile;

#[derive(Debug, Clone, Default, Args)]
pub struct BudgetArgs {
    /// Attach `deadline_ms` to every request: ferrite stops a generation there (ferrite's
    /// extra; other servers ignore it).
    #[arg(long, value_name = "MS")]
    pub deadline_ms: Option<f64>,
    /// Attach `ttft_deadline_ms` to every request: ferrite refuses at once (429) one it predicts
    /// cannot get its first token in time.
    #[arg(long, value_name = "MS")]
    pub ttft_deadline_ms: Option<f64>,
}

impl BudgetArgs {
    /// `body` without budgets: the initial test request and the warm-ups check the server and
    /// warm it, which a budget (refused or cut) would defeat.
    pub fn strip(mut body: Value) -> Value {
        if let Some(fields) = body.as_object_mut() {
            fields.remove("deadline_ms");
            fields.remove("ttft_deadline_ms");
        }
        body
    }

    pub fn apply(&self, body: &mut Value) {
        if let Some(ms) = self.deadline_ms {
            body["deadline_ms"] = json!(ms);
        }
        if let Some(ms) = self.ttft_deadline_ms {
            body["ttft_deadline_ms"] = json!(ms);
        }
    }
}

/// What the run's budgets came to.
#[derive(Debug, Default, PartialEq)]
pub struct BudgetReport {
    /// Refused at admission: their deadline could not be met.
    pub rejected: usize,
    /// Admitted and stopped by a deadline.
    pub cut: usize,
    /// Per admitted request the server predicted: predicted − measured TTFT, seconds.
    pub estimate_errors: Vec<f64>,
}

impl BudgetReport {
    pub fn of(outputs: &[Output]) -> Self {
        let mut report = BudgetReport::default();
        for o in outputs {
            if o.rejected {
                report.rejected += 1;
            }
            if Self::cut_by_deadline(o) {
                report.cut += 1;
            }
            if let (true, Some(predicted)) = (o.success, o.ttft_estimate) {
                report.estimate_errors.push(predicted - o.ttft);
            }
        }
        report
    }

    /// Whether a deadline stopped this request (its `stop_reason`).
    pub fn cut_by_deadline(o: &Output) -> bool {
        matches!(o.stop_reason.as_deref(), Some("deadline" | "ttft_deadline"))
    }

    /// The printed rows (`row` formats one) and the JSON keys; `met` is the share of admitted
    /// requests within the `--goodput` objectives, where there are some.
    pub fn report(
        &self,
        met: Option<f64>,
        row: impl Fn(&str, String) -> String,
        put: &mut Map<String, Value>,
    ) {
        println!("{}", row("Rejected at admission (429):", self.rejected.to_string()));
        println!("{}", row("Cut by a deadline:", self.cut.to_string()));
        put.insert("rejected_by_deadline".into(), json!(self.rejected));
        put.insert("cut_by_deadline".into(), json!(self.cut));
        if let Some(m) = met {
            println!("{}", row("Admitted meeting the SLOs (%):", format!("{:.1}", m * 100.0)));
            put.insert("admitted_goodput_ratio".into(), json!(m));
        }
        if self.estimate_errors.is_empty() {
            return;
        }
        let ms: Vec<f64> = self.estimate_errors.iter().map(|e| e * 1e3).collect();
        let abs: Vec<f64> = ms.iter().map(|e| e.abs()).collect();
        let (p50, p90, signed) = (percentile(&abs, 50.0), percentile(&abs, 90.0), percentile(&ms, 50.0));
        println!("{}", row("TTFT prediction |error| P50 (ms):", format!("{p50:.2}")));
        println!("{}", row("TTFT prediction |error| P90 (ms):", format!("{p90:.2}")));
        println!("{}", row("TTFT predicted - actual, median (ms):", format!("{signed:.2}")));
        put.insert("ttft_estimate_abs_error_p50_ms".into(), json!(p50));
        put.insert("ttft_estimate_abs_error_p90_ms".into(), json!(p90));
        put.insert("ttft_estimate_error_median_ms".into(), json!(signed));
        put.insert("ttft_estimate_count".into(), json!(ms.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_counts_refusals_cuts_and_prediction_errors() {
        let ok = |ttft: f64, estimate: Option<f64>, stop: Option<&str>| Output {
            success: true,
            ttft,
            ttft_estimate: estimate,
            stop_reason: stop.map(str::to_string),
            ..Output::default()
        };
        let outputs = [
            Output { rejected: true, ..Output::default() },
            ok(0.5, Some(0.75), None),
            ok(1.0, Some(0.5), Some("deadline")),
            ok(1.0, None, Some("ttft_deadline")),
            ok(1.0, None, Some("\n")),
        ];
        let r = BudgetReport::of(&outputs);
        assert_eq!((r.rejected, r.cut), (1, 2));
        assert_eq!(r.estimate_errors, vec![0.25, -0.5]);
        let mut body = json!({"model": "m"});
        BudgetArgs { deadline_ms: Some(2000.0), ttft_deadline_ms: None }.apply(&mut body);
        assert_eq!(body, json!({"model": "m", "deadline_ms": 2000.0}));
        assert_eq!(BudgetArgs::strip(body), json!({"model": "m"}));
    }
}
