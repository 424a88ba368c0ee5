"""The ops under ``torch.compile``: registered as custom ops, traced with no graph break on both
backends (the Triton one under the interpreter on CPU), equal to eager, and a decode step with
eviction compiled once for every step past the budget.

Compilation uses the ``eager``/``aot_eager`` backends: what is tested is the tracing (Dynamo) and
functionalization of the mutations (AOTAutograd), not Inductor's code generation.
"""

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import _library

from ..helpers import device
from .test_engine_loop import HEAD_DIM, KV_HEADS, LAYERS, Q_HEADS, RECENT, SINK, VOCAB, WINDOW, build_weights, heads

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Every test here runs on the twins and on the kernels (Triton's interpreter without a GPU)."""
    monkeypatch.setenv("EPIKV_BACKEND", request.param)
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def attention_inputs(generator, dev, batch=2, num_queries=3, num_slots=10):
    q = torch.randn(batch, Q_HEADS, num_queries, HEAD_DIM, generator=generator).to(dev)
    k, v = (torch.randn(batch, KV_HEADS, num_slots, HEAD_DIM, generator=generator).to(dev) for _ in range(2))
    # Slot order means nothing: shuffled positions, two empty slots, the queries in scattered slots.
    pos = torch.stack([torch.randperm(num_slots, generator=generator) for _ in range(batch)]).to(dev)
    pos[:, :2] = -1
    query_slots = pos.argsort(dim=1)[:, -num_queries:].contiguous()
    prev_k, prev_v = (torch.randn(batch, KV_HEADS, HEAD_DIM, generator=generator).to(dev) for _ in range(2))
    return q, k, v, pos, query_slots, prev_k, prev_v


def zscore_inputs(generator, dev, batch=2, bands=3, num_tokens=4, width=5):
    values = torch.randn(batch, bands, num_tokens, generator=generator)
    values[0, 1, 0] = float("nan")
    ring = torch.randn(batch, bands, width, generator=generator)
    count = torch.randint(0, 9, (batch, bands), generator=generator)
    weights = torch.randn(bands, generator=generator)
    return values.to(dev), ring.to(dev), count.to(dev), weights.to(dev)


def eviction_inputs(generator, dev, planes=3, batch=2, num_slots=12, budget=7):
    kv = torch.randn(planes, batch, KV_HEADS, num_slots, HEAD_DIM, generator=generator).to(dev)
    pos = torch.stack([torch.randperm(num_slots, generator=generator) for _ in range(batch)]).to(dev)
    scores = torch.randn(batch, num_slots, generator=generator).to(dev)
    keep = ops.select_slots(scores, pos, budget, protect_prefix=1, recent=2)
    return kv, pos, scores, ops.compaction_plan(keep, budget)


def opcheck_cases(dev):
    generator = torch.Generator().manual_seed(0)
    q, k, v, pos, query_slots, prev_k, prev_v = attention_inputs(generator, dev)
    lse = ops.slot_attention(q, k, v, pos, query_slots=query_slots, return_lse=True).lse
    slot_count = torch.tensor([pos.shape[1], pos.shape[1] - 1], dtype=torch.int32, device=dev)
    return {
        "attention with every option": (
            _library.slot_attention.custom_op,
            (q, k, v, pos, query_slots, 0.3, 4, prev_k, prev_v, True, True, 2, slot_count)),
        "attention with none": (
            _library.slot_attention.custom_op, (q, k, v, pos, None, None, None, None, None, False, False, None, None)),
        "column sums": (_library.attention_column_sums.custom_op, (q, k, pos, lse, query_slots, None, 4, slot_count)),
        "rolling z-score": (_library.rolling_zscore.custom_op, (*zscore_inputs(generator, dev), 1e-6)),
        "compaction": (_library.compact_slots_.custom_op, eviction_inputs(generator, dev)),
    }


@pytest.mark.parametrize(
    "case", ["attention with every option", "attention with none", "column sums", "rolling z-score", "compaction"]
)
def test_opcheck(backend, case):
    """Schemas, fake implementations (shapes, dtypes, strides) and the declared mutations."""
    op, args = opcheck_cases(device())[case]
    torch.library.opcheck(op, args)


def every_op(q, k, v, pos, query_slots, prev_k, prev_v, values, ring, count, weights, kv, kv_pos, kv_scores):
    """One call of each public op; returns every output, mutating the z-score state and the cache."""
    attention = ops.slot_attention(
        q, k, v, pos, query_slots=query_slots, window=WINDOW, prev_k=prev_k, prev_v=prev_v,
        return_lse=True, check_positions=False,
    )
    without = ops.slot_attention(q, k, v, pos, with_deltas=False, check_positions=False)
    column_sums = ops.attention_column_sums(
        q, k, pos, attention.lse, query_slots=query_slots, window=WINDOW, check_positions=False
    )
    score = ops.rolling_zscore(values, ring, count, weights)
    destination = ops.evict_(kv, kv_pos, kv_scores, 7, protect_prefix=torch.ones_like(kv_pos[:, 0]), recent=2)
    assert without.dk is None and without.dv is None and without.lse is None
    return (*attention, without.out, column_sums, score, destination)


def assert_one_graph_equal_to_eager(fn, inputs, op_names):
    """``fn`` compiled with ``fullgraph=True`` traces to one graph holding each of ``op_names`` as one node,
    and gives exactly eager's outputs and mutated inputs (each side runs on its own clones). Returns
    eager's outputs."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    eager_inputs = [x.clone() for x in inputs]
    expected = fn(*eager_inputs)
    compiled_inputs = [x.clone() for x in inputs]
    actual = torch.compile(fn, backend=capture, fullgraph=True)(*compiled_inputs)

    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    for name in op_names:
        assert f"epikv_triton.{name}.default" in targets, f"{name} is not one node of the graph"
    for what, mine, ref in zip(("outputs", "mutated inputs"), (actual, compiled_inputs), (expected, eager_inputs)):
        for index, (a, e) in enumerate(zip(mine, ref)):
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=f"{what} {index} differ")
    return expected


def test_every_op_traces_as_one_graph_equal_to_eager(backend):
    generator = torch.Generator().manual_seed(1)
    dev = device()
    inputs = (*attention_inputs(generator, dev), *zscore_inputs(generator, dev), *eviction_inputs(generator, dev)[:3])
    assert_one_graph_equal_to_eager(
        every_op, inputs, ("slot_attention", "attention_column_sums", "rolling_zscore", "compact_slots_")
    )


# --------------------------------------------------------------------------- #
# A compiled decode step with eviction
# --------------------------------------------------------------------------- #

BUDGET, PROMPT, STEPS_PAST_BUDGET = 10, 6, 20
CAPACITY = BUDGET + 1  # evict every step: the new token's slot is always the last one


def decode_step(w, tokens, state):
    """One greedy decode step over the whole buffer: write the new token into the last slot, attend
    with it as the query slot, score it, and evict back to ``BUDGET`` slots, moving it into the freed
    slot. Static shapes, state in device tensors mutated in place; returns the next tokens."""
    kv, pos, scores, ring, count, prev_k, prev_v, seen, band_weights = state
    batch = tokens.shape[0]
    query_slots = torch.full((batch, 1), CAPACITY - 1, dtype=torch.int64, device=tokens.device)
    pos[:, CAPACITY - 1] = seen
    x = w["embed"][tokens]
    layer_signal = []
    for layer, lw in enumerate(w["layers"]):
        q = heads(x @ lw["q"], Q_HEADS)
        kv[0, layer, :, :, CAPACITY - 1 :] = heads(x @ lw["k"], KV_HEADS)
        kv[1, layer, :, :, CAPACITY - 1 :] = heads(x @ lw["v"], KV_HEADS)
        result = ops.slot_attention(
            q, kv[0, layer], kv[1, layer], pos, query_slots=query_slots, window=WINDOW if layer == 1 else None,
            prev_k=prev_k[layer], prev_v=prev_v[layer], check_positions=False,
        )
        prev_k[layer].copy_(kv[0, layer, :, :, CAPACITY - 1])
        prev_v[layer].copy_(kv[1, layer, :, :, CAPACITY - 1])
        x = x + result.out.transpose(1, 2).reshape(x.shape) @ lw["o"]
        layer_signal.append((result.dk + result.dv).mean(dim=1))
    scores[:, CAPACITY - 1 :] = ops.rolling_zscore(torch.stack(layer_signal, dim=1), ring, count, band_weights)
    ops.evict_(kv.flatten(0, 1), pos, scores, BUDGET, protect_prefix=SINK, recent=RECENT)
    seen.add_(1)
    return (x[:, -1] @ w["unembed"]).argmax(dim=-1, keepdim=True)


def prefill(w, dev):
    """The prompt, eagerly, into slots ``[0, PROMPT)``; returns the first decode tokens and the state."""
    batch = 2
    kv = torch.zeros(2, LAYERS, batch, KV_HEADS, CAPACITY, HEAD_DIM, device=dev)
    pos = torch.full((batch, CAPACITY), -1, dtype=torch.int64, device=dev)
    pos[:, :PROMPT] = torch.arange(PROMPT, device=dev)
    scores = torch.full((batch, CAPACITY), float("nan"), device=dev)
    scores[:, :PROMPT] = 0.0
    tokens = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(2)).to(dev)
    x = w["embed"][tokens]
    for layer, lw in enumerate(w["layers"]):
        kv[0, layer, :, :, :PROMPT] = heads(x @ lw["k"], KV_HEADS)
        kv[1, layer, :, :, :PROMPT] = heads(x @ lw["v"], KV_HEADS)
        out = ops.slot_attention(heads(x @ lw["q"], Q_HEADS), kv[0, layer, :, :, :PROMPT],
                                 kv[1, layer, :, :, :PROMPT], pos[:, :PROMPT], with_deltas=False).out
        x = x + out.transpose(1, 2).reshape(x.shape) @ lw["o"]
    state = (
        kv, pos, scores,
        torch.zeros(batch, LAYERS, 5, device=dev), torch.zeros(batch, LAYERS, dtype=torch.int64, device=dev),
        kv[0, :, :, :, PROMPT - 1].clone(), kv[1, :, :, :, PROMPT - 1].clone(),
        torch.full((batch,), PROMPT, dtype=torch.int64, device=dev), torch.tensor([1.29, -1.0], device=dev),
    )
    return (x[:, -1] @ w["unembed"]).argmax(dim=-1, keepdim=True), state


def decode(step, dev):
    weights = build_weights(torch.Generator().manual_seed(4))
    w = {"embed": weights["embed"].to(dev), "unembed": weights["unembed"].to(dev),
         "layers": [{n: t.to(dev) for n, t in layer.items()} for layer in weights["layers"]]}
    tokens, state = prefill(w, dev)
    history = []
    for _ in range(BUDGET - PROMPT + STEPS_PAST_BUDGET):
        tokens = step(w, tokens, state)
        pos = state[1]
        history.append((tokens.cpu(), pos.cpu().clone()))
    return history


def test_compiled_decode_loop_compiles_once_and_matches_eager(backend):
    dev = device()
    expected = decode(decode_step, dev)
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = decode(torch.compile(decode_step, backend="aot_eager", fullgraph=True), dev)
    kept = [int((pos >= 0).sum(dim=1).max()) for _, pos in expected]
    assert kept[-STEPS_PAST_BUDGET:] == [BUDGET] * STEPS_PAST_BUDGET, "the loop must run past the budget"
    for step, ((tokens, pos), (ref_tokens, ref_pos)) in enumerate(zip(actual, expected)):
        assert torch.equal(tokens, ref_tokens), f"tokens differ at step {step}"
        assert torch.equal(pos, ref_pos), f"kept slots differ at step {step}"
