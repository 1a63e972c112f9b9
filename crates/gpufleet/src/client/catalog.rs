//! `gpufleet providers ...` and `gpufleet models`.

use super::render::table;
use super::{print_json, Client};
use gpufleet_api::views::{InstanceTypeList, ModelList, ProviderList};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ProvidersCommand {
    /// List providers and their zones.
    List,
    /// List a provider's instance types.
    Types {
        /// Provider name, e.g. mock.
        name: String,
    },
}

pub async fn providers(client: &Client, cmd: ProvidersCommand) -> anyhow::Result<()> {
    match cmd {
        ProvidersCommand::List => {
            let list: ProviderList = client.get("/api/v1/providers").await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&["NAME", "ZONES", "TYPES"]);
            for p in &list.providers {
                let zones: Vec<&str> = p.zones.iter().map(|z| z.name.as_str()).collect();
                t.add_row(vec![
                    p.name.clone(),
                    zones.join(", "),
                    p.instance_type_count.to_string(),
                ]);
            }
            println!("{t}");
        }
        ProvidersCommand::Types { name } => {
            let list: InstanceTypeList = client
                .get(&format!("/api/v1/providers/{name}/instance-types"))
                .await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&[
                "TYPE", "GPU", "GPUS", "VRAM/GPU", "VCPUS", "RAM", "PRICE/H", "ZONES",
            ]);
            for it in &list.instance_types {
                t.add_row(vec![
                    it.name.clone(),
                    it.gpu.model.clone(),
                    it.gpu.count.to_string(),
                    format!("{} GiB", it.gpu.vram_mib / 1024),
                    it.vcpus.to_string(),
                    format!("{} GiB", it.ram_mib / 1024),
                    format!("{:.2} {}", it.price_per_hour, it.currency),
                    it.zones.join(", "),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

pub async fn models(client: &Client) -> anyhow::Result<()> {
    let list: ModelList = client.get("/api/v1/models").await?;
    if client.json {
        return print_json(&list);
    }
    let mut t = table(&["MODEL", "MIN VRAM", "READY", "DESCRIPTION"]);
    for m in &list.models {
        let vram = if m.min_vram_mib == 0 {
            "-".to_string()
        } else {
            format!("{} GiB", m.min_vram_mib / 1024)
        };
        t.add_row(vec![
            m.name.clone(),
            vram,
            m.ready_instances.to_string(),
            m.description.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
