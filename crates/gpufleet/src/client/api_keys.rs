//! `gpufleet api-keys create|list|revoke`: keys of the OpenAI-compatible
//! endpoint (`/v1/...`).

use super::render::table;
use super::{print_json, Client};
use gpufleet_api::api_keys::{ApiKeyList, ApiKeyView, CreateApiKeyBody, CreatedApiKey};
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
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key.
    Revoke {
        /// Key id (`ak-...`).
        id: String,
    },
}

fn models_text(k: &ApiKeyView) -> String {
    k.models
        .as_ref()
        .map(|m| m.join(", "))
        .unwrap_or_else(|| "(all)".to_string())
}

pub async fn run(client: &Client, cmd: ApiKeysCommand) -> anyhow::Result<()> {
    match cmd {
        ApiKeysCommand::Create { name, models } => {
            let body = CreateApiKeyBody {
                name,
                models: (!models.is_empty()).then_some(models),
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
            let mut t = table(&["ID", "NAME", "MODELS", "CREATED", "REVOKED"]);
            for k in &list.api_keys {
                t.add_row(vec![
                    k.id.clone(),
                    k.name.clone(),
                    models_text(k),
                    k.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    k.revoked_at
                        .map(|r| r.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
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
