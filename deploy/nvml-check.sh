#!/usr/bin/env bash
# Runs `gpufleet agent --gpu nvml` (no control plane needed); compares /metrics to nvidia-smi field by field.
# From the repo root, on a machine with an NVIDIA GPU. Adapted from ../shared/device/nvml-check.sh to the names
# the agent exports: FB_FREE is NVML's free (vs memory.free), FB_RESERVED (vs memory.reserved),
# POWER_MGMT_LIMIT (vs power.limit), ENFORCED_POWER_LIMIT (vs enforced.power.limit), CLOCKS_EVENT_REASONS
# (DCGM 3.3+ name of field 112, vs clocks_event_reasons.active). A figure nvidia-smi shows as [N/A] or
# [Not Supported] must be absent from /metrics (unknown, never 0). MIG instance series (GPU_I_ID) are skipped.
# `gpufleet gpu-sample --gpu nvml` prints one sample without starting the agent.
set -euo pipefail
W=${W:-$(mktemp -d -t nvml-check-XXXX)}; BIN=${BIN:-target/release/gpufleet}; MODE=${GPU_MODE:-nvml}; P=17070; ID=i-$(tr -d - </proc/sys/kernel/random/uuid)
mkdir -p "$W"; [ -x "$BIN" ] || CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo build --release -q -p gpufleet
nvidia-smi --query-gpu=index,name,driver_version,mig.mode.current,persistence_mode --format=csv
echo "{\"instance_id\":\"$ID\",\"control_plane_url\":\"http://127.0.0.1:9\",\"bootstrap_secret\":\"x\",\"model\":\"org/sim-model\",\"agent_port\":$P,
 \"engine\":{\"kind\":\"sim\",\"port\":18000,\"model_load_delay_ms\":0},\"gpu\":{\"model\":\"sim\",\"count\":1,\"vram_mib\":1,\"power_limit_w\":1}}" >"$W/boot.json"
"$BIN" agent --instance-id "$ID" --bootstrap-file "$W/boot.json" --bind 127.0.0.1 --data-dir "$W/data" \
  --gpu "$MODE" --heartbeat-interval-ms 1000 2>"$W/agent.log" & PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 40); do kill -0 $PID 2>/dev/null || { cat "$W/agent.log"; exit 1; }; curl -sf "127.0.0.1:$P/metrics" | grep -q '^DCGM_FI_DEV_GPU_UTIL' && break; sleep 0.5; done
sleep 3; curl -sf "127.0.0.1:$P/metrics" >"$W/metrics.txt"
Q=index,uuid,utilization.gpu,memory.used,memory.free,memory.reserved,memory.total,temperature.gpu,power.draw,power.limit,enforced.power.limit,clocks.sm,ecc.errors.uncorrected.volatile.total,clocks_event_reasons.active
nvidia-smi --query-gpu=$Q --format=csv,noheader,nounits >"$W/smi.csv" 2>/dev/null ||
  nvidia-smi --query-gpu=${Q/clocks_event/clocks_throttle} --format=csv,noheader,nounits >"$W/smi.csv"
grep -E 'GPU figures|GPU FIGURES|WARN.*NVML|ERROR' "$W/agent.log" || true; grep -E '^gpufleet_agent_(info|gpu_fault)' "$W/metrics.txt" || true
python3 - "$W" <<'PY'
import csv, re, sys
w = sys.argv[1]; m = {}; bad = 0  # m[(family, gpu)] = value
for l in open(f"{w}/metrics.txt"):
    if 'GPU_I_ID=' in l: continue  # MIG instances: series of their own
    r = re.match(r'(DCGM_FI_DEV_\w+)\{gpu="(\d+)",UUID="([^"]*)".*\} (\S+)$', l)
    if r: m[r[1], r[2]] = float(r[4]); m["UUID", r[2]] = r[3]
num = lambda s: float(s) if re.fullmatch(r"[\d.]+", s) else (int(s, 16) if s.startswith("0x") else None)
for row in csv.reader(open(f"{w}/smi.csv"), skipinitialspace=True):
    g, uuid, util, used, free, res, total, temp, pw, plim, eplim, sm, ecc, thr = row
    def chk(metric, smi, tol, note=""):
        global bad
        got, want = m.get((metric, g)), num(smi)
        ok = (got is None and want is None) or (None not in (got, want) and abs(got - want) <= tol)
        bad += not ok
        print(f"gpu{g} {'PASS' if ok else 'FAIL'} {metric:36} agent={got} smi={smi} {note}")
    okid = m.get(("UUID", g)) == uuid; bad += not okid; print(f"gpu{g} {'PASS' if okid else 'FAIL'} UUID agent={m.get(('UUID', g))} smi={uuid}")
    chk("DCGM_FI_DEV_GPU_UTIL", util, 5); chk("DCGM_FI_DEV_FB_USED", used, 1)
    chk("DCGM_FI_DEV_FB_FREE", free, 1, f"(total={total})"); chk("DCGM_FI_DEV_FB_RESERVED", res, 1)
    chk("DCGM_FI_DEV_GPU_TEMP", temp, 2); chk("DCGM_FI_DEV_POWER_USAGE", pw, max(15, 0.1 * (num(pw) or 0)))
    chk("DCGM_FI_DEV_POWER_MGMT_LIMIT", plim, 1); chk("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", eplim, 1)
    chk("DCGM_FI_DEV_SM_CLOCK", sm, 0.1 * (num(sm) or 0) + 15)
    chk("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", ecc, 0); chk("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", thr, 0, "(bit 0x1 idle may flicker)")
    src = re.search(r'gpu_source="(\w+)"', open(f"{w}/metrics.txt").read()); okg = src is not None and src[1] == "nvml"
    bad += not okg; print(f"gpu{g} {'PASS' if okg else 'FAIL'} gpu_source label = {src and src[1]}")
print("FAILURES:", bad); sys.exit(1 if bad else 0)
PY
