"""The public ops API: input validation, dispatch and import hygiene."""

import subprocess
import sys

import pytest
import torch
import triton

from epikv_triton import ops
from epikv_triton.ops import _triton_support, attention, compaction, h2o, zscore


def attention_inputs(B=2, Hq=4, Hkv=2, T=3, S=7, D=16, dtype=torch.float32):
    q = torch.randn(B, Hq, T, D, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, dtype=dtype)
    pos = torch.arange(S).repeat(B, 1)
    return q, k, v, pos


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(k=a["k"][:, :, :, :8]), "k must have shape"),
        (lambda a: a.update(q=torch.randn(2, 3, 3, 16)), "multiple of key/value heads"),
        (lambda a: a.update(q=torch.randn(2, 0, 3, 16)), "positive multiple of key/value heads"),
        (lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]), r"empty head dim \(D = 0\)"),
        (
            lambda a: a.update(k=a["k"][:, :, :0], v=a["v"][:, :, :0], pos=a["pos"][:, :0],
                               query_slots=torch.zeros(2, 3, dtype=torch.int64)),
            r"k has no slots \(S = 0\)",
        ),
        (lambda a: a.update(v=a["v"][:, :1]), "v must have shape"),
        (lambda a: a.update(q=a["q"].double()), "q must have dtype"),
        (lambda a: a.update(k=a["k"].half()), "share one dtype"),
        (lambda a: a.update(pos=a["pos"].float()), "pos must have dtype"),
        (lambda a: a.update(pos=a["pos"][:, :5]), "pos must have shape"),
        (lambda a: a.update(q=torch.randn(2, 4, 9, 16)), "last T key slots"),
        (lambda a: a.update(q=a["q"][0]), "q must have 4 dimensions"),
        (lambda a: a.update(prev_k=torch.randn(2, 2, 8)), "prev_k must have shape"),
        (lambda a: a.update(window=0), "window must be a positive int"),
        (lambda a: a.update(num_splits=0), "num_splits must be a positive int"),
        (lambda a: a["pos"].__setitem__((0, 5), 2), "positions out of order"),
        (lambda a: a["pos"].__setitem__((0, 6), 5), "positions out of order"),  # equal: not strictly increasing
        (lambda a: a["pos"].__setitem__((1, 0), -3), "must be -1"),
        (lambda a: a.update(q=a["q"].to("meta")), "one device"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5, 6]] * 2).float()), "query_slots must have dtype"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5]] * 2)), r"query_slots must have shape \[B, T\]"),
        (lambda a: a.update(query_slots=torch.tensor([4, 5, 6])), "query_slots must have 2 dimensions"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5, 7]] * 2)), r"every entry in \[0, S=7\)"),
        (lambda a: a.update(query_slots=torch.tensor([[-1, 5, 6]] * 2)), r"every entry in \[0, S=7\)"),
        (lambda a: a.update(query_slots=torch.tensor([[6, 5, 4]] * 2)), "positions out of order"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5, 6]] * 2, device="meta")), "one device"),
        (lambda a: a.update(slot_count=torch.tensor([7, 7]).float()), "slot_count must have dtype"),
        (lambda a: a.update(slot_count=torch.tensor([7, 7, 7])), r"slot_count must have shape \[B\]"),
        (lambda a: a.update(slot_count=torch.tensor([7, 7], device="meta")), "one device"),
    ],
)
def test_attention_rejects_bad_input(mutate, message):
    q, k, v, pos = attention_inputs()
    args = dict(q=q, k=k, v=v, pos=pos)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.slot_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("pos"), **args)


def test_attention_accepts_padding_and_unchecked_positions():
    q, k, v, pos = attention_inputs()
    pos[1, :2] = -1
    pos[1, 2:] -= 2
    ops.slot_attention(q, k, v, pos)
    ops.slot_attention(q, k, v, pos, query_slots=torch.tensor([[0, 3, 6], [2, 4, 6]], dtype=torch.int32))
    pos[0, 5] = 2  # out of order, but the caller vouches for its positions
    ops.slot_attention(q, k, v, pos, check_positions=False)
    pos[0, 2:] = -5  # past sequence 0's two slots in use: empty whatever they hold, so not checked
    ops.slot_attention(q, k, v, pos, slot_count=torch.tensor([2, 7], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_runs_on_both_backends(monkeypatch, backend):
    """B = 0 is valid: both backends return empty results of the right shapes."""
    monkeypatch.setenv("EPIKV_BACKEND", backend)
    q, k, v, pos = attention_inputs(B=0)
    result = ops.slot_attention(q, k, v, pos, return_lse=True)
    assert [tuple(x.shape) for x in result] == [(0, 4, 3, 16), (0, 2, 3), (0, 2, 3), (0, 4, 3)]
    assert ops.attention_column_sums(q, k, pos, result.lse).shape == (0, 2, 7)


def zscore_inputs(B=2, NB=2, T=5, W=8):
    return (
        torch.randn(B, NB, T),
        torch.zeros(B, NB, W),
        torch.zeros(B, NB, dtype=torch.int64),
        torch.tensor([1.29, -1.0]),
    )


@pytest.mark.parametrize(
    "index, replacement, message",
    [
        (0, torch.randn(2, 2, 5).double(), "values must have dtype"),
        (1, torch.zeros(2, 3, 8), "ring must have shape"),
        (2, torch.zeros(2, 2, dtype=torch.int32), "count must have dtype"),
        (2, torch.zeros(3, 2, dtype=torch.int64), "count must have shape"),
        (3, torch.tensor([1.0, 2.0, 3.0]), "weights must have shape"),
        (1, torch.zeros(2, 8, 2).transpose(1, 2), "contiguous"),
        (3, torch.tensor([1.0, -1.0], device="meta"), "one device"),
    ],
)
def test_zscore_rejects_bad_input(index, replacement, message):
    args = list(zscore_inputs())
    args[index] = replacement
    with pytest.raises(ValueError, match=message):
        ops.rolling_zscore(*args)


def test_select_rejects_budget_below_protected_set():
    scores, pos = torch.randn(2, 20), torch.arange(20).repeat(2, 1)
    with pytest.raises(ValueError, match="smaller than the protected set"):
        ops.select_slots(scores, pos, 10, protect_prefix=4, recent=8)
    with pytest.raises(ValueError, match="smaller than the protected set"):
        ops.select_slots(scores, pos, 10, protect_prefix=[2, 9], recent=2)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        ops.select_slots(scores, pos, 0, protect_prefix=0, recent=0)
    with pytest.raises(ValueError, match="one per sequence"):
        ops.select_slots(scores, pos, 10, protect_prefix=[1, 2, 3], recent=2)
    with pytest.raises(ValueError, match="pos must have shape"):
        ops.select_slots(scores, pos[:, :5], 10, protect_prefix=1, recent=2)


def test_compact_rejects_bad_input():
    kv = torch.randn(4, 2, 2, 9, 16)
    pos, scores = torch.arange(9).repeat(2, 1), torch.randn(2, 9)
    destination = torch.tensor([[0, -1], [-1, 3]])
    with pytest.raises(ValueError, match="kv must have 5 dimensions"):
        ops.compact_slots_(kv[0], pos, scores, destination)
    with pytest.raises(ValueError, match="scores must have dtype"):
        ops.compact_slots_(kv, pos, scores.half(), destination)
    with pytest.raises(ValueError, match="destination must have shape"):
        ops.compact_slots_(kv, pos, scores, torch.arange(10).repeat(2, 1))
    with pytest.raises(ValueError, match="destination must have dtype"):
        ops.compact_slots_(kv, pos, scores, destination.int())
    with pytest.raises(ValueError, match="pos must have shape"):
        ops.compact_slots_(kv, pos[:1], scores, destination)


@pytest.mark.parametrize("launch", ["attention", "column_sums"])
def test_kernels_refuse_planes_past_32_bit_offsets(launch):
    """A (batch, head) plane spanning more than 2**31 elements (here q as HF's [B, T, Hq, D] view
    of a 2**20 + 1-token chunk at 16 heads of 128) is refused before any launch; a token less passes.
    Meta tensors: only shapes and strides are read."""
    def inputs(T):
        q = torch.empty(1, T, 16, 128, device="meta").transpose(1, 2)
        k = torch.empty(1, 2, T, 128, device="meta")
        pos = torch.empty(1, T, dtype=torch.int64, device="meta")
        return q, k, pos

    def run(q, k, pos):
        if launch == "attention":
            attention.slot_attention(q, k, k, pos)
        else:
            h2o.attention_column_sums(q, k, pos, torch.empty(q.shape[:3], device="meta"))

    with pytest.raises(ValueError, match=r"q spans 2147483776 elements .* shorter chunks"):
        run(*inputs(2**20 + 1))
    q, k, pos = inputs(2**20)
    _triton_support.require_int32_plane_offsets(q=q, k=k, pos=pos)


def test_backend_env(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("EPIKV_BACKEND", "torch")
    assert ops.backend_for(x) == "torch"
    monkeypatch.setenv("EPIKV_BACKEND", "cuda")
    with pytest.raises(ValueError, match="EPIKV_BACKEND must be"):
        ops.backend_for(x)
    monkeypatch.setenv("EPIKV_BACKEND", "triton")
    monkeypatch.setattr(_triton_support, "INTERPRET", False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs GPU tensors"):
            ops.backend_for(x)


def test_backend_follows_the_interpreter_flag_fixed_at_import(monkeypatch):
    """Kernels were built for the interpreter or not when imported: a later TRITON_INTERPRET must not reroute."""
    x = torch.zeros(1)
    monkeypatch.delenv("EPIKV_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if _triton_support.INTERPRET else "1")
    assert ops.backend_for(x) == ("triton" if _triton_support.INTERPRET or x.is_cuda else "torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_are_inference_only(monkeypatch, backend):
    """With grad on and an input requiring grad, backward raises on both backends (never a silently
    gradient-free output); under no_grad / inference_mode nothing is recorded."""
    monkeypatch.setenv("EPIKV_BACKEND", backend)
    q, k, v, pos = attention_inputs()
    q.requires_grad_(True)
    result = ops.slot_attention(q, k, v, pos, return_lse=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        result.out.sum().backward()
    column_sums = ops.attention_column_sums(q, k, pos, result.lse.detach())
    with pytest.raises(RuntimeError, match="inference-only"):
        column_sums.sum().backward()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert not ops.slot_attention(q, k, v, pos).out.requires_grad


def test_importing_ops_loads_no_transformers():
    code = (
        "import sys\n"
        "from epikv_triton import ops\n"
        "import epikv_triton.ops.naive\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


@pytest.mark.parametrize("module", [attention, h2o, zscore, compaction], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_autotuners_never_copy_caller_tensors(module):
    """Tuning times configs on the caller's own arguments: it must save, zero or restore none of them.

    ``restore_value``/``reset_to_zero`` make Triton clone (or overwrite) the named
    arguments around every trial, and a custom pre-hook could do the same; the
    one allowed is attention's, which only sizes the box of the launcher's own
    TMA descriptors. The in-place z-score and compaction kernels are not tuned
    at all: they pick their config from the shape.
    """
    tuners = [value for value in vars(module).values() if isinstance(value, triton.runtime.Autotuner)]
    for tuner in tuners:
        assert tuner.restore_value == [] and tuner.reset_to_zero == [], f"{module.__name__} tuner copies arguments"
        assert not tuner.user_defined_pre_hook and not tuner.user_defined_post_hook
        assert all(config.pre_hook in (None, attention._set_descriptor_blocks) for config in tuner.configs)
    if module in (zscore, compaction):
        assert tuners == []
    else:
        assert tuners, f"{module.__name__} has no autotuner to inspect"


def test_zscore_config_heuristic():
    """One warp for the default 2 bands × 64; wider tiles spread over more warps, never beyond the space."""
    assert zscore.zscore_config(2, 64).num_warps == 1
    assert zscore.zscore_config(8, 256).num_warps == 2
    assert zscore.zscore_config(64, 1024).num_warps == max(c.num_warps for c in zscore.ZSCORE_CONFIGS)
    assert all(zscore.zscore_config(nb, w) in zscore.ZSCORE_CONFIGS for nb in (1, 4, 32) for w in (1, 64, 4096))
