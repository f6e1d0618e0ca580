"""`defectops demo-drift`: the monitoring loop of issue 15 end to end, on the synthetic demo line.

1. services up; the demo line (scikit-image brick texture) retrained once -> @champion;
2. the inference service (with this demo's params) and the schedule runner (the line's retrain deployment)
   started; any api / runner this services root already ran is stopped first;
3. one batch of `monitoring.window` NEW good parts sent to the service -> `monitor` (expected: no drift);
4. the same number of good parts under a lighting change (brightness x `shift`) -> `monitor` raises the alert
   (log line, Prefect event + artifact, MLflow run); the operator marks one rejected part a false alarm and
   accepts it (what the operator page's buttons do);
5. a second shifted batch -> drift persists (`monitoring.persist` = 2 checks) -> the reviewed false alarm is
   exported to train/good and the line's retrain deployment starts; the demo waits for it and prints the
   gate's decision.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flows.demo_cli import write_line_params
from flows.ops_cli import _ui, client_session, console, services_config

LINE = "drift-demo"


def good_parts(n: int, seed: int, shift: float = 1.0, size: int = 160) -> list[bytes]:
    """n new good demo parts (brick crops never seen in training) as PNG bytes, brightness x `shift`."""
    from flows.demo_data import _to_rgb, load_texture, random_crop

    texture, rng = load_texture("brick"), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rgb = _to_rgb(random_crop(texture, size, rng)).astype(np.float32) * shift
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def send(url: str, line: str, images: list[bytes], per_request: int = 16) -> list[dict]:
    """POST the images to the service in requests of `per_request`; the results in order."""
    import httpx

    results = []
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(images), per_request):
            files = [("image", (f"part-{i + j}.png", data, "image/png")) for j, data in enumerate(images[i:i + per_request])]
            reply = client.post(f"{url}/v1/lines/{line}/score", files=files)
            reply.raise_for_status()
            results += reply.json()["results"]
    return results


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the inference service at {url} did not load the champion within {timeout_s:.0f} s")


def wait_flow_run(flow_run_id: str, timeout_s: float) -> str:
    """The flow run's final state name (or its state when `timeout_s` passed)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state.name
            if time.monotonic() > deadline:
                return f"{state.name if state else 'unknown'} (still running after {timeout_s:.0f} s)"
            time.sleep(3.0)


def mark_false_alarm(root: Path, results: list[dict]) -> int | None:
    """The operator marks the first rejected part a false alarm and a reviewer accepts it (the page's
    buttons write exactly this to the decision store). Returns the feedback id, None if none was rejected."""
    from flows.service.decisions import DecisionStore

    rejected = [r for r in results if r["decision"] != "good"]
    if not rejected:
        return None
    store = DecisionStore(root / "serving")
    try:
        fid = store.add_feedback(int(rejected[0]["decision_id"]), "false_alarm", "lighting changed, part is fine")
        store.review(fid, "accepted")
        return fid
    finally:
        store.close()


def run_drift_demo(cfg, shift: float = 1.3, image_size: int = 128, retrain_timeout_s: float = 900.0) -> dict:
    """The steps of the module docstring; returns the three checks and the retrain's outcome."""
    from flows.demo_data import DemoSpec, build_demo_line
    from infra.api_service import api_status, start_api, stop_api
    from infra.scheduler import schedules_status, start_schedules, stop_schedules
    from infra.services import env_for_clients, start

    t0 = time.perf_counter()
    root = cfg.services.root.resolve()
    scfg = services_config(cfg)
    state = start(scfg)
    console.print("services: " + ", ".join(f"{k} {v}" for k, v in _ui(state).items()), highlight=False)
    source = build_demo_line(root / "demo" / LINE, DemoSpec(n_train=20, seed=1))
    params = write_line_params(cfg, root / "demo" / "drift-params.yaml", LINE, source, None, image_size)
    window = cfg.monitoring.window
    env = env_for_clients(state)
    out: dict = {"line": LINE, "params": str(params), "window": window, "shift": shift, "checks": []}
    with client_session(cfg, env):
        from flows.monitor import monitor, summary
        from flows.retrain import retrain

        console.rule("1. retrain the demo line -> @champion")
        first = retrain(LINE, str(params))
        console.print(f"version {first['version']}: {'promoted' if first['promoted'] else 'NOT promoted'}; "
                      + "; ".join(r for r in first["reasons"] if "rate" in r), highlight=False)
        console.rule("2. inference service + schedule runner with the demo's params")
        for status, stop, what in ((api_status(root), stop_api, "inference service"),
                                   (schedules_status(root), stop_schedules, "schedule runner")):
            if status is not None:
                console.print(f"stopping the {what} this root already ran (the demo restarts it with its params)")
                stop(root)
        api = start_api(scfg, params, env, host=cfg.service.host, port=cfg.service.port)
        start_schedules(scfg, params, [LINE])
        wait_ready(api.url)
        steps = (("3. unshifted batch", 1.0, 101), (f"4. shifted batch (brightness x{shift:g})", shift, 102),
                 (f"5. second shifted batch (brightness x{shift:g})", shift, 103))
        for title, factor, seed in steps:
            console.rule(f"{title}: {window} new good parts")
            results = send(api.url, LINE, good_parts(window, seed, factor))
            rejected = sum(r["decision"] != "good" for r in results)
            console.print(f"sent {len(results)}: {rejected} rejected", highlight=False)
            if factor != 1.0 and not out.get("feedback_id"):
                out["feedback_id"] = mark_false_alarm(root, results)
                if out["feedback_id"]:
                    console.print(f"operator: false alarm marked and accepted (feedback {out['feedback_id']})")
            check = monitor(LINE, str(params))
            console.print(summary(check), highlight=False)
            out["checks"].append({"batch": title, "rejected": rejected, "drift": check["drift"],
                                  "reasons": check["reasons"], "retrain": check.get("retrain")})
        retrain_run = out["checks"][-1]["retrain"]
        if retrain_run:
            console.rule(f"6. retrain started by the monitor: {retrain_run['flow_run_name']}")
            console.print(f"feedback images added to train/good: {retrain_run['feedback_images'] or 'none'}")
            out["retrain_state"] = wait_flow_run(retrain_run["flow_run_id"], retrain_timeout_s)
            console.print(f"retrain flow run: {out['retrain_state']}", highlight=False)
            if out["retrain_state"] == "Completed":
                import json

                from flows import registry
                from flows.retrain import model_name
                tags = registry.get_version(model_name(LINE), "@challenger")["tags"]
                out["gate"] = {"version": tags.get("promotion.decision") and
                               registry.version_for_alias(model_name(LINE), "challenger"),
                               "decision": tags.get("promotion.decision"),
                               "reasons": json.loads(tags.get("promotion.reasons") or "[]")}
                console.print(f"gate: version {out['gate']['version']} {out['gate']['decision']} "
                              f"(`defectops lineage {model_name(LINE)}@challenger` shows it all)", highlight=False)
                for reason in out["gate"]["reasons"]:
                    console.print(f"  - {reason}", highlight=False)
    out["seconds"] = time.perf_counter() - t0
    console.print(f"demo-drift finished in {out['seconds']:.0f} s; the service and runner keep running "
                  "(`defectops down` stops them)")
    return out
