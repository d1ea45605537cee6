import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own JAXCHAT_BASE_DIR, so nothing reads or writes the user's ~/.cache/jaxchat."""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base_dir")))
    # tiktoken must never try the network in tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(os.environ["JAXCHAT_BASE_DIR"], "tiktoken"))
