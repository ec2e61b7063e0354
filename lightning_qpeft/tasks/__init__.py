"""A task's text, shared by data/ (training records) and evaluation/ (scoring) without either importing the other.

templates.py (prompt templates), mmlu_prompt.py (MMLU's question format, Hendrycks' prompts), mmlu_categories.py
(subjects -> categories), synthetic_e2e.py and synthetic_mc.py (the built-in generated tasks; the E2E corpus also
trains the tiny offline tokenizer). Pure text: no tokenizer is loaded and no file of the package is imported
beyond core/ (tests/test_layers.py checks it).
"""
