"""Where a base model's files come from: `model.base_model` (and `model.tokenizer`) -> a folder or hub id, and
the tokenizer in it. Shared by model/ (weights) and data/ (tokenizer) so that neither imports the other.

folders.py (hub id, local folder, `random:<shape>`, the built-in tiny model, a `.gguf` file -> what to load),
tokenizer.py (the tokenizer with its pad token), tiny.py (the built-in offline LLaMA folder), gguf.py (a GGUF
file converted once into a cached folder). Imports core/, utils/ and tasks/ only (tests/test_layers.py checks
it): the tiny tokenizer is trained on the built-in task's text (`tasks/synthetic_e2e.py`).
"""
