//! A request's budgets, from its body (`deadline_ms`, `ttft_deadline_ms`, `max_cost_usd`) and
//! from headers a gateway may add (`x-ferrite-deadline-ms`, `x-ferrite-ttft-deadline-ms`,
//! `x-ferrite-max-cost-usd`). Where both give one, the tighter applies: each is a limit, and
//! neither side may loosen the other's.

use std::time::Duration;

use axum::http::HeaderMap;
use ferrite_engine::{Deadlines, Request};

use crate::error::ApiError;
use crate::openai::SamplingFields;
use crate::validate::SamplingDefaults;

/// The longest deadline taken: a day (a budget is for answers someone waits for).
const MAX_DEADLINE_MS: f64 = 86_400_000.0;

/// `ms` as a budget, or a 400 naming `param` (a body field or a header).
fn budget(param: &str, ms: f64) -> Result<Duration, ApiError> {
    if !(ms.is_finite() && ms > 0.0 && ms <= MAX_DEADLINE_MS) {
        let message = format!(
            "`{param}` must be a number of milliseconds above 0 and at most {MAX_DEADLINE_MS}, got {ms}"
        );
        return Err(ApiError::invalid(Some(param), message));
    }
    Ok(Duration::from_secs_f64(ms / 1e3))
}

/// The deadlines a body asks for, or the model's defaults for those it leaves out.
pub fn from_fields(f: &SamplingFields, defaults: &SamplingDefaults) -> Result<Deadlines, ApiError> {
    let total = f.deadline_ms.or(defaults.deadline_ms);
    let first_token = f.ttft_deadline_ms.or(defaults.ttft_deadline_ms);
    Ok(Deadlines {
        total: total.map(|ms| budget("deadline_ms", ms)).transpose()?,
        first_token: first_token.map(|ms| budget("ttft_deadline_ms", ms)).transpose()?,
    })
}

/// Budgets for the requests that set none: an API key's (`--api-keys-file`), above the model's.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetDefaults {
    pub priority: Option<i32>,
    pub deadline_ms: Option<f64>,
    pub ttft_deadline_ms: Option<f64>,
    pub max_cost_usd: Option<f64>,
}

impl BudgetDefaults {
    /// What is wrong with these values, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let ms = [("deadline_ms", self.deadline_ms), ("ttft_deadline_ms", self.ttft_deadline_ms)];
        for (name, v) in ms {
            if let Some(v) = v {
                budget(name, v).map_err(|e| e.message)?;
            }
        }
        if let Some(c) = self.max_cost_usd.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(format!("`max_cost_usd` must be a positive number of dollars, got {c}"));
        }
        Ok(())
    }

    /// `model`'s defaults with these above them.
    pub fn over(&self, model: &SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            priority: self.priority.or(model.priority),
            deadline_ms: self.deadline_ms.or(model.deadline_ms),
            ttft_deadline_ms: self.ttft_deadline_ms.or(model.ttft_deadline_ms),
            max_cost_usd: self.max_cost_usd.or(model.max_cost_usd),
            ..model.clone()
        }
    }
}

/// The budgets of the API key a request came with, put there by the key check.
#[derive(Debug, Clone, Copy)]
pub struct KeyBudgets(pub BudgetDefaults);

/// Budgets set by headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeaderBudgets {
    pub deadlines: Deadlines,
    pub max_cost_usd: Option<f64>,
}

pub const DEADLINE_HEADER: &str = "x-ferrite-deadline-ms";
pub const TTFT_DEADLINE_HEADER: &str = "x-ferrite-ttft-deadline-ms";
pub const MAX_COST_HEADER: &str = "x-ferrite-max-cost-usd";

/// The number a header holds, if it is there; a 400 naming the header when it is not one.
fn number(headers: &HeaderMap, name: &str) -> Result<Option<f64>, ApiError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    let text = value.to_str().unwrap_or("").trim();
    text.parse::<f64>().map(Some).map_err(|_| {
        ApiError::invalid(Some(name), format!("header `{name}` must be a number, got {:?}", value))
    })
}

impl HeaderBudgets {
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let max_cost_usd = number(headers, MAX_COST_HEADER)?;
        if let Some(cap) = max_cost_usd.filter(|c| !(c.is_finite() && *c > 0.0)) {
            let message =
                format!("header `{MAX_COST_HEADER}` must be a positive number of dollars, got {cap}");
            return Err(ApiError::invalid(Some(MAX_COST_HEADER), message));
        }
        Ok(Self {
            deadlines: Deadlines {
                total: number(headers, DEADLINE_HEADER)?.map(|ms| budget(DEADLINE_HEADER, ms)).transpose()?,
                first_token: number(headers, TTFT_DEADLINE_HEADER)?
                    .map(|ms| budget(TTFT_DEADLINE_HEADER, ms))
                    .transpose()?,
            },
            max_cost_usd,
        })
    }

    /// Tightens `request`'s budgets to these.
    pub fn apply(&self, request: &mut Request) {
        let d = &mut request.deadlines;
        d.total = tighter(d.total, self.deadlines.total);
        d.first_token = tighter(d.first_token, self.deadlines.first_token);
        let cost = &mut request.sampling.max_cost_usd;
        *cost = tighter(*cost, self.max_cost_usd);
    }
}

/// The smaller of two limits, where both are set.
fn tighter<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b < a { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn headers_tighten_the_body_and_never_loosen_it() {
        let mut headers = HeaderMap::new();
        headers.insert(DEADLINE_HEADER, HeaderValue::from_static("1500"));
        headers.insert(MAX_COST_HEADER, HeaderValue::from_static("0.5"));
        let budgets = HeaderBudgets::from_headers(&headers).unwrap();
        let mut request = Request {
            request_id: "r".into(),
            prompt_token_ids: vec![1],
            sampling: Default::default(),
            detokenize: Default::default(),
            max_tokens: 1,
            n: 1,
            prompt_logprobs: None,
            grammar: None,
            arrival: std::time::Instant::now(),
            priority: 0,
            deadlines: Deadlines {
                total: Some(Duration::from_secs(1)),
                first_token: Some(Duration::from_millis(200)),
            },
        };
        request.sampling.max_cost_usd = Some(2.0);
        budgets.apply(&mut request);
        assert_eq!(request.deadlines.total, Some(Duration::from_secs(1)), "the body's is tighter");
        assert_eq!(request.deadlines.first_token, Some(Duration::from_millis(200)), "no header: kept");
        assert_eq!(request.sampling.max_cost_usd, Some(0.5), "the header's is tighter");
        request.deadlines.total = None;
        budgets.apply(&mut request);
        assert_eq!(request.deadlines.total, Some(Duration::from_millis(1500)), "the header's alone");
    }

    #[test]
    fn a_bad_budget_is_named() {
        for (name, value, want) in [
            (DEADLINE_HEADER, "soon", "must be a number"),
            (TTFT_DEADLINE_HEADER, "0", "above 0"),
            (DEADLINE_HEADER, "1e12", "at most 86400000"),
            (MAX_COST_HEADER, "-1", "positive number of dollars"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            let e = HeaderBudgets::from_headers(&headers).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(name));
            assert!(e.message.contains(want) && e.message.contains(name), "{}", e.message);
        }
        let fields = SamplingFields { ttft_deadline_ms: Some(f64::NAN), ..Default::default() };
        let e = from_fields(&fields, &SamplingDefaults::default()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("ttft_deadline_ms"));
        // A model's default fills what the body leaves out, never what it gives.
        let defaults = SamplingDefaults {
            deadline_ms: Some(500.0),
            ttft_deadline_ms: Some(100.0),
            ..Default::default()
        };
        let fields = SamplingFields { ttft_deadline_ms: Some(250.0), ..Default::default() };
        let d = from_fields(&fields, &defaults).unwrap();
        assert_eq!(
            (d.total, d.first_token),
            (Some(Duration::from_millis(500)), Some(Duration::from_millis(250)))
        );
    }
}
