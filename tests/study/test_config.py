"""The study spec's grid: cartesian product, labels, exclude/include, per-cell arguments, stable ids."""

from pathlib import Path

import pytest

from lightning_qpeft.study.cli import build_parser
from lightning_qpeft.study.config import CellArgs, StudyError, StudySpec, expand, value_label

ROOT = Path(__file__).resolve().parents[2]


def spec(**kw):
    base = dict(base_config="configs/tiny.yaml",
                axes={"model.quantization": ["none", "nf4", "fp4"],
                      "model.adapter": {"lora": "configs/adapter/lora.yaml",
                                        "ia3": {"class_path": "peft.IA3Config", "init_args": {"task_type": "CAUSAL_LM"}}}})
    return StudySpec(**{**base, **kw})


def test_grid_is_the_cartesian_product_in_axis_order():
    cells = expand(spec())
    assert [tuple(c.labels.values()) for c in cells] == [
        ("none", "lora"), ("none", "ia3"), ("nf4", "lora"), ("nf4", "ia3"), ("fp4", "lora"), ("fp4", "ia3")]
    c = cells[3]
    assert c.sets == {"model.quantization": "nf4",
                      "model.adapter": {"class_path": "peft.IA3Config", "init_args": {"task_type": "CAUSAL_LM"}}}
    # mappings go on the command line as JSON, strings as they are, after the base config
    assert c.args == ("--config", "configs/tiny.yaml", "--model.quantization", "nf4", "--model.adapter",
                      '{"class_path": "peft.IA3Config", "init_args": {"task_type": "CAUSAL_LM"}}')
    assert c.id.startswith("nf4__ia3-")


def test_ids_are_stable_and_change_with_what_the_cell_runs():
    a, b = expand(spec()), expand(spec())
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == len(a)
    longer = expand(spec(args=["--trainer.max_steps", "9"]))
    assert [c.id.rsplit("-", 1)[0] for c in longer] == [c.id.rsplit("-", 1)[0] for c in a]  # same readable part
    assert not {c.id for c in longer} & {c.id for c in a}  # but a new hash: never a stale result
    assert {c.id for c in expand(spec(evaluate=["test"]))}.isdisjoint(c.id for c in a)


def test_value_labels():
    assert value_label("configs/adapter/qlora.yaml") == "qlora"
    assert value_label({"class_path": "peft.PromptTuningConfig"}) == "prompttuning"
    assert value_label(1) == "1" and value_label(True) == "true" and value_label(None) == "null"
    assert value_label("meta-llama/Llama-2-7b-hf") == "meta-llama-Llama-2-7b-hf"


def test_exclude_include_and_cell_args():
    s = spec(exclude=[{"model.quantization": ["nf4", "fp4"], "model.adapter": "ia3"}],
             include=[{"model.quantization": "int8", "model.adapter": "lora", "trainer.max_steps": 5}],
             cell_args=[CellArgs(when={"model.adapter": "ia3"}, args=["--model.optimizer.init_args.lr", "0.03"]),
                        CellArgs(args=["--data.batch_size", "4"])],
             args=["--trainer.max_steps", "100"])
    cells = expand(s)
    assert [tuple(c.labels.values()) for c in cells] == [
        ("none", "lora"), ("none", "ia3"), ("nf4", "lora"), ("fp4", "lora"), ("int8", "lora")]
    ia3 = cells[1].args
    assert ia3[-4:] == ("--model.optimizer.init_args.lr", "0.03", "--data.batch_size", "4")
    assert "0.03" not in cells[0].args
    extra = cells[-1]
    assert extra.extra == "max_steps=5" and extra.args[-4:-2] == ("--trainer.max_steps", "5")
    assert extra.args.index("100") < extra.args.index("5")  # the cell's own value comes last and wins


def test_named_axis_sets_several_keys():
    s = spec(axes={"quantization": {"bf16": {"model.quantization": "none", "model.dtype": "bfloat16"},
                                    "nf4-dq": {"model.quantization": "nf4-dq"}},
                   "seed_everything": [1, 2]})
    cells = expand(s)
    assert [c.id.rsplit("-", 1)[0] for c in cells] == ["bf16__1", "bf16__2", "nf4-dq__1", "nf4-dq__2"]
    assert cells[0].sets == {"model.quantization": "none", "model.dtype": "bfloat16", "seed_everything": 1}
    assert cells[1].args[-2:] == ("--seed_everything", "2")


@pytest.mark.parametrize("kw, match", [
    (dict(axes={}), "axes: give at least one axis"),
    (dict(axes={"model.quantization": []}), "axes.model.quantization: the axis has no values"),
    (dict(axes={"quant": {"a": "nf4"}}), r"axes.quant.a: 'quant' is not a config key"),
    (dict(axes={"model.adapter": ["a/lora.yaml", "b/lora.yaml"]}), "same label"),
    (dict(exclude=[{"model.quantisation": "nf4"}]), r"exclude\[0\]: 'model.quantisation' is not an axis"),
    (dict(exclude=[{"model.quantization": "nf5"}]), r"exclude\[0\]: \['nf5'\] not among the labels"),
    (dict(include=[{"model.quantization": "nf4"}]), r"include\[0\]: give a label for every axis"),
    (dict(evaluate=["mmlu"]), "evaluate: unknown evaluation 'mmlu'"),
    (dict(report={"rows": "model.dtype"}), "report.rows: 'model.dtype' is not an axis"),
])
def test_bad_specs_are_refused_naming_the_key(kw, match):
    with pytest.raises(StudyError, match=match):
        expand(spec(**kw))


def test_study_configs_parse_and_expand():
    """Every configs/study/*.yaml parses with the study CLI's parser and expands to its grid."""
    parser = build_parser()
    sizes = {}
    for path in sorted((ROOT / "configs" / "study").glob("*.yaml")):
        raw = parser.parse_args(["--config", str(path)]).as_dict()
        s = StudySpec(**{k: raw[k] for k in StudySpec.__dataclass_fields__})
        cells = expand(s)
        sizes[path.stem] = len(cells)
        assert (ROOT / s.base_config).exists(), s.base_config
    assert sizes["tiny"] == 16
    assert sizes["qlora-table4"] == 24  # 3 data types x 4 sizes x 2 datasets, as QLoRA's Table 4
    assert sizes["device-efficiency"] == 12
    assert sizes["tiny-seeds"] == 9


def test_cells_with_fit_false_only_evaluate_and_get_their_own_id():
    cells = expand(spec(axes={"model.adapter": {"base": None, "lora": "configs/adapter/lora.yaml"}},
                        evaluate=["test"], cell_args=[{"when": {"model.adapter": "base"}, "fit": False}]))
    assert [(c.labels["model.adapter"], c.fit) for c in cells] == [("base", False), ("lora", True)]
    trained = expand(spec(axes={"model.adapter": {"base": None}}, evaluate=["test"]))[0]
    assert trained.fit and trained.id != cells[0].id  # the same arguments, trained or not: two cells
    with pytest.raises(StudyError, match="neither trains .* nor evaluates"):
        expand(spec(axes={"model.adapter": {"base": None}}, cell_args=[{"when": {}, "fit": False}]))
