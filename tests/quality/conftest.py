"""A character-level tokenizer and a tiny random Llama: the suite end to end without a download."""

import pytest
import torch

from ..integrations.models import tiny_model
from ..test_cli import save_char_tokenizer


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # Whole models under Triton's interpreter would take minutes; the kernels have their own tests.
    monkeypatch.setenv("EPIKV_BACKEND", "torch")


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """A tiny random-weight Llama saved with a character tokenizer (no EOS: generations keep their length)."""
    folder = tmp_path_factory.mktemp("tiny_llama_chars")
    tiny_model("llama", num_layers=5).save_pretrained(folder)  # 5 layers: deep enough for every method's bands
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def char_tokenizer(model_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder)


@pytest.fixture(scope="session")
def tiny_llama(model_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
