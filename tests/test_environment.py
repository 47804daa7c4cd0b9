"""The environment files agree, and nothing in the package reaches a hub at import time."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from_pyproject = {r.strip(): _name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    from_env = {r.strip(): _name(r) for r in pip_block}
    assert set(from_env.values()) == set(from_pyproject.values())
    assert set(from_env) == set(from_pyproject), "the version constraints differ"


def test_torch_pair_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_no_detectron2_dependency():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "detectron2" not in text


def test_package_never_asks_a_hub_for_weights():
    """timm and transformers may only load local files: no `pretrained=True`, no hub ids without local_files_only."""
    offenders = []
    for path in (ROOT / "uniperceiver_v2").rglob("*.py"):
        text = path.read_text()
        if re.search(r"pretrained\s*=\s*True", text):
            offenders.append(f"{path}: pretrained=True")
        if "from_pretrained(" in text and "local_files_only" not in text:
            offenders.append(f"{path}: from_pretrained without local_files_only")
    assert not offenders, offenders
