"""Hugging Face integration: the library's side of transformers.

:mod:`.hf` holds the shared machinery (``patch``, ``unpatch``, ``new_cache``);
:mod:`.cache` the transformers ``Cache`` over :class:`epikv_triton.cache.SlotCache`;
:mod:`.keywords` what the installed transformers calls the cache argument;
one small adapter per model family (:mod:`.llama`, :mod:`.qwen2`, :mod:`.qwen3`).
The command line's model loading lives beside the CLI (:mod:`epikv_triton.loading`).
See ``docs/architecture.md``.
"""
