"""``nexus plan``: the peak memory of every stage, per worker, predicted from ``config.json`` alone.

A GPT-OSS-120B run that dies of out-of-memory after an hour of collection is the failure
this module exists to prevent. The prediction needs no weights: the model is built on the
meta device (exact parameter counts and module structure, no memory, about a second for
120B), and every other term is a formula of the shapes and the stage's settings.

What a worker holds, and the formulas (``b``: bytes per element of the compute dtype;
``T = batch x seq_len`` tokens; ``R = T x top_k`` routed rows; ``H`` hidden, ``I`` expert
width, ``V`` vocabulary; each term is a function below with its own docstring):

- **frozen weights**: the base in ``model.dtype``; routed experts either in the compute dtype
  (dequantised) or as the checkpoint's MXFP4 ``*_blocks``/``*_scales`` (packed, 4.25 bits per
  weight) plus biases, with one expert's dequantised weights as working memory;
- **trainable shared experts**: fp32 master weights (4 bytes per parameter), their
  **gradients** (4, plus DDP's bucket copy with several workers) and **AdamW state** (8);
- **activations**: per decoder layer, the tensors autograd keeps for backward (attention,
  routed experts on ``R`` rows, norms, shared expert), all layers' worth without gradient
  checkpointing, one layer's worth plus every layer's input with it; forward-only stages hold
  one layer's temporaries at a time;
- **logits / loss chunks**: losses are computed over ``loss_chunk`` positions at a time
  (:mod:`nexus.stages.train.losses`), so the vocabulary-sized tensors are ``batch x chunk x V``;
- **runtime**: what a process needs besides tensors (CUDA context and workspaces on a GPU).

The coefficients (how many tensors of each size a piece of code keeps) were read off the code
and checked against measured peaks on CPU (``tests/test_planner.py`` measures the real stages
within 20%). Training's peak is the largest of its phases (teacher forward, student forward
and loss, backward, optimizer step); the parts shown are the memory at that phase, so they add
up to the peak.

Modules: ``units`` (sizes), ``model`` (facts from the meta model, the MXFP4 format),
``workload`` (a stage's resolved settings, strategies), ``terms`` (activation terms),
``stages`` (a worker's parts per stage and training phase), ``verdict`` (devices, fits,
advice), ``report`` (table, JSON, chart), ``job`` (job configs, the job's preflight),
``predict`` (:func:`plan`).

Extension points: :data:`STRATEGIES` (how DDP, and later FSDP, place the frozen base and the
trainable state on the workers), :class:`Workload` ``teacher`` (``online`` KD today; offline
top-k distillation would add its bytes per token there), :data:`PLANNERS` (one planner per
stage) and :data:`PACKED` (the packed experts' working-set constants).
"""

from nexus.planner.job import check_job, job_devices, make_plan, workloads
from nexus.planner.model import PACKED, ModelFacts, PackedExperts, model_facts, mxfp4_bytes, shared_params
from nexus.planner.predict import plan
from nexus.planner.report import Plan, format_plan, plot_plan
from nexus.planner.stages import PLANNERS, StagePlan, frozen_weights, training_phases
from nexus.planner.units import GB, parse_size
from nexus.planner.verdict import Devices, advise
from nexus.planner.workload import STAGES, STRATEGIES, Strategy, Workload

__all__ = [
    "GB",
    "PACKED",
    "PLANNERS",
    "STAGES",
    "STRATEGIES",
    "Devices",
    "ModelFacts",
    "PackedExperts",
    "Plan",
    "StagePlan",
    "Strategy",
    "Workload",
    "advise",
    "check_job",
    "format_plan",
    "frozen_weights",
    "job_devices",
    "make_plan",
    "model_facts",
    "mxfp4_bytes",
    "parse_size",
    "plan",
    "plot_plan",
    "shared_params",
    "training_phases",
    "workloads",
]
