"""Hugging Face integration: the only part of epikv_triton that imports transformers.

:mod:`.hf` holds the shared machinery (``patch``, ``unpatch``, ``new_cache``);
:mod:`.cache` the transformers ``Cache`` over :class:`epikv_triton.cache.SlotCache`;
one small adapter per model family (:mod:`.llama`, :mod:`.qwen2`, :mod:`.qwen3`).
"""
