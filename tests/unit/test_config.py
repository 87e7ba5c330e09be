"""Bad input: one line naming the file and the field, exit status 2, nothing loaded."""

import pytest

from sweep.config import ConfigError, load_models, load_tasks
from tests.helpers import ROOT, run_sweep_cli, tasks_yaml, write_yaml


def test_shipped_configs_are_valid():
    assert len(load_models(ROOT / "models.yaml").models) == 2
    assert load_models(ROOT / "models-2023.yaml").models
    tasks = load_tasks(ROOT / "tasks.yaml")
    prompts = {t.name: t.system_prompt for t in tasks.tasks}
    chat = ("A chat between a human user (prompter) and an artificial intelligence (AI) assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    instruct = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    assert prompts == {
        "chat": chat,
        "chat-concise": chat + " The assistant's answers are very concise.",
        "instruct": instruct,
        "instruct-concise": instruct + " The response should be very concise.",
    }
    g = tasks.generation
    assert (g.batch_size, g.temperature, g.repetition_penalty, g.top_p, g.max_new_tokens) == (1, 0.7, 1.0, 1.0, 512)


@pytest.mark.parametrize(
    "models, expected",
    [
        ({"models": [{"name": "a", "path": "random:llama-tiny", "gpus": "two"}]}, "models[0].gpus: Input should be a valid integer"),
        ({"models": [{"name": "a", "path": "random:llama-tiny", "colour": "red"}]}, "models[0].colour: unknown key"),
        ({"models": [{"name": "a"}]}, "models[0].path: Field required"),
        ({"models": [{"name": "a", "path": "random:nope"}]}, "models[0].path: unknown random-weight preset 'nope'"),
        ({"models": [{"name": "a", "path": "x", "conv_template": "no-such"}]}, "models[0].conv_template: unknown FastChat template"),
        ({"models": [{"name": "a", "path": "x", "dtype": "int3"}]}, "models[0].dtype: Input should be"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "model name 'a' appears twice"),
        ({"models": []}, "models: Tuple should have at least 1 item"),
        ({"model": []}, "models: Field required"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": 0}}]}, "models[0].resources: resource 'node_b': must be a positive number"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": -1}}]}, "must be a positive number"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": float("inf")}}]}, "models[0].resources.node_b: Input should be a finite number"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": "lots"}}]}, "models[0].resources.node_b: Input should be a valid number"),
        ({"models": [{"name": "a", "path": "x", "resources": {"GPU": 1}}]}, "resource 'GPU' is set by sweep itself (use gpus: for GPUs)"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node b": 1}}]}, "resource name 'node b': use letters"),
        ({"models": [{"name": "a", "path": "x", "resources": ["node_b"]}]}, "models[0].resources: Input should be a valid dictionary"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": 0.12345}}]}, "resource 'node_b': at most 4 decimals"),
        ({"models": [{"name": "a", "path": "x", "resources": {"node_b": 1.00001}}]}, "at most 4 decimals"),
        ({"models": [{"name": "ab\u202egpt", "path": "x"}]}, "models[0].name: must not contain invisible format characters (U+202E"),
        ({"models": [{"name": "a\u200bb", "path": "x"}]}, "invisible format characters (U+200B ZERO WIDTH SPACE)"),
    ],
)
def test_bad_models_file(tmp_path, models, expected):
    path = write_yaml(tmp_path / "models.yaml", models)
    with pytest.raises(ConfigError) as err:
        load_models(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def test_bad_tasks_file(tmp_path):
    path = tasks_yaml(tmp_path, temperature="hot")
    with pytest.raises(ConfigError, match=r"tasks.yaml: generation.temperature: Input should be a valid number"):
        load_tasks(path)
    path = write_yaml(tmp_path / "t2.yaml", {"tasks": [{"name": "chat", "system_prompt": "x"}],
                                            "prompts": {"dataset": "missing.json"}})
    with pytest.raises(ConfigError, match=r"t2.yaml: prompts.dataset: file not found"):
        load_tasks(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad-type", "models.yaml: models[0].gpus: Input should be a valid integer"),
        ("unknown-task", "models.yaml: models[0].tasks[0]: unknown task 'poetry'"),
        ("missing-file", "nope.yaml: file not found"),
        ("bad-yaml", "models.yaml: line"),
        ("cli-task", "command line: --task: unknown task 'poetry'"),
    ],
)
def test_cli_bad_input_exit_2_before_anything_runs(tmp_path, case, expected):
    tasks = tasks_yaml(tmp_path)
    models = tmp_path / "models.yaml"
    entry = {"name": "a", "path": "random:llama-tiny"}
    extra = []
    if case == "bad-type":
        write_yaml(models, {"models": [{**entry, "gpus": "two"}]})
    elif case == "unknown-task":
        write_yaml(models, {"models": [{**entry, "tasks": ["poetry"]}]})
    elif case == "missing-file":
        models = tmp_path / "nope.yaml"
    elif case == "bad-yaml":
        models.write_text("models: [\n  - name: a\n  path: : :\n")
    elif case == "cli-task":
        write_yaml(models, {"models": [entry]})
        extra = ["--task", "poetry"]
    out = tmp_path / "runs"
    proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", out, *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was started or written


def test_resume_with_other_settings_is_refused_and_keeps_the_run(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [{"name": "a", "path": "random:llama-tiny"}]})
    out = tmp_path / "runs"
    (out / "r1").mkdir(parents=True)
    manifest = out / "r1" / "manifest.json"
    from sweep.config import load_models as lm, load_tasks as lt
    from sweep.manifest import new_manifest

    import json

    manifest.write_text(json.dumps(new_manifest("r1", lm(models), lt(tasks_yaml(tmp_path)), {})))
    before = manifest.read_text()
    proc = run_sweep_cli("--config", models, "--tasks", tasks_yaml(tmp_path, temperature=0.9), "--out", out, "--run-id", "r1")
    assert proc.returncode == 2
    assert "generation.temperature was 0.7, now 0.9" in proc.stderr
    assert manifest.read_text() == before


def test_resources_pin_a_model_to_nodes(tmp_path):
    path = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "a", "path": "random:llama-tiny", "resources": {"node_b": 1, "big-mem": 0.5}},
        {"name": "b", "path": "random:llama-tiny"},
    ]})
    a, b = load_models(path).models
    assert a.resources == {"node_b": 1.0, "big-mem": 0.5} and b.resources == {}


def test_a_resume_may_move_a_model_but_not_change_it(tmp_path):
    from sweep.manifest import merge_for_resume, new_manifest

    def models(**entry):
        return load_models(write_yaml(tmp_path / "m.yaml", {"models": [{"name": "a", "path": "random:llama-tiny", **entry}]}))

    tasks = load_tasks(tasks_yaml(tmp_path))
    manifest = new_manifest("r", models(), tasks, {})
    del manifest["models"][0]["resources"]  # a run stored before the field existed
    merged = merge_for_resume(manifest, models(resources={"node_b": 1}), tasks, "t.yaml", "m.yaml")
    assert merged["models"][0]["resources"] == {"node_b": 1.0}
    with pytest.raises(ConfigError, match="models\\[0\\].dtype"):
        merge_for_resume(manifest, models(resources={"node_b": 1}, dtype="bfloat16"), tasks, "t.yaml", "m.yaml")
