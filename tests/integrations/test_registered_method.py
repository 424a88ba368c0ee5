"""The registry is the one source of the methods: a method registered inside a test, and nowhere else, is
validated by the config, offered by the CLI and run by the generic checks every evicting method gets."""

from __future__ import annotations

import torch

from epikv_triton.cli import method_name
from epikv_triton.config import EpiKVConfig
from epikv_triton.scoring import Method, Scorer, evicting_methods, readme_table
from tests.methods import registered

from .models import prompts
from .test_eviction import check_equals_masking_reference
from .test_generate import check_large_budget_matches_unpatched


class EvenPositions(Scorer):
    """Prefers even positions: a rule no built-in method has, so the kept set shows whose scores the cache used."""

    def finish_chunk(self) -> torch.Tensor:
        return (self.chunk.positions % 2 == 0).float()


THROWAWAY = Method("throwaway", "even positions", "positions", lambda config, num_layers: EvenPositions())


def test_a_method_registered_in_a_test_runs_through_the_generic_checks():
    with registered(THROWAWAY):
        assert EpiKVConfig(method="throwaway").evicts
        assert "throwaway" in evicting_methods() and method_name("throwaway") == "throwaway"
        assert "| `throwaway` | even positions | positions |" in readme_table()
        check_large_budget_matches_unpatched("llama", 2, ["throwaway"])
        check_equals_masking_reference("qwen3", "throwaway", batch=1, every=16, keep_prompt=False)
        steps = check_equals_masking_reference("llama", "throwaway", batch=2, every=1, keep_prompt=True)
    assert "throwaway" not in evicting_methods()
    # Between the protected prompt and the recent window (budget 32 // 4 = 8 tokens) only scores decide.
    real_prompt = prompts(2)["attention_mask"].sum(dim=1).tolist()
    for kept, prompt_length in zip(steps[-1]["kept"], real_prompt):
        scored = kept[prompt_length:-8]
        assert scored and all(position % 2 == 0 for position in scored), kept
