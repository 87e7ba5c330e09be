import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """Built checkpoints go to one cache for the session; nothing reaches a hub."""
    os.environ["SWEEP_CACHE"] = str(tmp_path_factory.mktemp("sweep-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["RAY_DEDUP_LOGS"] = "0"
    yield
