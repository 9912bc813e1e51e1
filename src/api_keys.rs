//! `--api-keys-file`: API keys, each with budgets for the requests that set none, so a gateway
//! need not add them to every request (a batch key at a low priority and a cost cap, an
//! interactive one with a first-token deadline). A TOML file:
//!
//! ```toml
//! [[keys]]
//! key = "sk-batch-..."
//! priority = 10
//! max_cost_usd = 0.01
//!
//! [[keys]]
//! key = "sk-agent-..."
//! ttft_deadline_ms = 1500
//! ```
//!
//! Its keys are accepted beside `--api-key`'s. A request's own fields and headers win over its
//! key's budgets, which win over the model's (models.toml).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrite_server::budgets::BudgetDefaults;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    priority: Option<i32>,
    deadline_ms: Option<f64>,
    ttft_deadline_ms: Option<f64>,
    max_cost_usd: Option<f64>,
}

/// What the server needs to check a key's budgets against at start.
pub struct Honoured {
    /// `--scheduling-policy priority`: a nonzero default priority means something.
    pub priorities: bool,
    /// A device price is set: a default cost cap can be measured.
    pub priced: bool,
}

/// The keys of `text` (read from `origin`) and their budgets, checked (`honoured`: against
/// the server's policy and price too).
pub fn parse(text: &str, origin: &str, honoured: &Honoured) -> Result<HashMap<String, BudgetDefaults>> {
    let file: KeysFile = toml::from_str(text).with_context(|| format!("reading {origin}"))?;
    let mut keys = HashMap::new();
    for (i, e) in file.keys.into_iter().enumerate() {
        let which = format!("{origin}: keys[{i}]");
        if e.key.trim().is_empty() || e.key.chars().any(char::is_whitespace) || e.key.contains(',') {
            bail!("{which}: `key` must be non-empty, without spaces or commas");
        }
        let budgets = BudgetDefaults {
            priority: e.priority,
            deadline_ms: e.deadline_ms,
            ttft_deadline_ms: e.ttft_deadline_ms,
            max_cost_usd: e.max_cost_usd,
        };
        budgets.check().map_err(|why| anyhow::anyhow!("{which}: {why}"))?;
        if budgets.priority.is_some_and(|p| p != 0) && !honoured.priorities {
            bail!("{which} sets a priority, which only --scheduling-policy priority honours");
        }
        if budgets.max_cost_usd.is_some() && !honoured.priced {
            bail!("{which} sets max_cost_usd, which needs a device price (--device-cost-per-hour)");
        }
        if keys.insert(e.key, budgets).is_some() {
            bail!("{which}: this key is listed twice");
        }
    }
    Ok(keys)
}

/// [`parse`] of the file at `path`.
pub fn load(path: &Path, honoured: &Honoured) -> Result<HashMap<String, BudgetDefaults>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --api-keys-file {}", path.display()))?;
    parse(&text, &path.display().to_string(), honoured)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Honoured = Honoured { priorities: true, priced: true };

    #[test]
    fn keys_parse_with_their_budgets() {
        let text = "[[keys]]\nkey = \"sk-a\"\npriority = 10\nmax_cost_usd = 0.01\n\n[[keys]]\nkey = \"sk-b\"\nttft_deadline_ms = 1500\n";
        let keys = parse(text, "keys.toml", &ALL).unwrap();
        assert_eq!(
            keys["sk-a"],
            BudgetDefaults { priority: Some(10), max_cost_usd: Some(0.01), ..Default::default() }
        );
        assert_eq!(keys["sk-b"].ttft_deadline_ms, Some(1500.0));
    }

    #[test]
    fn wrong_entries_are_named() {
        let cases = [
            ("[[keys]]\nkey = \"\"\n", ALL, "keys[0]: `key` must be non-empty"),
            ("[[keys]]\nkey = \"a\"\n[[keys]]\nkey = \"a\"\n", ALL, "keys[1]: this key is listed twice"),
            ("[[keys]]\nkey = \"a\"\ndeadline_ms = 0\n", ALL, "keys[0]: `deadline_ms` must be"),
            ("[[keys]]\nkey = \"a\"\nbudget = 1\n", ALL, "unknown field `budget`"),
            (
                "[[keys]]\nkey = \"a\"\npriority = 3\n",
                Honoured { priorities: false, priced: true },
                "only --scheduling-policy priority",
            ),
            (
                "[[keys]]\nkey = \"a\"\nmax_cost_usd = 1.0\n",
                Honoured { priorities: true, priced: false },
                "needs a device price",
            ),
        ];
        for (text, honoured, want) in cases {
            let e = format!("{:#}", parse(text, "keys.toml", &honoured).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
