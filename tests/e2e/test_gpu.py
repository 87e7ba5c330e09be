"""On NVIDIA GPUs (skipped on CPU): stored energy against an independent reading, and
the compiled backend on a real GPU.

The energy checks poll every GPU's NVML energy counter while the sweep runs, then
integrate each GPU's counter over the windows of the rows that GPU served. The
attribution test needs 2 GPUs: a ~1B model on one and a tiny one on the other, so the
two GPUs draw clearly different power at the same moments.
"""

import dataclasses

import pandas as pd
import pytest

from bench.nvml import NvmlEnergyLog
from tests.helpers import run_sweep_cli, tasks_yaml, write_yaml

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")


def _windows(df):
    df = df.copy()
    df["start"] = df["started_at"].map(pd.Timestamp.timestamp)
    df["end"] = df["start"] + df["latency_s"]
    return df


@one_gpu
def test_both_backends_side_by_side_on_one_gpu_against_nvml(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "hf", "path": "random:tinyllama-1.1b", "conv_template": "vicuna_v1.1"},
        {"name": "compiled", "path": "random:tinyllama-1.1b", "conv_template": "vicuna_v1.1", "backend": "compiled"},
    ]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=256, warmup_requests=2)
    with NvmlEnergyLog() as log:
        proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", tmp_path / "runs", "--run-id", "g1",
                             "--max-prompts", "16", "--no-dashboard", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print("sweep stderr, last lines:", proc.stderr[-4000:], sep="\n")
    df = _windows(pd.read_parquet(tmp_path / "runs" / "g1" / "results"))
    assert df["energy_j"].notna().all() and len(df) == 32
    fast = df[df["model"] == "compiled"]
    assert (fast["cache_implementation"] == "static").all() and fast["compiled"].all()
    assert (fast["steps_past_stop"] <= 2).all()
    # sub-second windows are attributed from the counter; HF's long ones stand alone
    print("energy methods:", df.groupby("model")["energy_method"].value_counts().to_dict())
    assert (fast["energy_method"] == "attributed").all()
    assert df["window_energy_j"].notna().sum() >= 16 and df["energy_uncertainty_j"].notna().all()
    check = run_sweep_cli("validate", tmp_path / "runs" / "g1")
    print(check.stdout)
    assert "attribution" in check.stdout and check.returncode == 0, check.stdout
    report = []
    for model, rows in df.groupby("model"):
        gpu = int(rows["gpu_index"].iloc[0])
        nvml_j = sum(log.energy_j(gpu, s, e) for s, e in zip(rows["start"], rows["end"]))
        report.append((model, rows["energy_j"].sum(), nvml_j, rows["throughput_tok_s"].mean(),
                       rows["energy_j"].sum() / rows["response_tokens"].sum()))
        assert rows["energy_j"].sum() == pytest.approx(nvml_j, rel=0.02), report
    print("model, stored J, NVML J, tokens/s, J/token:", *report, sep="\n  ")
    by = {r[0]: r for r in report}
    assert by["compiled"][3] > 3 * by["hf"][3] and by["compiled"][4] < by["hf"][4]


@one_gpu
def test_compiled_backend_reproduces_a_seed_and_sees_a_stop_at_most_two_steps_late():
    from sweep.backends import load_backend
    from sweep.config import GenerationSettings, ModelSpec

    settings = GenerationSettings(temperature=0.7, max_new_tokens=64)
    spec = ModelSpec(name="m", path="random:tinyllama-1.1b", conv_template="vicuna_v1.1", backend="compiled")
    be = load_backend(spec, settings, "cuda")
    a, b = (be.generate("Be brief.", "Tell me about the sea.", seed=3) for _ in range(2))
    assert (a.response, a.response_tokens) == (b.response, b.response_tokens)
    assert be.generate("Be brief.", "Tell me about the sea.", seed=4).response != a.response
    prompt = be.encode("Be brief.", "Tell me about the sea.")[0]
    runs = {}
    with torch.no_grad():
        # The same request with each attention bucket that holds it: the positions a
        # shorter bucket leaves out are masked, so the tokens are the same.
        for kv_len in [b for b in be.kv_buckets if b >= prompt.shape[1] + 64]:
            torch.manual_seed(3)
            runs[kv_len], _ = be._decode_cuda(prompt, 64, kv_len)
    assert len(runs) >= 2 and all(r == runs[max(runs)] for r in runs.values()), runs
    ids = runs[min(runs)]
    stop = next(t for i, t in enumerate(ids) if i >= 5 and t not in ids[:i])
    be.use_template(dataclasses.replace(be.template, stop_token_ids=(stop,)))
    c = be.generate("Be brief.", "Tell me about the sea.", seed=3)
    assert c.stop_reason == "stop_token" and c.response_tokens == ids.index(stop)
    assert c.steps_past_stop == 2  # the next two steps were already queued when the host read the stop


@one_gpu
@pytest.mark.parametrize("heads, kv_heads", [(32, 4), (32, 32)])
def test_flash_decode_attention_matches_masked_sdpa(heads, kv_heads):
    """The compiled step's flash kernel (fill level read from the device, no mask) attends
    to what masked SDPA attends to, over a cache bucket that holds more than the fill."""
    from sweep.backends.decode_attention import AttentionOptions, decode_attention, flash_decode_available, \
        register_attention

    if not flash_decode_available():
        pytest.skip("this torch has no FlashAttention forward with seqused_k")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, 1, 64, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(1, kv_heads, 2048, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(2))
    sdpa, flash = AttentionOptions(kernel="sdpa"), AttentionOptions(kernel="flash")
    register_attention(sdpa), register_attention(flash)
    for used, bucket in [(1, 256), (100, 256), (256, 256), (700, 1024), (2048, None)]:
        sdpa.kv_len = flash.kv_len = bucket
        mask = torch.full((1, 1, 1, 2048), torch.finfo(torch.float16).min, device="cuda", dtype=torch.float16)
        mask[..., :used] = 0
        want = decode_attention(q, k, v, mask, 0.125, None, sdpa.handle)
        got = decode_attention(q, k, v, mask, 0.125, torch.tensor([used], dtype=torch.int32, device="cuda"),
                               flash.handle)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"{used} keys, bucket {bucket}")


@one_gpu
def test_validate_timeline_and_prefill_decode_split_on_one_gpu(tmp_path):
    """A 1.1B run that validates; each request's energy split into prefill and decode,
    which add up to it; 4-token responses have coarse windows, flagged as such, but their
    attributed energy is not, and their reference checks agree with it."""
    from sweep.store import RunStore

    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "hf", "path": "random:tinyllama-1.1b", "conv_template": "vicuna_v1.1"}]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=256, warmup_requests=2)
    runs = tmp_path / "runs"
    proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", runs, "--run-id", "v", "--max-prompts", "8",
                         "--no-dashboard", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = run_sweep_cli("validate", runs / "v")
    print(check.stdout)
    assert check.returncode == 0, check.stdout
    df = pd.read_parquet(runs / "v" / "results")
    assert df["energy_split_method"].notna().all() and df["power_limit_w"].gt(0).all()
    power = RunStore(runs / "v").read_power().to_pandas()
    assert power["power_w"].notna().sum() > 10 and (power["gpu_index"] == df["gpu_index"].iloc[0]).all()
    split = df["prefill_energy_j"] + df["decode_energy_j"]
    print("methods", df["energy_method"].value_counts().to_dict(), "prefill J", df["prefill_energy_j"].round(2).tolist())
    assert (split - df["energy_j"]).abs().max() < 1e-6
    assert (df["prefill_energy_j"] < df["decode_energy_j"]).all()

    proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", runs, "--run-id", "short", "--max-prompts", "8",
                         "--max-new-tokens", "4", "--no-dashboard", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    short = pd.read_parquet(runs / "short" / "results")
    assert short["quality_flags"].map(lambda f: "coarse_window" in f).all()
    assert (short["energy_method"] == "attributed").all()
    check = run_sweep_cli("validate", runs / "short")
    print(check.stdout)
    assert "WARNING  flagged_share" not in check.stdout and check.returncode == 0, check.stdout
    assert "ok       attribution" in check.stdout


@two_gpus
def test_energy_is_attributed_to_the_workers_own_gpu(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "big", "path": "random:tinyllama-1.1b", "conv_template": "vicuna_v1.1"},
        {"name": "tiny", "path": "random:llama-small", "conv_template": "llama-2"},
    ]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=128, warmup_requests=2)
    with NvmlEnergyLog() as log:
        proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", tmp_path / "runs", "--run-id", "g",
                             "--max-prompts", "12", "--no-dashboard", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "runs" / "g" / "results")
    assert df["energy_j"].notna().all() and (df["energy_j"] > 0).all()
    gpu_of = df.groupby("model")["gpu_index"].unique()
    assert all(len(v) == 1 for v in gpu_of) and gpu_of["big"][0] != gpu_of["tiny"][0]
    df = _windows(df)
    report = []
    for model, rows in df.groupby("model"):
        own = int(gpu_of[model][0])
        other = 1 - own if own in (0, 1) else 0
        own_j = sum(log.energy_j(own, s, e) for s, e in zip(rows["start"], rows["end"]))
        other_j = sum(log.energy_j(other, s, e) for s, e in zip(rows["start"], rows["end"]))
        stored_j = rows["energy_j"].sum()
        report.append((model, own, stored_j, own_j, other_j))
        assert stored_j == pytest.approx(own_j, rel=0.10), report
    big = next(r for r in report if r[0] == "big")
    assert big[3] > 1.3 * big[4], f"the big model's GPU should draw more than its neighbour: {report}"
    print("model, gpu, stored J, NVML own-GPU J, NVML other-GPU J:", *report, sep="\n  ")
