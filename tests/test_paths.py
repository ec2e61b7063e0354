"""The repository is self-contained: no config, README command or package docstring points outside it (a clone
with nothing beside it runs every config); ../shared is for tests and benchmarks that skip without it."""

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def leaving_paths(document: Any, folder: Path = ROOT) -> list[str]:
    """Strings that are, or end in (`--data.path=X`, `--args+=--data.path=X`), a path leaving the repository:
    absolute, home-relative, or relative upwards past the repository root. A relative path in a config file
    resolves from that file's folder (jsonargparse: `adapter: ../adapter/qlora.yaml` in configs/smollm2/), so
    `folder` is where the document lives."""

    def leaves(part: str) -> bool:
        if part.startswith(("/", "~")):
            return True
        if not (part.startswith("../") or part == ".."):
            return False
        return ROOT.resolve() not in (folder / part).resolve().parents

    return [s for s in strings(document) if any(leaves(part) for part in s.split("=") if part)]


def test_the_check_finds_paths_that_leave_the_repository():
    document = {"data": {"path": "../shared/data/x.json", "val_path": "data/mmlu/val"},
                "args": ["--data.path=/srv/alpaca.json", "--model.base_model=checkpoints/tiny-llama", "~/m"],
                "lr": 0.001, "dirpath": "."}
    assert leaving_paths(document) == ["../shared/data/x.json", "--data.path=/srv/alpaca.json", "~/m"]
    inside = {"adapter": "../adapter/qlora.yaml", "other": "../../../x.yaml"}  # from configs/smollm2/
    assert leaving_paths(inside, ROOT / "configs" / "smollm2") == ["../../../x.yaml"]


def test_configs_exist():
    assert len(CONFIGS) > 20 and ROOT / "configs" / "mmlu.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_no_config_points_outside_the_repository(config):
    text = config.read_text(encoding="utf-8")
    assert leaving_paths(yaml.safe_load(text), config.parent) == []
    assert "../shared" not in text  # comments included: a clone has no ../shared


def test_readme_commands_name_no_path_outside_the_repository():
    blocks = re.findall(r"```.*?\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) > 5
    for block in blocks:
        assert "../shared" not in block, block


def test_package_docstrings_cite_no_path_outside_the_repository():
    cited = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "lightning_qpeft").rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "../shared" in line]
    assert cited == []
