"""Stage 4, conversion: build the shared experts' initial weights as an adapter, streamed.

The model is never loaded. The driver reads ``config.json``, builds the model on the meta
device (free) to learn every MoE layer's expert shapes, validates the checkpoint's shard
headers, and plans where each layer's selected experts live. Then one Ray task per layer
(with a memory request sized from that layer's shapes) reads only those experts' slices
(MXFP4 decoded per expert), averages them in float32 one expert at a time, and returns the
layer's shared-expert tensors; the driver streams them, layer by layer in order, into
``adapter.safetensors`` whose header was written up front. Memory therefore scales with
one layer's experts times the number of tasks in flight, never with the model.

Inits: ``pca`` averages the experts of the analysis' selection; ``frequency`` and ``gate``
average the experts ranked by those ESFT importances (same top-k or threshold rule, from
the same ``selection.json``); ``zero`` and ``random`` need no selection. Weighting:
``uniform`` or ``importance``-proportional. Any init may use another ``intermediate_size``
(:func:`fit_width` says how an average is widened or narrowed).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import ray

from nexus.config import RemoteCode, Seeded, input_, setting
from nexus.errors import NexusError, user_errors
from nexus.method.adapter import CONFIG_NAME, FORMAT, WEIGHTS_NAME, adapter_config
from nexus.method.attach import spec_for_block
from nexus.models import family_for_config, find_moe_blocks
from nexus.models.identity import model_identity
from nexus.models.loading import load_config
from nexus.stages.analyze import check_against_model, load_selection, selected_experts
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, write_json
from nexus.util.cluster import ensure_ray
from nexus.weights.checkpoint import (
    Checkpoint,
    layer_shapes,
    meta_model,
    plan_layer,
    preallocate_safetensors,
    write_at,
)

log = logging.getLogger(__name__)

#: inits that average selected experts (and so need a selection)
AVERAGED = ("pca", "frequency", "gate")
_BASE_TASK_MEMORY = 384 * 1024**2
NONCE_FILE = ".nexus-convert-nonce"


@dataclass(frozen=True)
class LayerJob:
    """Everything one conversion task needs (small and picklable; no model, no tensors)."""

    layer: int
    spec: dict
    init: str
    seed: int
    scale: float
    dtype: str
    #: (param, adapter tensor name, safetensors dtype, shape) of this layer's tensors
    entries: tuple = ()
    plan: object | None = None  # nexus.weights.checkpoint.LayerPlan for averaged inits
    experts: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    #: (adapter file, nonce, {name: (offset, nbytes)}): where to write when the task sees the file
    target: tuple | None = None

    #: the averaged experts' width, when the shared expert has another (:func:`fit_width`)
    average_width: int | None = None

    def params(self, width: int | None = None) -> int:
        s, i = self.spec, width or self.spec["intermediate_size"]
        return 3 * i * s["hidden_size"] + 3 * i + 2 * s["hidden_size"]

    def memory_bytes(self) -> int:
        """Memory request: worker baseline, float32 parameters (+ a cast or resized copy), read chunks."""
        copies = 2 if self.dtype != "float32" or self.init not in AVERAGED else 1
        resized = 4 * self.params(self.average_width) if self.average_width else 0
        return int(_BASE_TASK_MEMORY + (copies + 1) * 4 * self.params() + resized + 64 * 1024**2)


def _sees_target(target) -> bool:
    """True when this process sees the driver's adapter file (same node or shared storage)."""
    if target is None:
        return False
    path, nonce, _ = target
    try:
        return (Path(path).parent / NONCE_FILE).read_text() == nonce
    except OSError:
        return False


def build_layer(job: LayerJob) -> dict:
    """Make one layer's shared-expert tensors and write them into the adapter file.

    Returns ``{"layer", "written": True}``, or, when this worker cannot see the driver's
    file (another node without shared storage), the tensors as raw bytes for the driver.
    """
    import torch

    from nexus.method.shared_expert import initial_down_factor
    from nexus.weights.checkpoint import tensor_bytes, write_at

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    spec = job.spec
    if job.init in AVERAGED:
        from nexus.weights.checkpoint import ExpertReader

        with ExpertReader(job.plan) as reader:
            params = reader.average(list(job.experts), list(job.weights))
        params = fit_width(params, spec, _generator(job))
        if spec["gate"] == "scalar":
            params["scale"] = torch.tensor(float(job.scale))
        elif spec["gate"] == "sigmoid":
            params["mix"] = torch.zeros(1, spec["hidden_size"])
    else:
        from nexus.method.shared_expert import SharedExpert, SharedExpertSpec

        se = SharedExpert(SharedExpertSpec(**spec), dtype=torch.float32)
        se.reset_parameters(job.init, generator=_generator(job))
        params = {n.replace(".weight", ""): t.detach() for n, t in se.state_dict().items()}
        del se
    factor = initial_down_factor(spec["gate"], job.scale)
    if factor != 1.0:
        params["w_out"].mul_(factor)
        if "b_out" in params:
            params["b_out"].mul_(factor)
    dtype = getattr(torch, job.dtype)
    if sorted(params) != sorted(e[0] for e in job.entries):
        raise RuntimeError(
            f"layer {job.layer}: made {sorted(params)}, expected {[e[0] for e in job.entries]}"
        )
    tensors = {}
    for param, name, _, shape in job.entries:
        t = params.pop(param)
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(
                f"layer {job.layer}: {param} has shape {list(t.shape)}, expected {list(shape)}"
            )
        tensors[name] = t.to(dtype)
    if _sees_target(job.target):
        path, _, spans = job.target
        for name, t in tensors.items():
            write_at(path, spans[name], t)
        return {"layer": job.layer, "written": True}
    return {"layer": job.layer, "written": False, "tensors": {n: tensor_bytes(t) for n, t in tensors.items()}}


def _generator(job: LayerJob):
    import torch

    return torch.Generator().manual_seed(int(job.seed) * 100_003 + int(job.layer))


def fit_width(params: dict, spec: dict, generator=None) -> dict:
    """An averaged expert's tensors (``w_in``, ``w_out``, ``b_in``, ``b_out``) resized to the
    shared expert's ``intermediate_size``.

    Wider: the average fills the first units and each extra unit gets random gate/up rows
    (``random`` init's scale, seeded by ``convert.seed``) with a zero down-projection column
    and zero biases, so the shared expert starts as exactly the average; as with LoRA's zero
    ``B``, the extra units' down columns get a gradient from the first step and their gate/up
    rows once those columns have moved. Narrower: the average's units with the
    largest ``|down col| * |gate row| * |up row|`` are kept (magnitude pruning of the
    average, in their original order), an approximation of the average rather than the
    average itself. Same width: unchanged.
    """
    import math

    import torch

    from nexus.models.live import fuse_gate_up, split_gate_up

    layout, width = spec["gate_up_layout"], int(spec["intermediate_size"])
    gate, up = split_gate_up(params["w_in"], layout)
    have = gate.shape[0]
    if width == have:
        return params
    biases = split_gate_up(params["b_in"], layout) if params.get("b_in") is not None else None
    if width > have:
        extra = width - have
        std = 1.0 / math.sqrt(gate.shape[1])
        new = [torch.empty(extra, gate.shape[1]).normal_(0.0, std, generator=generator) for _ in range(2)]
        gate, up = torch.cat([gate, new[0]]), torch.cat([up, new[1]])
        w_out = torch.cat(
            [params["w_out"], params["w_out"].new_zeros(params["w_out"].shape[0], extra)], dim=1
        )
        if biases is not None:
            biases = tuple(torch.cat([b, b.new_zeros(extra)]) for b in biases)
    else:
        size = params["w_out"].norm(dim=0) * gate.norm(dim=1) * up.norm(dim=1)
        keep = torch.topk(size, width).indices.sort().values
        gate, up, w_out = gate[keep], up[keep], params["w_out"][:, keep]
        if biases is not None:
            biases = tuple(b[keep] for b in biases)
    out = {**params, "w_in": fuse_gate_up(gate, up, layout), "w_out": w_out.contiguous()}
    if biases is not None:
        out["b_in"] = fuse_gate_up(*biases, layout)
    return out


def _tensor_entries(layer: int, spec, dtype: str) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(param, adapter name, dtype, shape) of one layer's tensors, in SharedExpert.state_dict order."""
    import torch

    from nexus.method.adapter import tensor_name
    from nexus.method.shared_expert import SharedExpert
    from nexus.weights.checkpoint import TORCH_TO_ST

    with torch.device("meta"):
        se = SharedExpert(spec)
    st = TORCH_TO_ST[getattr(torch, dtype)]
    out = []
    for n, t in se.state_dict().items():
        param = n.replace(".weight", "")
        out.append((param, tensor_name(layer, param), st, tuple(t.shape)))
    return out


def _layer_weights(experts: list[int], importances: list[float], weighting: str, layer: int) -> list[float]:
    if weighting == "uniform":
        return [1.0 / len(experts)] * len(experts)
    total = float(sum(importances))
    if not (total > 0 and all(v >= 0 for v in importances)):
        raise NexusError(
            f"layer {layer}: the selected experts' importances {importances} cannot be used as weights "
            "(they must be non-negative with a positive sum); use --weighting uniform"
        )
    return [float(v) / total for v in importances]


class ConvertConfig(Seeded, RemoteCode):
    """``nexus convert``: the initial adapter, averaged from the selected experts' checkpoint slices."""

    model: str = input_(help="base model directory (config.json + safetensors)", identity="model")
    selection: str | None = input_(
        None, help="output of nexus analyze (needed by the pca/frequency/gate inits)"
    )
    output: str = input_(help="adapter directory to write (atomically)")
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    init: Literal["pca", "zero", "random", "frequency", "gate"] = setting(
        "pca",
        help="pca: average the analysis' selected experts; frequency/gate: average the experts ranked by "
        "that ESFT score; zero: start exactly at the base model; random",
    )
    weighting: Literal["uniform", "importance"] = setting(
        "uniform", help="how the selected experts are averaged (importance: proportional to it)"
    )
    intermediate_size: int | None = setting(
        None,
        help="shared-expert width (none: the experts'); an averaged init wider than the experts gets extra "
        "units that start at zero output, a narrower one keeps the average's largest units",
        gt=0,
    )
    gate: Literal["scalar", "sigmoid", "none"] = setting("scalar", help="output gate of the shared expert")
    scale: float = setting(
        1.0,
        help="initial output scale for every gate: the adapter starts at SCALE x the averaged experts (the "
        "scalar gate's value; folded into the down projection otherwise, sigmoid compensating its initial 0.5)",
        allow_inf_nan=False,
    )
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", help="dtype of the adapter tensors (the average is always taken in float32)"
    )
    max_in_flight: int | None = setting(
        None,
        fingerprint=False,
        help="layer tasks running or finished-but-unwritten at once (none: the cluster's CPUs, at least 2); "
        "bounds the driver's and the object store's memory",
        gt=0,
    )


@claims_released()
def run(cfg: ConvertConfig | None = None, /, **kwargs) -> Path:
    """Write an initial adapter for ``cfg.model`` into ``cfg.output``; returns the adapter
    directory, loadable with :func:`nexus.load_adapter`.

    ``pca``, ``frequency`` and ``gate`` average selected experts and need ``cfg.selection``;
    ``zero`` (output exactly zero: the model starts as the base) and ``random`` do not. Any
    init may use another ``intermediate_size`` (see :func:`fit_width`).
    """
    cfg = ConvertConfig.build(cfg, **kwargs)
    init, gate, scale, dtype, seed = cfg.init, cfg.gate, cfg.scale, cfg.adapter_dtype, cfg.seed
    intermediate_size = cfg.intermediate_size
    averaged = init in AVERAGED
    if averaged and cfg.selection is None:
        raise NexusError(
            f"--init {init} averages selected experts and needs --selection (the output of nexus analyze)"
        )
    claim_output(cfg.output, cfg.overwrite)

    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    family = family_for_config(config)
    ident = model_identity(config)
    meta = meta_model(config)
    blocks = find_moe_blocks(meta)
    specs = {
        b.layer: spec_for_block(
            b, family, config, intermediate_size=intermediate_size, gate=gate, gate_init=float(scale)
        )
        for b in blocks
    }
    expert_width = int(spec_for_block(blocks[0], family, config).intermediate_size)
    resized = intermediate_size is not None and int(intermediate_size) != expert_width
    shapes = layer_shapes(config, meta)
    del meta, blocks
    layers = sorted(specs)

    sel = None
    if cfg.selection is not None:
        sel = load_selection(cfg.selection)
        check_against_model(
            sel["layers"], int(sel["num_experts"]), sel.get("identity"), ident, f"selection {sel['_path']}"
        )

    spec0 = specs[layers[0]]
    if any(s != spec0 for s in specs.values()):
        raise NexusError(
            "MoE layers of this model have experts of different shapes; the adapter format needs one shape"
        )
    per_layer_entries = {layer: tuple(_tensor_entries(layer, spec0, dtype)) for layer in layers}
    common = {"spec": spec0.to_dict(), "init": init, "seed": int(seed), "scale": float(scale), "dtype": dtype}
    jobs: list[LayerJob] = []
    init_record: dict = {"method": init, "seed": int(seed), "scale": float(scale), "gate": gate}
    if averaged:
        ckpt = Checkpoint(cfg.model)
        method = None if init == "pca" else init
        chosen = {}
        for layer in layers:
            experts, imps = selected_experts(sel, layer, method)
            weights = _layer_weights(experts, imps, cfg.weighting, layer)
            plan = plan_layer(ckpt, shapes[layer])
            chosen[str(layer)] = {"experts": experts, "importances": imps, "weights": weights}
            jobs.append(
                LayerJob(
                    layer,
                    entries=per_layer_entries[layer],
                    plan=plan,
                    experts=tuple(experts),
                    weights=tuple(weights),
                    average_width=expert_width if resized else None,
                    **common,
                )
            )
        del ckpt
        init_record.update(
            {
                "weighting": cfg.weighting,
                "importance": sel["importance"] if init == "pca" else init,
                "rule": sel["rule"],
                "selection": sel.get("_path", ""),
                "layers": chosen,
            }
        )
        if resized:
            init_record["width"] = "widened" if intermediate_size > expert_width else "narrowed"
    else:
        jobs = [LayerJob(layer, entries=per_layer_entries[layer], **common) for layer in layers]
    if intermediate_size is not None:
        init_record["intermediate_size"] = int(intermediate_size)

    adapter_cfg = adapter_config(
        spec=spec0,
        layers=layers,
        identity=ident,
        base_model=cfg.model,
        dtype=dtype,
        init=init_record,
    )
    entries = [(name, st, shape) for layer in layers for _, name, st, shape in per_layer_entries[layer]]
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        target = tmp / WEIGHTS_NAME
        spans = preallocate_safetensors(target, entries, metadata={"format": FORMAT})
        nonce = secrets.token_hex(16)
        (tmp / NONCE_FILE).write_text(nonce)
        jobs = [replace(j, target=(str(target), nonce, {e[1]: spans[e[1]] for e in j.entries})) for j in jobs]
        remote = 0
        for result in _run_jobs(jobs, cfg.max_in_flight):
            if not result["written"]:  # the task ran where it cannot see our file
                remote += 1
                for name, data in result["tensors"].items():
                    write_at(target, spans[name], data)
            del result
        (tmp / NONCE_FILE).unlink()
        write_json(tmp / CONFIG_NAME, adapter_cfg)
        if remote:
            log.info("%d layer(s) came back through the object store (tasks on other nodes)", remote)
    log.info("wrote adapter %s (%d layers, init %s)", cfg.output, len(layers), init)
    return Path(cfg.output)


def _run_jobs(jobs: list[LayerJob], max_in_flight: int | None):
    """Run the layer tasks on Ray and yield their results as they finish, with at most
    ``max_in_flight`` tasks submitted at once (results that come back through the object
    store therefore never pile up)."""
    ensure_ray()
    if max_in_flight is None:
        max_in_flight = max(2, int(ray.cluster_resources().get("CPU", 1)))
    need = max(j.memory_bytes() for j in jobs)
    nodes_mem = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    if nodes_mem and need > max(nodes_mem):
        raise NexusError(
            f"a conversion task needs about {need / 1e9:.1f} GB of memory but the largest Ray node offers "
            f"{max(nodes_mem) / 1e9:.1f} GB; add a bigger CPU node"
        )
    task = ray.remote(build_layer)
    queue = list(jobs)
    pending: list = []

    def submit() -> None:
        while queue and len(pending) < max_in_flight:
            job = queue.pop(0)
            opts = {"num_cpus": 1, "memory": job.memory_bytes(), "name": f"nexus-convert-layer-{job.layer}"}
            pending.append(task.options(**opts).remote(job))

    submit()
    try:
        while pending:
            done, _ = ray.wait(pending, num_returns=1)
            pending.remove(done[0])
            with user_errors("converting the checkpoint"):
                result = ray.get(done[0])
            submit()
            yield result
            del result
    finally:
        for ref in pending:
            ray.cancel(ref)


def summary_lines(adapter: Path, cfg: ConvertConfig) -> list[str]:
    return [f"adapter written to {adapter}"]


def job_inputs(job) -> dict:
    """In the job: the base model's checkpoint and the analyze stage's selection."""
    return {"model": job.model_dir, "selection": job.stage_dir("analyze")}
