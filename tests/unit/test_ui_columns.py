"""Custom columns of the UI, through its API (no browser): names that would replace a
column or cannot be used in a formula are refused; a damaged file does not stop the page."""

import socket
from contextlib import contextmanager

import pytest

from tests.helpers import make_run, synthetic_rows


@contextmanager
def _serve(root):
    """The page on a free local port, and an API client of it."""
    from gradio_client import Client

    from ui.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_app(root, refresh_s=3600)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}", verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def ui_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-runs")
    store = make_run(root, "demo", [synthetic_rows("demo", "alpha-7b", "chat", [300.0, 340.0], [200, 220])])
    with _serve(root) as client:
        yield client, store


@pytest.mark.parametrize("name, refused", [
    ("gpu", "'gpu' is already a column"),
    ("energy", "'energy' is already a column"),
    ("run", "'run' is already a column"),  # a shown header
    ("url", "'url' is already a column"),
    ("J per 100", "is not a plain name"),
    ("class", "is not a plain name"),
    ("1st", "is not a plain name"),
    ("J_per_tok", None),
])
def test_custom_column_names_must_be_new_plain_names(ui_client, name, refused):
    client, _ = ui_client
    out = client.predict(name, "energy / response_length", ["demo"], ["H200"], "chat", ["transformers"], None, "energy",
                         api_name="/add_column")
    msg, table = out[0], out[4]["value"]
    if refused:
        assert msg.startswith("⚠️ Column refused") and refused in msg, msg
        assert table["headers"].count("energy (J)") == 1 and table["headers"].count(name) <= 1
        assert [row[table["headers"].index("energy (J)")] for row in table["data"]] == [320.0]
    else:
        assert msg.startswith("Added column") and name in table["headers"], msg


def _refresh(client, runs, gpus, task, backends):
    """The page's refresh through the API: (live status, leaderboard)."""
    out = client.predict(runs, gpus, task, backends, None, "energy", "parameters", "energy", "gpu", False, "quality",
                         None, "energy saved %", "latency (s)", 1.0, 1.0, None, None, api_name="/refresh")
    status = next(o for o in out if isinstance(o, str) and "_last change seen" in o)
    return status, out[5]


def test_the_page_says_a_damaged_file_was_set_aside(ui_client):
    client, store = ui_client
    store.write_part(synthetic_rows("demo", "beta", "chat", [1.0], [1]), "beta__chat-1").write_bytes(b"")
    status, _ = _refresh(client, ["demo"], ["H200"], "chat", ["transformers"])
    assert "1 damaged part file: their rows are not counted" in status, status


def test_an_empty_runs_folder_says_how_to_make_a_run(tmp_path):
    with _serve(tmp_path) as client:
        status, table = _refresh(client, [], [], None, [])
    assert "No runs yet in" in status and "python -m sweep --config models.yaml" in status, status
    assert table["value"]["data"] == []  # an empty leaderboard, not an error on every component
