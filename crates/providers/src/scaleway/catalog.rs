//! Scaleway's server products mapped to gpufleet's instance types.

use super::api::Product;
use gpufleet_domain::{GpuSpec, InstanceType, Zone};

/// The GPU's name as NVML reports it on the machine, from Scaleway's
/// `gpu_info.gpu_name` (and the commercial type, which tells SXM from PCIe).
pub fn nvml_gpu_name(scaleway_name: &str, commercial_type: &str) -> String {
    let sxm = commercial_type.to_ascii_uppercase().contains("SXM");
    match scaleway_name.to_ascii_uppercase().as_str() {
        "L4" => "NVIDIA L4".into(),
        "L40S" => "NVIDIA L40S".into(),
        "H100" if sxm => "NVIDIA H100 80GB HBM3".into(),
        "H100" => "NVIDIA H100 PCIe".into(),
        "H100-SXM" | "H100 SXM" => "NVIDIA H100 80GB HBM3".into(),
        "P100" => "Tesla P100-PCIE-16GB".into(),
        "" => "unknown".into(),
        other if other.starts_with("NVIDIA") || other.starts_with("TESLA") => {
            scaleway_name.to_string()
        }
        _ => format!("NVIDIA {scaleway_name}"),
    }
}

/// Board power limit of one GPU, watts (0 when gpufleet does not know it).
pub fn power_limit_w(nvml_name: &str) -> f64 {
    match nvml_name {
        "NVIDIA L4" => 72.0,
        "NVIDIA L40S" => 350.0,
        "NVIDIA H100 PCIe" => 350.0,
        "NVIDIA H100 80GB HBM3" => 700.0,
        "Tesla P100-PCIE-16GB" => 250.0,
        _ => 0.0,
    }
}

/// One product in one zone.
pub fn instance_type(name: &str, p: &Product, zone: &str) -> InstanceType {
    let (model, vram_mib) = match &p.gpu_info {
        Some(g) if p.gpu > 0 => (
            nvml_gpu_name(&g.gpu_name, name),
            g.gpu_memory / (1024 * 1024),
        ),
        _ => (String::new(), 0),
    };
    InstanceType {
        name: name.to_string(),
        gpu: GpuSpec {
            power_limit_w: power_limit_w(&model),
            model,
            count: p.gpu,
            vram_mib,
        },
        vcpus: p.ncpus,
        ram_mib: p.ram / (1024 * 1024),
        price_per_hour: p.hourly_price,
        currency: "EUR".into(),
        zones: vec![zone.to_string()],
    }
}

/// `fr-par-2` → "Paris 2".
pub fn zone(name: &str) -> Zone {
    let mut parts = name.split('-');
    let (_, city, n) = (parts.next(), parts.next(), parts.next());
    let city = match city {
        Some("par") => Some("Paris"),
        Some("ams") => Some("Amsterdam"),
        Some("waw") => Some("Warsaw"),
        Some("mil") => Some("Milan"),
        _ => None,
    };
    Zone {
        name: name.to_string(),
        description: match (city, n) {
            (Some(c), Some(n)) => format!("{c} {n}"),
            _ => name.to_string(),
        },
    }
}
