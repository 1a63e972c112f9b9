mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn next_link(link: &str) -> Option<String> {
    link.split(',')
        .find(|l| l.contains("rel=\"next\""))
        .and_then(|l| l.split(['<', '>']).nth(1))
        .map(str::to_string)
}

#[tokio::test]
async fn products_page_by_link_and_total_count() {
    let env = start(|_| {}).await;
    let first = env.get(&format!("{Z}/products/servers")).await;
    assert_eq!(first.status, StatusCode::OK);
    let total: usize = first.headers["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(total, 135, "fr-par-2's recorded catalog");
    assert_eq!(
        first.headers["link"].to_str().unwrap(),
        "</products/servers?page=2&per_page=50&>; rel=\"next\",</products/servers?page=3&per_page=50&>; rel=\"last\""
    );
    assert_eq!(first.json()["servers"].as_object().unwrap().len(), 50);

    // Walk every page by its Link header.
    let mut names = Vec::new();
    let mut path = format!("{Z}/products/servers?per_page=50");
    loop {
        let a = env.get(&path).await;
        assert_eq!(a.status, StatusCode::OK);
        names.extend(a.json()["servers"].as_object().unwrap().keys().cloned());
        match next_link(a.headers["link"].to_str().unwrap()) {
            Some(rel) => path = format!("{Z}{rel}"),
            None => break,
        }
    }
    assert_eq!(names.len(), total);
    for t in ["L4-1-24G", "H100-1-80G", "L40S-1-48G"] {
        assert!(names.iter().any(|n| n == t), "{t} in the catalog");
    }
    let page3 = env.get(&format!("{Z}/products/servers?page=3")).await;
    assert!(page3.headers["link"].to_str().unwrap().starts_with(
        "</products/servers?page=1&per_page=50&>; rel=\"first\",</products/servers?page=2&per_page=50&>; rel=\"previous\""
    ));
    let h100 = &env
        .get(&format!("{Z}/products/servers?page=1&per_page=100"))
        .await
        .json()["servers"]["H100-1-80G"];
    assert_eq!(h100["gpu"], 1);
    assert_eq!(h100["gpu_info"]["gpu_name"], "H100-PCIe");

    let big = env.get(&format!("{Z}/products/servers?per_page=101")).await;
    assert_eq!(big.status, StatusCode::BAD_REQUEST);
    assert_eq!(big.json()["type"], "invalid_arguments");
    assert_eq!(big.json()["details"][0]["argument_name"], "per_page");

    env.emu.faults().set_availability(
        "H100-1-80G",
        gpufleet_scaleway_emulator::Availability::Shortage,
    );
    let av = env
        .get(&format!("{Z}/products/servers/availability?per_page=100"))
        .await;
    assert_eq!(av.headers["x-total-count"], "135");
    let av2 = env
        .get(&format!(
            "{Z}/products/servers/availability?page=1&per_page=100"
        ))
        .await
        .json();
    let av2b = env
        .get(&format!(
            "{Z}/products/servers/availability?page=2&per_page=100"
        ))
        .await
        .json();
    let h = av2["servers"]["H100-1-80G"].clone();
    let h = if h.is_null() {
        av2b["servers"]["H100-1-80G"].clone()
    } else {
        h
    };
    assert_eq!(h, json!({"availability": "shortage"}));
    assert_eq!(
        av2["servers"]["B300-SXM-2-288G"],
        json!({"availability": "available"})
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn auth_and_not_found_bodies() {
    let env = start(|_| {}).await;
    let none = env
        .http
        .get(env.url(&format!("{Z}/servers")))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let body: Value = none.json().await.unwrap();
    assert_eq!(
        body,
        json!({"type": "denied_authentication", "message": "authentication is denied", "method": "api_key", "reason": "invalid_argument"})
    );
    let wrong = env
        .http
        .get(env.url(&format!("{Z}/servers")))
        .header("X-Auth-Token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json::<Value>().await.unwrap()["reason"], "not_found");

    let id = "9c2e0c4a-7a87-4b0e-a0c4-7b0d3b8d2f10";
    let a = env.get(&format!("{Z}/servers/{id}")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.text,
        r#"{"type": "not_found", "message": "resource is not found", "resource": "instance_server", "resource_id": "9c2e0c4a-7a87-4b0e-a0c4-7b0d3b8d2f10"}"#
    );
    assert_eq!(
        env.get(&format!("{Z}/ips/{id}")).await.json()["resource"],
        "instance_ip"
    );
    assert_eq!(
        env.get(&format!("/block/v1/zones/fr-par-2/volumes/{id}"))
            .await
            .json()["resource"],
        "volume"
    );
    // The marketplace is public.
    let m = env
        .http
        .get(env.url("/marketplace/v2/local-images?image_label=ubuntu_jammy_gpu_os_12&zone=fr-par-2&type=instance_sbs"))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), StatusCode::OK);
    let m: Value = m.json().await.unwrap();
    assert_eq!(m["total_count"], 1);
    assert_eq!(m["local_images"][0]["label"], "ubuntu_jammy_gpu_os_12");
    assert_eq!(m["local_images"][0]["zone"], "fr-par-2");
    assert!(m["local_images"][0]["compatible_commercial_types"]
        .as_array()
        .unwrap()
        .contains(&json!("H100-1-80G")));
    env.emu.shutdown().await;
}

#[tokio::test]
async fn server_life_cycle_with_timings() {
    let env = start(|c| {
        c.timings.boot = Duration::from_millis(300);
        c.timings.stop = Duration::from_millis(300);
    })
    .await;
    let image = "8063548b-7ade-4faa-8be1-f48f8d3ba3ea";
    let a = env
        .post(
            &format!("{Z}/servers"),
            json!({"name": "gpu-1", "commercial_type": "L4-1-24G", "image": image, "project": PROJECT,
                   "tags": ["gpufleet", "cluster=c1"], "dynamic_ip_required": false, "routed_ip_enabled": true,
                   "volumes": {"0": {"boot": false, "volume_type": "sbs_volume", "size": 50_000_000_000u64}}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let s = a.json()["server"].clone();
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(
        a.headers["location"].to_str().unwrap(),
        env.url(&format!("{Z}/servers/{id}"))
    );
    assert_eq!(s["state"], "stopped");
    assert_eq!(s["allowed_actions"], json!(["poweron", "backup"]));
    assert_eq!(s["project"], PROJECT);
    assert_eq!(s["organization"], PROJECT);
    assert_eq!(s["tags"], json!(["gpufleet", "cluster=c1"]));
    assert_eq!(s["image"]["id"], image);
    assert_eq!(s["volumes"]["0"]["volume_type"], "sbs_volume");
    assert!(s["creation_date"].as_str().unwrap().ends_with("+00:00"));
    let vol_id = s["volumes"]["0"]["id"].as_str().unwrap();
    let vol = env
        .get(&format!("/block/v1/zones/fr-par-2/volumes/{vol_id}"))
        .await
        .json();
    assert_eq!(vol["size"], 50_000_000_000u64);
    assert_eq!(vol["status"], "in_use");
    assert_eq!(vol["references"][0]["product_resource_id"], id.as_str());

    // Not stopped → DELETE refused.
    let t0 = Instant::now();
    let on = env.action(&id, "poweron").await;
    assert_eq!(on.status, StatusCode::ACCEPTED);
    assert_eq!(on.json()["task"]["status"], "pending");
    assert_eq!(on.json()["task"]["href_result"], format!("/servers/{id}"));
    let s = env.get(&format!("{Z}/servers/{id}")).await.json()["server"].clone();
    assert_eq!(s["state"], "starting");
    assert_eq!(s["state_detail"], "allocating node");
    let del = env
        .call(Method::DELETE, &format!("{Z}/servers/{id}"), None)
        .await;
    assert_eq!(del.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        del.json(),
        json!({"type": "invalid_request_error", "message": "server should be stopped"})
    );
    let again = env.action(&id, "poweron").await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);

    env.wait_state(&id, Some("running")).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "boot delay honoured"
    );
    let s = env.get(&format!("{Z}/servers/{id}")).await.json()["server"].clone();
    assert_eq!(
        s["allowed_actions"],
        json!(["poweroff", "terminate", "reboot", "stop_in_place", "backup"])
    );
    assert!(s["location"].is_object());

    let off = env.action(&id, "poweroff").await;
    assert_eq!(off.status, StatusCode::ACCEPTED);
    assert_eq!(env.server_state(&id).await.as_deref(), Some("stopping"));
    env.wait_state(&id, Some("stopped")).await;

    // Rename and retag.
    let p = env
        .call(
            Method::PATCH,
            &format!("{Z}/servers/{id}"),
            Some(json!({"name": "gpu-1b", "tags": ["x"]})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.json()["server"]["name"], "gpu-1b");
    assert_eq!(p.json()["server"]["tags"], json!(["x"]));

    let del = env
        .call(Method::DELETE, &format!("{Z}/servers/{id}"), None)
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(env.server_state(&id).await, None);
    // Its SBS volume survives, detached.
    let vol = env
        .get(&format!("/block/v1/zones/fr-par-2/volumes/{vol_id}"))
        .await
        .json();
    assert_eq!(vol["status"], "available");
    assert_eq!(vol["references"], json!([]));
    env.emu.shutdown().await;
}

#[tokio::test]
async fn terminate_deletes_the_server_and_keeps_sbs_volumes() {
    let env = start(|c| {
        c.timings.stop = Duration::from_millis(100);
        c.timings.delete = Duration::from_millis(100);
    })
    .await;
    let s = env
        .create_server(json!({"name": "t", "commercial_type": "H100-1-80G", "image": "ubuntu_jammy_gpu_os_12"}))
        .await;
    let id = s["id"].as_str().unwrap();
    let vol = s["volumes"]["0"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        env.action(id, "terminate").await.status,
        StatusCode::BAD_REQUEST,
        "stopped: terminate refused"
    );
    env.action(id, "poweron").await;
    env.wait_state(id, Some("running")).await;
    assert_eq!(
        env.action(id, "terminate").await.status,
        StatusCode::ACCEPTED
    );
    let s = env.get(&format!("{Z}/servers/{id}")).await.json()["server"].clone();
    assert_eq!(s["state"], "stopping");
    assert_eq!(s["state_detail"], "terminating");
    env.wait_state(id, None).await;
    let v = env
        .get(&format!("/block/v1/zones/fr-par-2/volumes/{vol}"))
        .await
        .json();
    assert_eq!(v["status"], "available");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn user_data_is_text_plain() {
    let env = start(|_| {}).await;
    let s = env
        .create_server(json!({"name": "u", "commercial_type": "DEV1-S"}))
        .await;
    let id = s["id"].as_str().unwrap();
    let ud = "#cloud-config\nruncmd:\n  - [echo, hi]\n";
    let r = env
        .http
        .patch(env.url(&format!("{Z}/servers/{id}/user_data/cloud-init")))
        .header("X-Auth-Token", KEY)
        .header("Content-Type", "text/plain")
        .body(ud)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let bad = env
        .http
        .patch(env.url(&format!("{Z}/servers/{id}/user_data/other")))
        .header("X-Auth-Token", KEY)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        env.get(&format!("{Z}/servers/{id}/user_data")).await.json(),
        json!({"user_data": ["cloud-init"]})
    );
    let got = env
        .get(&format!("{Z}/servers/{id}/user_data/cloud-init"))
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-type"], "text/plain");
    assert_eq!(got.text, ud);
    let d = env
        .call(
            Method::DELETE,
            &format!("{Z}/servers/{id}/user_data/cloud-init"),
            None,
        )
        .await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert_eq!(
        env.get(&format!("{Z}/servers/{id}/user_data")).await.json(),
        json!({"user_data": []})
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn routed_ips_attach_and_show_in_public_ips() {
    let env = start(|c| c.ip_pool = "127.91.0.0/24".into()).await;
    let ip = env
        .post(
            &format!("{Z}/ips"),
            json!({"project": PROJECT, "type": "routed_ipv4", "tags": ["gpufleet"]}),
        )
        .await;
    assert_eq!(ip.status, StatusCode::CREATED);
    let ip = ip.json()["ip"].clone();
    assert_eq!(ip["type"], "routed_ipv4");
    assert_eq!(ip["state"], "detached");
    assert_eq!(ip["server"], Value::Null);
    let addr = ip["address"].as_str().unwrap().to_string();
    assert!(addr.starts_with("127.91.0."), "{addr}");
    let ip_id = ip["id"].as_str().unwrap().to_string();

    let s = env
        .create_server(json!({"name": "a", "commercial_type": "L4-1-24G"}))
        .await;
    let sid = s["id"].as_str().unwrap();
    assert_eq!(s["public_ip"], Value::Null);
    let p = env
        .call(
            Method::PATCH,
            &format!("{Z}/ips/{ip_id}"),
            Some(json!({"server": sid})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.json()["ip"]["state"], "attached");
    assert_eq!(p.json()["ip"]["server"], json!({"id": sid, "name": "a"}));
    let s = env.get(&format!("{Z}/servers/{sid}")).await.json()["server"].clone();
    assert_eq!(s["public_ips"][0]["address"], addr.as_str());
    assert_eq!(s["public_ips"][0]["id"], ip_id.as_str());
    assert_eq!(s["public_ip"]["address"], addr.as_str());

    // At create time, and never handed out twice.
    let ip2 = env.post(&format!("{Z}/ips"), json!({})).await.json()["ip"].clone();
    assert_ne!(ip2["address"], addr.as_str());
    let s2 = env
        .create_server(
            json!({"name": "b", "commercial_type": "L4-1-24G", "public_ips": [ip2["id"]]}),
        )
        .await;
    assert_eq!(s2["public_ips"][0]["address"], ip2["address"]);
    let taken = env
        .post(
            &format!("{Z}/servers"),
            json!({"name": "c", "commercial_type": "L4-1-24G", "public_ips": [ip2["id"]]}),
        )
        .await;
    assert_eq!(taken.status, StatusCode::BAD_REQUEST);

    // Tags filter on IPs; detach.
    let l = env.get(&format!("{Z}/ips?tags=gpufleet")).await;
    assert_eq!(l.headers["x-total-count"], "1");
    assert_eq!(l.json()["ips"][0]["id"], ip_id.as_str());
    let d = env
        .call(
            Method::PATCH,
            &format!("{Z}/ips/{ip_id}"),
            Some(json!({"server": null})),
        )
        .await;
    assert_eq!(d.json()["ip"]["state"], "detached");
    let s = env.get(&format!("{Z}/servers/{sid}")).await.json()["server"].clone();
    assert_eq!(s["public_ips"], json!([]));
    assert_eq!(
        env.call(Method::DELETE, &format!("{Z}/ips/{ip_id}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        env.get(&format!("{Z}/ips/{ip_id}")).await.status,
        StatusCode::NOT_FOUND
    );

    // A /24 has 254 addresses; all distinct while in use.
    let mut seen = std::collections::BTreeSet::new();
    for ip in env.emu.ips() {
        assert!(seen.insert(ip.address));
    }
    env.emu.shutdown().await;
}

#[tokio::test]
async fn servers_list_filters_by_all_tags_and_pages() {
    let env = start(|_| {}).await;
    for i in 0..5 {
        let tags = if i % 2 == 0 {
            json!(["gpufleet", "cluster=a"])
        } else {
            json!(["gpufleet"])
        };
        env.create_server(
            json!({"name": format!("s{i}"), "commercial_type": "DEV1-S", "tags": tags}),
        )
        .await;
    }
    let both = env
        .get(&format!("{Z}/servers?tags=gpufleet,cluster=a"))
        .await;
    assert_eq!(both.headers["x-total-count"], "3");
    let names: Vec<String> = both.json()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["s4", "s2", "s0"], "newest first");
    let one = env
        .get(&format!("{Z}/servers?tags=gpufleet&per_page=2&page=3"))
        .await;
    assert_eq!(one.headers["x-total-count"], "5");
    assert_eq!(one.json()["servers"].as_array().unwrap().len(), 1);
    assert_eq!(
        one.headers["link"].to_str().unwrap(),
        "</servers?page=1&per_page=2&tags=gpufleet&>; rel=\"first\",</servers?page=2&per_page=2&tags=gpufleet&>; rel=\"previous\",</servers?page=3&per_page=2&tags=gpufleet&>; rel=\"last\""
    );
    assert_eq!(
        env.get(&format!("{Z}/servers?name=s3")).await.headers["x-total-count"],
        "1"
    );
    assert_eq!(
        env.get(&format!("{Z}/servers?state=running")).await.headers["x-total-count"],
        "0"
    );
    assert_eq!(
        env.get(&format!("{Z}/servers?tags=nope")).await.json()["servers"],
        json!([])
    );
    // Other zones are separate.
    assert_eq!(
        env.get("/instance/v1/zones/fr-par-1/servers").await.headers["x-total-count"],
        "0"
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn block_volume_life_cycle() {
    let env = start(|c| c.timings.volume_create = Duration::from_millis(200)).await;
    let v = env
        .post(
            "/block/v1/zones/fr-par-2/volumes",
            json!({"name": "models", "perf_iops": 5000, "project_id": PROJECT, "from_empty": {"size": 20_000_000_000u64}, "tags": ["gpufleet", "models"]}),
        )
        .await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.text);
    let v = v.json();
    assert_eq!(v["status"], "creating");
    assert_eq!(v["type"], "sbs_5k");
    assert_eq!(v["specs"], json!({"perf_iops": 5000, "class": "sbs"}));
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/block/v1/zones/fr-par-2/volumes/{id}");
    poll(Duration::from_secs(5), || async {
        env.get(&path).await.json()["status"] == "available"
    })
    .await;

    let l = env
        .get("/block/v1/zones/fr-par-2/volumes?tags=models")
        .await
        .json();
    assert_eq!(l["total_count"], 1);
    assert_eq!(
        env.get("/block/v1/zones/fr-par-2/volumes?tags=other")
            .await
            .json()["total_count"],
        0
    );

    let s = env
        .create_server(json!({"name": "v", "commercial_type": "L4-1-24G", "image": "ubuntu_jammy_gpu_os_12",
                               "volumes": {"0": {"volume_type": "sbs_volume", "size": 30_000_000_000u64},
                                           "1": {"id": id, "volume_type": "sbs_volume"}}}))
        .await;
    let sid = s["id"].as_str().unwrap();
    assert_eq!(s["volumes"]["1"]["id"], id.as_str());
    assert_eq!(env.get(&path).await.json()["status"], "in_use");
    let del = env.call(Method::DELETE, &path, None).await;
    assert_eq!(del.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(del.json()["type"], "precondition_failed");
    assert_eq!(del.json()["precondition"], "resource_still_in_use");

    assert_eq!(
        env.call(Method::DELETE, &format!("{Z}/servers/{sid}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(env.get(&path).await.json()["status"], "available");
    assert_eq!(
        env.call(Method::DELETE, &path, None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(env.get(&path).await.status, StatusCode::NOT_FOUND);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn security_groups() {
    let env = start(|_| {}).await;
    let sg = env
        .post(
            &format!("{Z}/security_groups"),
            json!({"name": "gpufleet", "project": PROJECT, "stateful": true,
              "inbound_default_policy": "drop", "outbound_default_policy": "accept"}),
        )
        .await;
    assert_eq!(sg.status, StatusCode::CREATED);
    let sg_id = sg.json()["security_group"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = env
        .call(
            Method::PUT,
            &format!("{Z}/security_groups/{sg_id}/rules"),
            Some(json!({"rules": [{"protocol": "TCP", "direction": "inbound", "action": "accept", "ip_range": "0.0.0.0/0", "dest_port_from": 8080}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["rules"][0]["dest_port_from"], 8080);
    let s = env
        .create_server(json!({"name": "sg", "commercial_type": "DEV1-S", "security_group": sg_id}))
        .await;
    assert_eq!(s["security_group"]["id"], sg_id.as_str());
    let d = env
        .call(
            Method::DELETE,
            &format!("{Z}/security_groups/{sg_id}"),
            None,
        )
        .await;
    assert_eq!(d.status, StatusCode::CONFLICT);
    assert_eq!(
        d.json(),
        json!({"type": "conflict", "message": "Group is in use. You cannot delete it."})
    );
    let l = env.get(&format!("{Z}/security_groups?name=gpufleet")).await;
    assert_eq!(l.headers["x-total-count"], "1");
    env.emu.shutdown().await;
}
