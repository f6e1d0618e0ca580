"""Export a fitted detector's whole scoring path (ONNX, run by onnxruntime; OpenVINO IR) and check that
the export scores like the native model (the parity gate of the retrain flow).

    out = export_model(detector, "export/", formats=("onnx", "openvino"))
    onnx = ExportedModel.load(out, "onnx")           # every file's sha256 checked against manifest.json
    onnx.score(images (B, 3, H, W)) -> ScoreBatch   # image_scores (B,), anomaly_maps (B, H, W)
    report = parity(native_exact, {"onnx": onnx}, batches, threshold, ParityTolerance(...), native_default)

The export folder is written atomically like a saved model (components.detector.write_model_dir, method
"export"): model.onnx, openvino.xml + openvino.bin (when asked and `openvino` is installed), export.json
(input size, outputs, the threshold, the source model's manifest sha256, tool versions) and manifest.json.
No pickle: ONNX and OpenVINO IR are protobuf / XML + raw weights.

Which methods export: `EXPORTERS` (PatchCore with any batch size; Students traced at batch 1, its export
run image by image as the native model runs; docs/export.md says why the others do not).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from components import maps
from components.detector import (
    MANIFEST,
    ArtifactError,
    ScoreBatch,
    read_manifest,
    verified_files,
    write_model_dir,
)
from components.patchcore.export import NotExportableError, exact_reference, input_size, scoring_graph
from components.thresholds import Threshold

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
EXPORT_METHOD = "export"
OPSET = 17
OUTPUTS = ("image_scores", "anomaly_maps")
FILES = {"onnx": ("model.onnx",), "openvino": ("openvino.xml", "openvino.bin")}
# OpenVINO's CPU plugin runs in bfloat16 by default on CPUs with bf16 units (this machine's: avx512_bf16):
# the tiny test PatchCore's scores then differed by up to ~6 % (maps by 1.5e-2). The export runs in float32.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

__all__ = ["EXPORTERS", "FORMATS", "ExportedModel", "NotExportableError", "ParityReport", "ParityTolerance",
           "export_model", "openvino_missing", "parity", "parity_reference"]


class StudentsGraph(torch.nn.Module):
    """Uninformed Students' scoring for one input size: the dense ensemble maps (StudentsNet, at its dense
    stride) then the fixed per-axis upsample-and-blur operators of maps.to_input_resolution as constants
    (built here, outside the trace, which would otherwise record the Resize that builds them), image score the
    top mean. forward: images (1, 3, H, W) -> (scores (1,), maps (1, H, W)); traced at batch 1."""

    batch = 1

    def __init__(self, detector, image_hw: tuple[int, int]) -> None:
        super().__init__()
        from components.students.networks import dense_size

        params = detector.params
        if params.image_size and params.image_size != image_hw[0]:
            raise NotExportableError("students: a working image_size other than the input size needs an "
                                     "antialiased resize, which onnxruntime has no kernel for")
        self.net, self.top_ratio = detector.net_.eval(), params.top_ratio
        grid = (dense_size(image_hw[0], params.dense_stride), dense_size(image_hw[1], params.dense_stride))
        a_h, a_w = maps.resize_blur_operators(grid, image_hw, params.smoothing_sigma)
        self.register_buffer("a_h", a_h.float())
        self.register_buffer("a_w", a_w.float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.net(images)
        amap = torch.matmul(torch.matmul(self.a_h, dense), self.a_w.T)
        return maps.top_mean(amap, self.top_ratio), amap


def _students_graph(detector, image_hw: tuple[int, int] | None, block: int) -> torch.nn.Module:
    detector.check_fitted()
    return StudentsGraph(detector, image_hw).eval()


# method name -> builder(detector, image_hw, block) of a module images (B, 3, H, W) -> (scores (B,), maps (B, H, W)).
# A module with an int attribute `batch` is traced at that batch size only (no dynamic batch axis).
EXPORTERS: dict[str, Callable[..., torch.nn.Module]] = {"patchcore": scoring_graph, "students": _students_graph}
NOT_EXPORTED = {  # why; docs/export.md has the longer story
    "patchcore_ensemble": "not done: one graph per member plus the members' normalisation would need "
                          "wiring; each member alone exports as a PatchCore",
    "dinomaly": "the CNN variant's adaptive pooling gets its output size from a tensor shape, which the "
                "ONNX exporter refuses (torch 2.13, opset 17); with that size made constant, onnxruntime "
                "has no kernel for the Resize node the trace then holds",
    "transformaly": "its image score is a PCA and Gaussian likelihood computed in numpy float64, outside torch",
    "divide_assemble": "its maps use torch's fold (col2im): not in ONNX opset 17; at opset 18 the exporter "
                       "fails (torch 2.13)",
}


def openvino_missing() -> str | None:
    """None when OpenVINO can convert and run here, else why not (one line)."""
    try:
        import openvino as ov

        devices = ov.Core().available_devices
    except Exception as exc:  # noqa: BLE001 - ImportError, a broken install, an unsupported CPU: all "no"
        return f"openvino is not usable here ({type(exc).__name__}: {exc})"
    return None if "CPU" in devices else f"openvino finds no CPU device (devices: {devices})"


def _tool_versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def export_model(detector, out_dir: str | Path, formats: Iterable[str] = ("onnx",),
                 image_hw: tuple[int, int] | None = None, block: int = 2048, opset: int = OPSET,
                 source_dir: str | Path | None = None) -> Path:
    """Write the export folder of a fitted detector (atomically; an existing export there is replaced).

    formats: subset of FORMATS ("onnx" is always written: OpenVINO IR is converted from it). image_hw: the
    fixed input size (default: the model's). source_dir: the saved model folder, whose manifest sha256 is
    recorded. NotExportableError names the method / setting that cannot be exported; ValueError for an
    unknown format or OpenVINO missing.
    """
    formats = _check_formats(formats)
    builder = EXPORTERS.get(detector.name)
    if builder is None:
        raise NotExportableError(f"{detector.name}: no export ({NOT_EXPORTED.get(detector.name, 'not written')})")
    hw = input_size(detector, image_hw)
    graph = builder(detector, hw, block)
    batch = getattr(graph, "batch", None)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(graph, hw, onnx_path, opset, batch)
        writers = {"model.onnx": lambda p: shutil.copyfile(onnx_path, p)}
        if "openvino" in formats:
            # save_model writes openvino.xml AND openvino.bin; the second writer only lets it be hashed
            writers["openvino.xml"] = lambda p: write_openvino(onnx_path, p)
            writers["openvino.bin"] = lambda p: None
        meta = _metadata(detector, hw, formats, batch, opset, source_dir)
        writers["export.json"] = lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True))
        return write_model_dir(out_dir, EXPORT_METHOD, writers)


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(["onnx", *formats]))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; formats: {', '.join(FORMATS)}")
    if "openvino" in formats and (why := openvino_missing()):
        raise ValueError(f"format openvino: {why}")
    return formats


def _metadata(detector, hw: tuple[int, int], formats: tuple[str, ...], batch: int | None, opset: int,
              source_dir: str | Path | None) -> dict:
    source = None
    if source_dir is not None and (Path(source_dir) / MANIFEST).is_file():
        source = hashlib.sha256((Path(source_dir) / MANIFEST).read_bytes()).hexdigest()
    threshold = detector.threshold_.to_dict() if getattr(detector, "threshold_", None) is not None else None
    b = batch or "batch"
    bank = getattr(detector, "memory_bank_", None)
    return {"method": detector.name, "formats": list(formats), "input": {"name": "images", "shape": [b, 3, *hw],
            "dtype": "float32", "range": [0.0, 1.0]}, "outputs": {"image_scores": [b], "anomaly_maps": [b, *hw]},
            "threshold": threshold, "opset": opset, "bank_size": None if bank is None else int(len(bank)),
            "source_model_manifest_sha256": source, "tools": _tool_versions()}


def write_onnx(graph: torch.nn.Module, hw: tuple[int, int], path: Path, opset: int = OPSET,
               batch: int | None = None) -> Path:
    """Trace graph (images (B, 3, H, W) -> OUTPUTS) to ONNX at path: batch dimension dynamic, or fixed at
    `batch` when given."""
    example = torch.rand(batch or 2, 3, *hw, generator=torch.Generator().manual_seed(0))
    axes = None if batch else {"images": {0: "batch"}, "image_scores": {0: "batch"}, "anomaly_maps": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(graph, (example,), str(path), dynamo=False, input_names=["images"],
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def write_openvino(onnx_path: Path, xml_path: Path) -> None:
    """ONNX -> OpenVINO IR (xml_path and its .bin beside it), weights kept in float32."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def parity_reference(detector):
    """What an export of `detector` must equal: a PatchCore with an exact (flat) index in place of its own
    (the export searches exactly), any other detector itself."""
    return exact_reference(detector) if detector.name == "patchcore" else detector


# ------------------------------------------------------------------------------------------- running
class ExportedModel:
    """A verified export folder run by onnxruntime ("onnx") or OpenVINO ("openvino").

    score: images (B, 3, H, W) float in [0, 1] at the export's input size -> ScoreBatch. threshold_: the
    source model's Threshold (None if it had none). threads: 0 = the runtime's default.
    """

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], meta: dict, fmt: str) -> None:
        self._run, self.meta, self.format = run, meta, fmt
        self.input_hw = tuple(meta["input"]["shape"][2:])
        fixed = meta["input"]["shape"][0]
        self.fixed_batch = fixed if isinstance(fixed, int) else None  # run in chunks of this many images
        self.threshold_ = Threshold.from_dict(meta["threshold"]) if meta.get("threshold") else None

    @classmethod
    def load(cls, directory: str | Path, fmt: str = "onnx", threads: int = 0) -> ExportedModel:
        files = verified_files(directory, EXPORT_METHOD)
        missing = [n for n in ("export.json", *FILES.get(fmt, ())) if n not in files]
        if fmt not in FORMATS or missing:
            raise ArtifactError(f"{directory}: no {fmt!r} export here (missing {missing or fmt}); "
                                f"formats: {', '.join(sorted(f for f in FORMATS if FILES[f][0] in files))}")
        try:
            meta = json.loads(files["export.json"].read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{files['export.json']}: not valid JSON ({exc})") from None
        runner = _onnxruntime if fmt == "onnx" else _openvino
        return cls(runner(files[FILES[fmt][0]], threads), meta, fmt)

    @staticmethod
    def formats_in(directory: str | Path) -> list[str]:
        """The formats an export folder holds (from its manifest; `load` verifies the files)."""
        files = read_manifest(directory)["files"]
        return [fmt for fmt in FORMATS if all(name in files for name in FILES[fmt])]

    def score(self, images: torch.Tensor | np.ndarray) -> ScoreBatch:
        x = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_hw:
            raise ValueError(f"this {self.format} export takes images (B, 3, {self.input_hw[0]}, "
                             f"{self.input_hw[1]}), got {tuple(x.shape)}")
        step = self.fixed_batch or len(x)
        parts = [self._run(x[i:i + step]) for i in range(0, len(x), max(1, step))]
        return ScoreBatch(np.concatenate([np.asarray(s, np.float32) for s, _ in parts]),
                          np.concatenate([np.asarray(m, np.float32) for _, m in parts]))


def _onnxruntime(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(list(OUTPUTS), {"images": x})


def _openvino(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov

    config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads > 0 else {})}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = request.infer({0: x})
        return [np.array(out[compiled.output(i)]) for i in range(len(OUTPUTS))]

    return run


# -------------------------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class ParityTolerance:
    """score_rtol: |exported - native| <= score_rtol * |native| for every image score; min_agreement: the
    fraction of equal decisions required; map_rtol: max |map difference| / max |native map| per image
    (None: recorded only)."""

    score_rtol: float = 1e-4
    min_agreement: float = 1.0
    map_rtol: float | None = 1e-3


@dataclass
class _Diff:
    """Running largest differences of one scorer against a reference over the batches seen."""

    n: int = 0
    score_abs: float = 0.0
    score_rel: float = 0.0
    map_abs: float = 0.0
    map_rel: float = 0.0
    agree: int = 0

    def add(self, got: ScoreBatch, ref: ScoreBatch, threshold: Threshold | None) -> None:
        """got / ref: (B,) scores, (B, H, W) maps of the same images."""
        ds = np.abs(got.image_scores.astype(np.float64) - ref.image_scores)
        self.score_abs = max(self.score_abs, float(ds.max()))
        self.score_rel = max(self.score_rel, float((ds / np.maximum(np.abs(ref.image_scores), 1e-30)).max()))
        dm = np.abs(got.anomaly_maps.astype(np.float64) - ref.anomaly_maps).reshape(len(ds), -1).max(1)
        peak = np.maximum(np.abs(ref.anomaly_maps).reshape(len(ds), -1).max(1), 1e-30)
        self.map_abs, self.map_rel = max(self.map_abs, float(dm.max())), max(self.map_rel, float((dm / peak).max()))
        if threshold is not None:
            self.agree += int((threshold.decide_image(got.image_scores) == threshold.decide_image(ref.image_scores)).sum())
        self.n += len(ds)

    def as_dict(self, threshold: Threshold | None) -> dict[str, float]:
        agreement = self.agree / self.n if threshold is not None and self.n else float("nan")
        return {"score_max_abs_diff": self.score_abs, "score_max_rel_diff": self.score_rel,
                "map_max_abs_diff": self.map_abs, "map_max_rel_diff": self.map_rel,
                "decision_agreement": agreement, "n_images": float(self.n)}


@dataclass
class ParityReport:
    """Per format: the differences to the exact native reference, and to the native model as configured
    (its own index). passed / reasons: the gate's verdict on the exact-reference figures."""

    formats: dict[str, dict[str, float]]
    versus_native_default: dict[str, dict[str, float]]
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parity(reference, exported: Mapping[str, ExportedModel], batches: Iterable[torch.Tensor],
           threshold: Threshold | None, tolerance: ParityTolerance = ParityTolerance(),
           native_default=None) -> ParityReport:
    """Score every batch (B, 3, H, W) with the reference (the native model, exact search), each export and,
    when given, the native model as configured; compare. Maps are compared batch by batch (never all in RAM)."""
    diffs = {name: _Diff() for name in exported}
    versus = {name: _Diff() for name in exported} if native_default is not None else {}
    for images in batches:
        ref = reference.score(images)
        default = native_default.score(images) if native_default is not None else None
        for name, model in exported.items():
            got = model.score(images)
            diffs[name].add(got, ref, threshold)
            if default is not None:
                versus[name].add(got, default, threshold)
    formats = {name: d.as_dict(threshold) for name, d in diffs.items()}
    reasons = [r for name, figures in formats.items() for r in _verdict(name, figures, threshold, tolerance)]
    return ParityReport(formats, {n: d.as_dict(threshold) for n, d in versus.items()}, not reasons, reasons)


def _verdict(name: str, f: dict[str, float], threshold: Threshold | None, tol: ParityTolerance) -> list[str]:
    out = []
    if not f["n_images"]:
        out.append(f"{name}: no images were compared")
    if f["score_max_rel_diff"] > tol.score_rtol:
        out.append(f"{name}: image scores differ by up to {f['score_max_rel_diff']:.3g} relative "
                   f"(tolerance {tol.score_rtol:g})")
    if threshold is None:
        out.append(f"{name}: the model has no threshold, so decisions cannot be compared")
    elif f["decision_agreement"] < tol.min_agreement:
        out.append(f"{name}: decisions agree on {100 * f['decision_agreement']:.2f} % of images "
                   f"(required {100 * tol.min_agreement:.2f} %)")
    if tol.map_rtol is not None and f["map_max_rel_diff"] > tol.map_rtol:
        out.append(f"{name}: anomaly maps differ by up to {f['map_max_rel_diff']:.3g} of their peak "
                   f"(tolerance {tol.map_rtol:g})")
    return out
