"""Parameter counts: the Llama-2-7B counts quoted in configs/adapter/*.yaml are computed, not guessed, and
4-bit weights count as the weights they stand for."""

from __future__ import annotations

import pytest

from lightning_qpeft.model import compat
from lightning_qpeft.model.counting import count_parameters, llama2_7b_counts, params_line
from lightning_qpeft.model.loading import load_base_model

@pytest.mark.parametrize("method", list(compat.METHODS))
def test_yaml_quotes_the_computed_llama2_7b_count(method):
    row = compat.METHODS[method]
    counts = llama2_7b_counts(compat.load_method_config(row))
    assert params_line(*counts) in row.yaml.read_text(), f"update the count line in {row.yaml.name}"
    assert compat.yaml_params(row) == counts[0]


@pytest.mark.parametrize("method", ["prefix_tuning", "ln_tuning", "vera"])
def test_extrapolated_count_equals_the_exact_one(method):
    adapter = compat.load_method_config(method)
    assert llama2_7b_counts(adapter) == llama2_7b_counts(adapter, exact=True)


def test_known_counts():
    # by hand: QLoRA's r=64 on all 7 linear layers of 32 blocks; prompt tuning: 20 x 4096
    assert llama2_7b_counts(compat.load_method_config("qlora"))[0] == 32 * 64 * (
        4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert llama2_7b_counts(compat.load_method_config("prompt_tuning"))[0] == 20 * 4096
    assert llama2_7b_counts(compat.load_method_config("full")) == (6_738_415_616, 6_738_415_616)


def test_4bit_weights_count_as_the_weights_they_pack(tiny_model_dir):
    _, unquantized = count_parameters(load_base_model(tiny_model_dir, "none", dtype="float32"))
    for mode in ("nf4", "fp4-dq", "int8"):
        assert count_parameters(load_base_model(tiny_model_dir, mode, compute_dtype="float32"))[1] == unquantized
