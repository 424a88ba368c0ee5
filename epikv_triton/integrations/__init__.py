"""Hugging Face integration: the library's side of transformers (the only package that imports it).

* :mod:`.patching`: ``patch``, ``unpatch``, ``new_cache`` (the lifecycle);
* :mod:`.forward`: the forward hooks and the ``"epikv"`` attention function;
* :mod:`.generation`: the ``generate`` wrappers;
* :mod:`.continuous_batching`: ``generate_batch`` (transformers' continuous batching) with eviction;
* :mod:`.request_streams`: one engine request's eviction state (transformers-free);
* :mod:`.engine`: every call into transformers' continuous-batching engine, in one place;
* :mod:`.transformers_cache`: the transformers ``Cache`` over a slot store;
* :mod:`.families`: the supported model families, one table;
* :mod:`.state`: what a patch changed, on the modules;
* :mod:`.keywords`: what the installed transformers calls the cache argument;
* :mod:`.internals`: every private transformers call, in one place.

See ``docs/architecture.md``.
"""
