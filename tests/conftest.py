"""Shared test fixtures.

Real assets (SmolLM2-135M-Instruct, the Llama 3 and Qwen tokenizers) are built offline by
`../shared/tools/fetch-real-assets`; `.ci/run` builds them and exports PATCHER_ASSETS. Tests that
need them skip with the reason below when they are absent.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat directory of modules, not a package

ASSETS = Path(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache" / "patcher-assets"))


def asset_dir(name: str) -> Path:
    """Path of one real asset directory, or skip the test with a clear reason."""
    path = ASSETS / name
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"real asset {path} is absent: run ../shared/tools/fetch-real-assets {ASSETS}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return asset_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llama3_tok_dir() -> Path:
    return asset_dir("llama3-tokenizer")


@pytest.fixture(scope="session")
def qwen2_tok_dir() -> Path:
    return asset_dir("qwen2-tokenizer")
