//! `gpufleet api-keys create|list|limits|revoke`: keys of the
//! OpenAI-compatible endpoint (`/v1/...`) and their limits.

use super::render::table;
use super::{print_json, Client};
use gpufleet_api::api_keys::{
    ApiKeyList, ApiKeyView, CreateApiKeyBody, CreatedApiKey, PatchApiKeyBody,
};
use reqwest::Method;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ApiKeysCommand {
    /// Create a key; its secret is printed this once.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// A model the key may use (repeat for several); none: every model.
        #[arg(long = "model")]
        models: Vec<String>,
        /// The project it belongs to (it reaches that project's instances).
        #[arg(long)]
        project: Option<String>,
        /// Requests per minute at most.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens (prompt and completion) per minute at most.
        #[arg(long)]
        tpm: Option<u64>,
        /// What the key may be charged per calendar month (UTC).
        #[arg(long)]
        budget: Option<f64>,
    },
    /// List keys (never their secrets), with their limits and this month's charges.
    List,
    /// Change a key's limits: a number, or `none` to remove one; the
    /// limits not given stay as they are.
    Limits {
        /// Key id (`ak-...`).
        id: String,
        /// Requests per minute, or `none`.
        #[arg(long)]
        rpm: Option<Limit<u64>>,
        /// Tokens per minute, or `none`.
        #[arg(long)]
        tpm: Option<Limit<u64>>,
        /// Budget per calendar month, or `none`.
        #[arg(long)]
        budget: Option<Limit<f64>>,
    },
    /// Revoke a key.
    Revoke {
        /// Key id (`ak-...`).
        id: String,
    },
}

/// A limit on the command line: a number, or `none` (no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit<T>(pub Option<T>);

impl<T: std::str::FromStr> std::str::FromStr for Limit<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Limit(None));
        }
        s.parse()
            .map(|v| Limit(Some(v)))
            .map_err(|e| format!("{e} (a number, or `none` for no limit)"))
    }
}

fn limit_text<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn models_text(k: &ApiKeyView) -> String {
    k.models
        .as_ref()
        .map(|m| m.join(", "))
        .unwrap_or_else(|| "(all)".to_string())
}

pub async fn run(client: &Client, cmd: ApiKeysCommand) -> anyhow::Result<()> {
    match cmd {
        ApiKeysCommand::Create {
            name,
            models,
            project,
            rpm,
            tpm,
            budget,
        } => {
            let body = CreateApiKeyBody {
                name,
                models: (!models.is_empty()).then_some(models),
                project,
                rpm,
                tpm,
                monthly_budget: budget,
            };
            let created: CreatedApiKey = client.post("/api/v1/api-keys", &body).await?;
            if client.json {
                return print_json(&created);
            }
            println!(
                "created API key {} ({})",
                created.api_key.id, created.api_key.name
            );
            println!("models: {}", models_text(&created.api_key));
            println!("key: {}", created.key);
            println!(
                "(the key is shown only now; send it as `Authorization: Bearer <key>` to /v1/...)"
            );
        }
        ApiKeysCommand::List => {
            let list: ApiKeyList = client.get("/api/v1/api-keys").await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&[
                "ID", "NAME", "PROJECT", "MODELS", "RPM", "TPM", "BUDGET", "SPENT", "CREATED",
                "REVOKED",
            ]);
            for k in &list.api_keys {
                t.add_row(vec![
                    k.id.clone(),
                    k.name.clone(),
                    k.project_id.to_string(),
                    models_text(k),
                    limit_text(k.rpm),
                    limit_text(k.tpm),
                    limit_text(k.monthly_budget),
                    format!("{:.4}", k.spent_this_month),
                    k.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    k.revoked_at
                        .map(|r| r.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        ApiKeysCommand::Limits {
            id,
            rpm,
            tpm,
            budget,
        } => {
            let body = PatchApiKeyBody {
                rpm: rpm.map(|l| l.0),
                tpm: tpm.map(|l| l.0),
                monthly_budget: budget.map(|l| l.0),
            };
            let k: ApiKeyView = client
                .send(
                    client
                        .request(Method::PATCH, &format!("/api/v1/api-keys/{id}"))
                        .json(&body),
                )
                .await?;
            if client.json {
                return print_json(&k);
            }
            println!(
                "API key {} ({}): rpm {}, tpm {}, monthly budget {} (spent {:.4} this month)",
                k.id,
                k.name,
                limit_text(k.rpm),
                limit_text(k.tpm),
                limit_text(k.monthly_budget),
                k.spent_this_month
            );
        }
        ApiKeysCommand::Revoke { id } => {
            let k: ApiKeyView = client
                .send(client.request(Method::DELETE, &format!("/api/v1/api-keys/{id}")))
                .await?;
            if client.json {
                return print_json(&k);
            }
            println!("revoked API key {} ({})", k.id, k.name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_numbers_or_none_and_only_those_given_are_sent() {
        assert_eq!("60".parse::<Limit<u64>>(), Ok(Limit(Some(60))));
        assert_eq!("none".parse::<Limit<u64>>(), Ok(Limit(None)));
        assert_eq!("2.5".parse::<Limit<f64>>(), Ok(Limit(Some(2.5))));
        assert!("-1".parse::<Limit<u64>>().unwrap_err().contains("none"));
        let body = PatchApiKeyBody {
            rpm: Some(Limit(Some(60)).0),
            tpm: None,
            monthly_budget: Some(Limit::<f64>(None).0),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"rpm": 60, "monthly_budget": null})
        );
    }
}
