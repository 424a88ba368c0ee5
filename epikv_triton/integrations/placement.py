"""Where a model's weights live, as ``patch`` needs to know it: one device, or tensor-parallel ranks.

* Tensor parallelism (``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))``, or the
  older ``tp_plan="auto"``, under ``torchrun``): each rank's ``k_proj``/``v_proj`` produce its own KV heads, so
  its cache holds only those. The ranks' stores must keep the same tokens: :func:`tensor_parallel_group` finds
  the process group they exchange scores over.
* Layers placed on several devices (``device_map``): refused by :func:`check_one_device`, since the slot store
  keeps every layer's keys in one buffer on one device.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

#: The name transformers gives the tensor-parallel dimension of its device mesh.
TENSOR_PARALLEL_MESH_DIM = "tp"


def tensor_parallel_group(model: nn.Module, layers: nn.ModuleList) -> dist.ProcessGroup | None:
    """The process group of the ranks ``model`` is tensor-parallel over, or ``None`` when it is not.

    transformers says whether it sharded the model (the public ``tp_size``, ``None`` when it did not); the group
    is the ``"tp"`` dimension of the device mesh the key projections' weights are sharded over (DTensors).
    """
    degree = getattr(model, "tp_size", None) or 1
    if degree == 1:
        return None
    weight = layers[0].self_attn.k_proj.weight
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None or TENSOR_PARALLEL_MESH_DIM not in (mesh.mesh_dim_names or ()):
        raise NotImplementedError(
            f"this model is tensor-parallel over {degree} ranks, but its key projection is not a DTensor sharded "
            f"over a '{TENSOR_PARALLEL_MESH_DIM}' mesh dimension, so the ranks' caches cannot agree on what to "
            "keep. Load it with from_pretrained(..., distributed_config=DistributedConfig(tp_plan='auto')) "
            "under torchrun"
        )
    group = mesh.get_group(TENSOR_PARALLEL_MESH_DIM)
    kv_heads = model.config.num_key_value_heads
    if dist.get_world_size(group) != degree or kv_heads % degree:
        raise NotImplementedError(
            f"a bounded cache needs whole KV heads on each tensor-parallel rank: {kv_heads} KV heads over "
            f"{dist.get_world_size(group)} ranks (tp_size {degree}). Use a tensor-parallel degree that divides "
            "the number of KV heads"
        )
    return group


def check_one_device(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` when ``model``'s layers are placed on several devices (``device_map``)."""
    placed = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
    placed |= {str(parameter.device) for parameter in model.parameters()}
    if len(placed) > 1:
        raise NotImplementedError(
            f"this model is placed on several devices ({', '.join(sorted(placed))}): an EpiKV cache keeps every "
            "layer's keys in one buffer on one device, so it cannot follow layers split by device_map. Load the "
            "model on one device (device_map={'': 0}), or, when it is too large for one, tensor-parallel under "
            "torchrun (from_pretrained(..., distributed_config=DistributedConfig(tp_plan='auto')))"
        )
