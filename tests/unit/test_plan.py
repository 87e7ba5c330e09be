from sweep.config import ModelsFile, TasksFile
from sweep.plan import Job, Scheduler, make_plan


def test_plan_respects_per_model_tasks():
    models = ModelsFile.model_validate({"models": [{"name": "a", "path": "p"}, {"name": "b", "path": "q", "tasks": ["y"]}]})
    tasks = TasksFile.model_validate({"tasks": [{"name": "x", "system_prompt": "s"}, {"name": "y", "system_prompt": "s"}]})
    assert make_plan(models, tasks) == [Job("a", "x"), Job("a", "y"), Job("b", "y")]


def test_fresh_models_first_then_the_longest_queue():
    jobs = [Job(m, t) for m in "abc" for t in ("x", "y", "z")] + [Job("a", "w")]
    s = Scheduler(jobs, {"a": 1, "b": 1, "c": 1}, capacity=4)
    started = []
    while (m := s.model_for_new_worker()) is not None:
        s.worker_started(m)
        started.append(m)
        s.next_job(m)
    # one worker per model, then the fourth GPU goes to the model with most jobs waiting
    assert started == ["a", "b", "c", "a"]


def test_wide_models_wait_for_enough_gpus():
    s = Scheduler([Job("big", "x"), Job("small", "x")], {"big": 2, "small": 1}, capacity=2)
    assert s.model_for_new_worker() == "big"
    s.worker_started("big")
    assert s.model_for_new_worker() is None  # no GPU left for "small"
    s.worker_stopped("big")
    assert s.model_for_new_worker() == "big"  # its job is still waiting


def test_requeue_and_drop():
    s = Scheduler([Job("a", "x"), Job("a", "y")], {"a": 1}, capacity=1)
    job = s.next_job("a")
    s.requeue(job)
    assert s.next_job("a") == job
    assert s.drop_model("a") == [Job("a", "y")] and not s.has_waiting()
