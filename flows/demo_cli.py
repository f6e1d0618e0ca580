"""`defectops demo` (the main job: services up, a demo line, retrain twice, inference, lineage) and
`defectops prepare` (the DVC `prepare` stage). flows/ops_cli.py registers them."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

from components.config import Config, load_config
from flows.ops_cli import (
    ConfigOpt,
    _ui,
    clear_errors,
    client_session,
    console,
    print_inference,
    print_retrain,
    services_config,
)

DEMO_CHANGE = "detector.patchcore.coreset_ratio=0.02"


def write_line_params(cfg: Config, out: Path, line: str, data: Path, max_train_images: int | None,
                      image_size: int | None) -> Path:
    """A params file: `cfg` with `lines` replaced by the one line (and image_size when given)."""
    raw = cfg.to_dict()
    raw["services"]["root"] = str(cfg.services.root.resolve())
    if image_size:
        raw["data"]["image_size"] = [image_size, image_size]
    raw["lines"] = {line: {"data": str(data.resolve()), "cron": "0 3 * * *", "max_train_images": max_train_images}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(out)  # fail here, not in the flow, if something does not validate
    return out


def run_demo(cfg: Config, data: Path | None = None, change: str = DEMO_CHANGE, image_size: int = 128,
             max_train: int | None = None, stop_after: bool = False) -> dict:
    """Start the services, build (or take) a line, retrain twice, run inference, return the lineage."""
    from flows.demo_data import DemoSpec, build_demo_line
    from infra.services import env_for_clients, start, stop

    t0 = time.perf_counter()
    root = cfg.services.root.resolve()
    state = start(services_config(cfg))
    console.print(f"services up in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v}" for k, v in _ui(state).items()),
                  highlight=False)
    if data is None:
        line, source = "demo", build_demo_line(root / "demo" / "line", DemoSpec())
    else:
        line, source = re.sub(r"[^A-Za-z0-9._-]+", "-", data.resolve().name).strip("-._") or "line", data
    params = write_line_params(cfg, root / "demo" / "params.yaml", line, source, max_train, image_size)
    timings: dict[str, float] = {}
    try:
        with client_session(cfg, env_for_clients(state)):
            from flows.inference import inference
            from flows.lineage import lineage, render
            from flows.retrain import model_name, retrain
            from infra.storage import ObjectStore

            for i, overrides in enumerate(([], [change]), start=1):
                console.rule(f"retrain {i} of 2" + (f" with {change}" if overrides else ""))
                t = time.perf_counter()
                print_retrain(retrain(line, str(params), overrides))
                timings[f"retrain_{i}_s"] = time.perf_counter() - t
            console.rule("inference with @champion")
            t = time.perf_counter()
            print_inference(inference(line, [str(Path(source) / "test")], str(params)))
            timings["inference_s"] = time.perf_counter() - t
            console.rule("lineage of @champion")
            info = lineage(model_name(line), "@champion", ObjectStore.from_env())
            console.print(render(info), highlight=False, soft_wrap=True)
    finally:
        if stop_after:
            stop(services_config(cfg))
    timings["total_s"] = time.perf_counter() - t0
    console.rule("done")
    for key, value in _ui(state).items():
        console.print(f"{key:18} {value}", highlight=False)
    console.print(f"demo finished in {timings['total_s']:.0f} s"
                  + ("; services stopped" if stop_after else "; stop the services with `defectops down`"))
    return {"line": line, "params": str(params), "lineage": info, "timings": timings}



def register(app: typer.Typer) -> None:
    @app.command()
    def demo(data: Annotated[Path | None, typer.Option("--data", help="a real MVTec-layout line instead of the demo")] = None,
             config: ConfigOpt = None,
             change: Annotated[str, typer.Option(help="the parameter changed for the second retrain")] = DEMO_CHANGE,
             image_size: Annotated[int, typer.Option(help="square image size for the demo runs")] = 128,
             max_train: Annotated[int | None, typer.Option(min=1, help="use the first N good train images (N >= 1)")] = None,
             stop: Annotated[bool, typer.Option("--stop", help="stop the services at the end")] = False) -> None:
        """The main job: services up, a demo line, retrain twice (gate exercised), inference, lineage."""
        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        if data is not None and max_train is None:
            max_train = 20
        with clear_errors():
            run_demo(cfg, data, change, image_size, max_train, stop)

    @app.command()
    def prepare(out: Annotated[Path, typer.Option("--out", help="folder to write the line to")],
                data: Annotated[Path | None, typer.Option("--data", help="copy this MVTec-layout line")] = None,
                max_train: Annotated[int | None, typer.Option("--max-train", help="first N train images")] = None,
                seed: Annotated[int, typer.Option(help="demo line seed")] = 0) -> None:
        """DVC `prepare` stage: the demo line (or a copy of --data, first --max-train train images) in OUT."""
        from flows.demo_data import DemoSpec, build_demo_line
        from flows.versioning import stage_line

        if data is None:
            build_demo_line(out, DemoSpec(seed=seed))
            console.print(f"demo line written to {out}")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            console.print(f"{stage_line(data, out, max_train)} files of {data} copied to {out}")
