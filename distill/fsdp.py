"""`kava distill --parallel fsdp`: the student and its heads sharded across the ranks with FSDP2 (``fully_shard``).

Under DDP every rank holds the whole student, its gradients and AdamW's two moments: 16 bytes a parameter in fp32,
so a 7B student needs ~112 GB before activations, past any one GPU. FSDP2 splits every parameter along dim 0 into
``world_size`` shards (a DTensor); each rank keeps, clips and steps its own shard, and gathers a unit's full
parameters only while that unit runs:

- each decoder layer of the student is one unit (all-gathered before its forward and again before its backward,
  freed after each); the root unit holds the rest of what :class:`~kava.distill.module.DistillModule` trains: the
  embeddings, the final norm, the LM head (tied or not), the objective's projectors and router;
- the gradients are reduce-scattered (averaged over ranks, as DDP averages them) at every micro-batch's backward,
  so each rank accumulates its shard only: holding them whole until the step's last micro-batch (DDP's ``no_sync``)
  would keep a full-size gradient on every rank, the memory FSDP is there to save;
- with bf16 on CUDA (``--precision bf16``, or ``auto``) the gathered parameters are bf16 and the gradients are
  reduced in fp32 (``MixedPrecisionPolicy``); the sharded master weights and the optimizer stay fp32. On CPU
  (gloo) the parameters stay fp32 and ``--precision`` acts through autocast alone, as without FSDP.

Checkpoints keep the one-process format (:mod:`.checkpoint`): :func:`full_state` gathers the full weights and
optimizer state to rank 0 (``get_*_state_dict`` with ``full_state_dict``, offloaded to CPU) in the layout a plain
module and optimizer give, and :func:`load_full_state` takes them on rank 0 and hands every rank its shards
(``set_*_state_dict`` with ``broadcast_from_rank0``). So a checkpoint written under FSDP resumes under DDP with as
many ranks and back, and one process reads it (``student_at``, ``load_checkpoint``).

What FSDP leaves out: LoRA (peft's merge at the end needs the whole model in one process), ``--balance gradnorm``
and ``--grad-shares-every`` (they take gradients of each term on the student's parameters, which are shards here);
:meth:`kava.distill.config.DistillConfig.validate` refuses them with ``--parallel fsdp``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kava.core.errors import ConfigError

from .ddp import Ranks

if TYPE_CHECKING:
    from .student import Student


def shard(module: nn.Module, student: nn.Module, device: torch.device, ranks: Ranks, *, bf16: bool) -> nn.Module:
    """Shard ``module`` (the student and its heads) over every rank, in place, and return it.

    Every decoder layer of ``student`` (the classes its ``_no_split_modules`` names) is a unit of its own, then
    ``module`` takes what is left. Call it on the module as built on CPU, before the optimizer: ``fully_shard``
    moves one unit at a time to ``device`` (never the whole model) and replaces the parameters with DTensors, the
    ones the optimizer must hold. Every rank built the same weights (seeded, or read from the same files), so the
    shards fit together without a broadcast.
    """
    names = set(getattr(student, "_no_split_modules", None) or ())
    layers = [m for m in student.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"--parallel fsdp: expected {type(student).__name__} to name its decoder layer class in "
                          "`_no_split_modules`, the unit FSDP shards. Got none. Use --parallel ddp.")
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    # CPU keeps fp32 parameters (autocast still applies, as --precision asks): FSDP's bf16 gathers are for GPUs.
    dtypes = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and device.type == "cuda" else {}
    for layer in layers:  # a layer's inputs (hidden states, RoPE's cos/sin) are cast to the parameters' dtype
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(**dtypes))
    # The root's input is the Batch, whose teacher K/V must reach their decoding as stored (fp16, int8 scales),
    # not rounded to bf16 on the way in.
    fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(**dtypes, cast_forward_inputs=False))
    return module


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients: the norm of the whole gradient (each rank's sum of
    squares, all-reduced), then every shard scaled by the same factor. Returns that norm, a plain scalar tensor."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # a Partial sum over the shards: reduced here, once per step
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def finite_flags(params: list[torch.Tensor], sharded: bool) -> list[bool]:
    """Whether each of ``params`` is finite: per shard, then (``sharded``) the minimum over ranks, so every rank
    sees every rank's shards and all of them stop together."""
    flags = torch.stack([torch.isfinite(local(p.detach())).all() for p in params])  # [len(params)] bool
    if sharded:
        as_int = flags.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
        flags = as_int.bool()
    return flags.tolist()  # one device sync


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -------------------------------------------------------------------------------------------------------------------
# Full state dicts, in the one-process layout


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it): ``module.state_dict()`` with full CPU tensors on rank 0, ``{}`` elsewhere.

    Names sharing one parameter (tied embeddings) share one tensor again, as in the plain module: safetensors and
    ``save_pretrained`` then keep one copy, under the name they keep for a plain module.
    """
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _tied(module, cast("dict[str, torch.Tensor]", weights)) if weights else {}


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, Any]]:
    """Collective: the full weights and optimizer state on rank 0 (``{}, {}`` elsewhere), laid out as a plain
    module's ``state_dict()`` and a plain optimizer's ``state_dict()`` (state keyed by each parameter's index)."""
    weights = full_model_state(module)
    optim = get_optimizer_state_dict(module, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights, (_by_index(optim) if optim else {})


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor] | None,
                    optim: dict[str, Any] | None) -> None:
    """Collective: rank 0's full ``weights`` and ``optim`` (as :func:`full_state` gives them; None on the other
    ranks, which read nothing) sharded into every rank's module and optimizer."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    full: dict[str, Any] = _tied(module, weights) if weights is not None else {}
    set_model_state_dict(module, full, options=options)
    set_optimizer_state_dict(module, optimizer, _by_name(module, optimizer, optim) if optim is not None else {},
                             options=options)


def _tied(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with every name of a shared parameter pointing at one tensor: the gathered copy of the first name
    present (a file saved from a plain module holds one of them)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    out = dict(weights)
    for names in groups.values():
        present = [n for n in names if n in weights]
        if len(names) > 1 and present:
            for name in names:
                out[name] = weights[present[0]]
    return out


def _by_index(optim: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter name (DCP's layout) → keyed by index (``Optimizer.state_dict``'s:
    the parameters numbered in their groups' order)."""
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in optim["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}


def _by_name(module: nn.Module, optimizer: torch.optim.Optimizer, optim: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_by_index`, numbering this run's optimizer's parameters by their names in ``module``."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in optim["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]}


def save_student(student: Student, out: Path, weights: dict[str, torch.Tensor], prefix: str = "student.") -> None:
    """Rank 0: write the student from the gathered ``weights`` (the module's, names under ``prefix``) where
    ``AutoModelForCausalLM.from_pretrained(out)`` loads it, with its tokenizer; the sharded model itself stays as it
    is. (Under FSDP there is no LoRA to merge: the config refuses it.)"""
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    student.model.save_pretrained(str(out), state_dict=own)
    student.tokenizer.save_pretrained(out)
