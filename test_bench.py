"""bench.py runs: the speed ratios on the tiny model, and the GPU check's code path on CPU at small shapes."""
import re
import pytest
from conftest import run_script

pytestmark = pytest.mark.slow  # whole bench.py runs


def test_gpu_check_runs_on_cpu_at_small_shapes():
    """configs/bench_gpu.py with a narrow model (the real vocabulary and token ids), short clips and
    rollouts: every measurement prints, and on fp32 the vision-once log-probs equal the pixels-per-row forward."""
    # 2 ordered rows and 1 shuffled: rows still share each clip (what vision-once dedups), and the
    # log-prob + backward pass at the 152,064-id vocabulary costs a quarter of 8 rows'
    code, output = run_script("bench.py", "configs/bench_gpu.py", "--random_7b=small", "--frames=4", "--height=56",
                              "--width=112", "--new_tokens=3", "--repeats=1", "--num_generations=2",
                              "--num_contrast=1")
    assert code == 0, output[-4000:]
    # prefill and decode are differences of timed calls: on a loaded CPU, at 3 new tokens, either can come out negative
    assert re.search(r"ratio [\d.]+x \(goal >= 1.0x\); ours: prefill -?[\d.]+ s, decode -?[\d.]+ ms/token", output)
    assert re.search(r"sdpa, log-prob \+ backward of 2 rows: ours [\d.]+ s \(MFU", output)
    assert re.search(r"decode   LoRA rank 64 -?[\d.]+ ms/token \(merging [\d.]+ s a call\); HBM bound [\d.]+", output)
    assert float(re.search(r"max \|diff\| of log-probs (\S+)", output).group(1)) < 1e-4


def test_speed_ratios_run(toy):
    code, output = run_script("bench.py", f"--model_path={toy[1]}", "--frames=4", "--height=56", "--width=56",
                              "--new_tokens=3", "--repeats=1")
    assert code == 0, output[-4000:]
    assert re.search(r"rollout .* ratio [\d.]+x", output) and re.search(r"with the rollouts [\d.]+x", output)
    assert float(re.search(r"max \|diff\| of log-probs (\S+)", output).group(1)) < 1e-4
