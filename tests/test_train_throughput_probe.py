"""The training bench's interleaved peak probes (bench/train_throughput.py): their schedule, the median and spread
MFU divides by, and that the probes' time stays out of tokens/s. No training: a fake loop on a fake clock."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_throughput as tt  # noqa: E402


def test_schedule_spreads_the_probes_from_before_the_first_step_to_after_the_last():
    assert tt.probe_schedule(16) == {s: 1 for s in range(0, 17, 2)}
    short = tt.probe_schedule(3)  # a quick run's ours: fewer steps than probes, so several after some steps
    assert sum(short.values()) == tt.PROBES and set(short) == {0, 1, 2, 3}
    assert sum(tt.probe_schedule(100).values()) == tt.PROBES


def test_spread_gives_the_median_and_the_range():
    s = tt.peak_spread([4e9, 1e9, 100e9, 3e9, 2e9])
    assert (s["n"], s["median"], s["min"], s["max"]) == (5, 3e9, 1e9, 100e9)
    assert (s["q1"], s["q3"], s["max_over_min"]) == (2e9, 4e9, 100.0)
    assert tt.peak_spread([5e9])["median"] == 5e9


def test_mfu_peak_uses_the_interleaved_median_and_falls_back_to_the_up_front_one():
    run = {"probes": {"dtype": "float32", "readings": [{"flops_per_s": v} for v in (3e9, 1e9, 2e9)]}}
    p = tt.mfu_peak(run, 9e9)
    assert (p["median"], p["interleaved"], p["dtype"]) == (2e9, True, "float32")
    assert "median of 3 probes" in tt.peak_text(p) and "spread 1-3" in tt.peak_text(p)
    for failed in (None, {"error": "exit 1"}, {"tokens_per_s": 1.0}):
        q = tt.mfu_peak(failed, 9e9)
        assert (q["median"], q["interleaved"]) == (9e9, False)
        assert "measured once up front" in tt.peak_text(q)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def time(self):
        return self.t

    perf_counter = time


@pytest.mark.parametrize("steps", [3, 16])
@pytest.mark.parametrize("bf16", [True, False])
def test_probe_time_is_left_out_of_the_timed_span(monkeypatch, steps, bf16):
    clock = FakeClock()
    monkeypatch.setattr(tt, "time", clock)
    shapes = []

    def fake_probe(m, k, n, dtype):  # a probe takes 5 s of the same wall clock the steps use
        shapes.append((m, k, n, dtype))
        clock.t += 5.0
        return 1e9

    monkeypatch.setattr(tt, "probe_peak", fake_probe)

    class Training:  # the recipe's loop as the bench reads it: steps of 2 s, each logged in after_step
        def __init__(self):
            self.plan = SimpleNamespace(total_steps=steps, autocast=bf16, base_bf16=bf16, dtype="torch.float32")
            self.step, self.rows = 0, []

        def loop(self):
            self.start_time = clock.time()
            while self.step < self.plan.total_steps:
                clock.t += 2.0
                self.step += 1
                self.after_step(0.5, 1.0, None)
            return False

        def after_step(self, loss, grad_norm, bar):
            self.rows.append({"step": self.step, "tokens_seen": 100 * self.step,
                              "elapsed_s": clock.time() - self.start_time, "loss": loss})
            return None

    probes = {"shape": [2048, 576, 1536], "dtype": None, "readings": []}
    tt.interleave_probes(Training, (2048, 576, 1536), probes)
    run = Training()
    run.loop()
    readings = probes["readings"]
    assert len(readings) == tt.PROBES and probes["dtype"] == ("bfloat16" if bf16 else "float32")
    assert set(shapes) == {(2048, 576, 1536, probes["dtype"])}
    span = tt.timed_span(run.rows, readings)
    assert span["timed_tokens"] == 100 * (steps - 1)
    assert span["timed_s"] == pytest.approx(2.0 * (steps - 1))  # the steps' time only
    inside = sum(1 for r in readings if 1 <= r["after_step"] < steps)
    assert span["probe_s_excluded"] == pytest.approx(5.0 * inside) and inside > 0


def test_a_probe_leaves_the_training_random_stream_alone():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert tt.probe_peak(16, 16, 16, "float32", seconds=0.003) > 0
    assert torch.equal(torch.rand(3), expected)


def test_each_recipe_runs_under_the_allocator_its_own_command_line_uses(monkeypatch):
    """ours runs under jemalloc where it is installed, with the kernel caches bounded, as `collegeadvisor train`
    does; the seed, TRL and the "ours-glibc" lever get glibc's malloc even where the bench itself was started under
    jemalloc, and the seed and TRL the caches' defaults."""
    from collegeadvisor import cli

    for key in cli.KERNEL_CACHES:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(cli, "jemalloc_library", lambda dirs=cli.LIB_DIRS: "/lib/x/libjemalloc.so.2")
    monkeypatch.setenv("LD_PRELOAD", "/lib/x/libjemalloc.so.2 /lib/other.so")
    for name in ("ours", "ours-long", "ours-tinyllama", "ours-unfused"):
        allocator, env = tt.allocator_env(name)
        assert allocator == "jemalloc" and env["LD_PRELOAD"] == "/lib/x/libjemalloc.so.2 /lib/other.so"
    for name in ("seed", "trl", "ours-glibc"):
        allocator, env = tt.allocator_env(name)
        assert allocator == "glibc" and env["LD_PRELOAD"] == "/lib/other.so"
    for name in ("ours", "ours-glibc", "seed", "trl"):
        env = tt.allocator_env(name)[1]
        assert all((env.get(key) == value) is name.startswith("ours") for key, value in cli.KERNEL_CACHES.items())
    monkeypatch.setattr(cli, "jemalloc_library", lambda dirs=cli.LIB_DIRS: None)  # not installed: glibc for all
    assert tt.allocator_env("ours")[0] == "glibc"


def test_the_tinyllama_row_replaces_the_loader_the_recipe_calls():
    """The bench swaps in a random TinyLlama-shaped model by patching train.step's `load_model`: the name
    build_model reads when it runs (patching one nothing reads trained SmolLM2 under the TinyLlama row's name)."""
    from collegeadvisor.train import step

    assert "load_model" in step.build_model.__code__.co_names and callable(step.load_model)
    assert "step.load_model = " in Path(tt.__file__).read_text()
