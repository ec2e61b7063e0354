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



def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of a Markdown page whose file is missing or outside `root`, or whose #anchor is no heading."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or root.resolve() not in [file, *file.parents]:
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


# README and the pages it links (a study's report.md under docs/study/ is its output, linking the study's folder)
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "study" not in p.parts),
        *sorted((ROOT / "benchmarks").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_broken_links(tmp_path):
    assert _anchors("# A title (`x.yaml`)\n## Findings (real weights)\n") == {"a-title-xyaml", "findings-real-weights"}
    (tmp_path / "b.md").write_text("# Here\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#here) [ok](#top) [web](https://x.org/y) [gone](c.md) [no](b.md#there)\n"
                    "# Top\n```\n[code](not-checked.md)\n```\n")
    assert broken_links(page, tmp_path) == ["c.md", "b.md#there"]
