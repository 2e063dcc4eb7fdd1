"""prefetch.py and the scripts' data_workers: the workers load the examples the main process loads, bit for bit
(T-GRPO's contrast shuffles and the generator they leave too); a bad record fails or is skipped as before; a worker
that dies or hangs fails the run at once, naming its records; no worker outlives a run; cuda_graph reaches
model.generate from every script."""
import json
import os
import shutil
import signal
import threading
import time
import numpy as np
import pytest
import torch
import data
import eval as E
import family
import groups
import lifecycle
import model
import prefetch
import sft
import tgrpo
from conftest import run_eval, run_script
from test_sft import sft_args
from test_tgrpo import tgrpo_args


def records_of(toy, name):
    data_dir, _ = toy
    return data.load_records(os.path.join(data_dir, name))[0]


def loaded_with(jobs, tokenizer, config, workers):
    """Every job's result, loaded by `workers` processes (0: here)."""
    # the toy's prompt: a script resolves "" from its checkpoint (data.loader_of)
    loader = data.Loader(tokenizer, dict(config, prompt_style="short"), family.DEFAULT)
    with prefetch.Prefetcher(jobs, loader, workers) as loads:
        return list(loads)


def assert_same_examples(ours, theirs):
    """Two lists of data.Example equal bit for bit: prompts, pixels, grids, times, contrast clips and prompts."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.record == b.record and a.prompt == b.prompt and a.contrast_prompt == b.contrast_prompt
        for x, y in ((a.clip, b.clip), (a.contrast_clip, b.contrast_clip)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x.pixel_values, y.pixel_values)
                assert (x.grid_thw, x.second_per_grid, x.timestamps) == (y.grid_thw, y.second_per_grid, y.timestamps)


def bad_batch(toy):
    """A video record whose file is gone between two good ones."""
    records = records_of(toy, "sft.json")[:3]
    records[1] = dict(records[1], path="/nonexistent/gone.mp4", data_type="video")
    return records


@pytest.mark.slow
def test_workers_load_the_steps_examples_bit_for_bit(toy, tokenizer, capfd):
    """Three T-GRPO steps (videos with contrast clips, images), two SFT micro-batches and a batch with a bad record
    under skip_bad: the same examples and skip counts with 0 and 2 workers, the "skipped: ..." line on stderr (a
    worker's stderr is the run's), and each step's generator left where the contrast shuffles left it (its next
    draw, the sampling seed, equal)."""
    def jobs():  # anew for each run: a job loaded here draws from its own generator
        yield from tgrpo.step_jobs(records_of(toy, "rl.json"), 0, 0, 3)
        yield from sft.micro_batch_jobs(records_of(toy, "sft.json"), 0, 0, 2)
        yield prefetch.Job(data.load_batch, (bad_batch(toy),), bad_batch(toy))
    config = dict(tgrpo.config, skip_bad=True)
    here = loaded_with(jobs(), tokenizer, config, 0)
    ahead = loaded_with(jobs(), tokenizer, config, 2)
    assert len(here) == len(ahead) == 6
    contrast = 0
    for ours, theirs in zip(here, ahead):
        assert_same_examples(ours.examples, theirs.examples)
        assert ours.skipped == theirs.skipped
        contrast += sum(e.contrast_clip is not None for e in ours.examples)
    assert contrast >= 3  # the shuffles were drawn: the comparison covers them
    assert here[-1].skipped == 1 and capfd.readouterr().err.count("skipped: ") == 2
    for ours, theirs in zip(here[:3], ahead[:3]):
        assert ours.rng.integers(2**62) == theirs.rng.integers(2**62)
    # the contrast draws moved the generator: a fresh one's first draw differs
    assert here[0].rng.bit_generator.state != np.random.default_rng([tgrpo.seed, 0, 0]).bit_generator.state


@pytest.mark.slow
def test_a_bad_record_fails_with_the_same_error(toy, tokenizer):
    jobs = [prefetch.Job(data.load_batch, (bad_batch(toy),), bad_batch(toy))]
    errors = []
    for workers in (0, 1):
        with pytest.raises(data.DataError) as err:
            loaded_with(jobs, tokenizer, sft.config, workers)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "gone.mp4: video file not found" in errors[0]


def die(loader, code):
    """A load whose worker ends at once, as a decoder's segfault would end it."""
    os._exit(code)


def hang(loader, seconds):
    """A load that never finishes in time, as a decoder stuck on a network file system."""
    time.sleep(seconds)


def fail_with(job, timeout, kill_after=None):
    """The DataWorkerError of running `job` on a worker, and how long it took; the worker is gone. kill_after:
    seconds after which the test itself kills the worker with SIGKILL."""
    loader = data.Loader(None, {}, family.DEFAULT)
    loads = prefetch.Prefetcher([job], loader, 1, timeout)
    processes = [worker.process for worker in loads.workers]
    if kill_after is not None:
        threading.Timer(kill_after, os.kill, (processes[0].pid, signal.SIGKILL)).start()
    start = time.time()
    with pytest.raises(prefetch.DataWorkerError) as err:
        next(loads)
    assert not any(p.is_alive() for p in processes), "a worker outlived the failure"
    return str(err.value), time.time() - start


@pytest.mark.slow
def test_a_worker_that_dies_fails_at_once_naming_its_records(toy):
    records = records_of(toy, "sft.json")[:2]
    message, seconds = fail_with(prefetch.Job(die, (3,), records), timeout=60)
    assert "died (exit code 3) while loading" in message
    assert f"{records[0]['json']} record 0" in message and "record 1" in message
    assert seconds < 30  # not the timeout: the death itself is seen

    message, seconds = fail_with(prefetch.Job(hang, (60,), records), timeout=60, kill_after=1)
    assert "died (killed by SIGKILL) while loading" in message and seconds < 30


def test_a_hung_worker_fails_after_data_timeout(toy):
    records = records_of(toy, "sft.json")[:1]
    message, seconds = fail_with(prefetch.Job(hang, (60,), records), timeout=3)
    assert "gave no result in data_timeout=3 s" in message and f"{records[0]['json']} record 0" in message
    assert 3 <= seconds < 20


# run_script's `before`: the run's session id (run_script starts each run in a session of its own) to a file
SESSION_TO = "import os\nopen({path!r}, 'w').write(str(os.getsid(0)))"


def in_session(session):
    """The processes of a session, zombies aside."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:  # it ended while being listed
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(name)": state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(pid)
    return found


def processes_left(session_file, grace=10):
    """Processes of the run's session still there `grace` seconds after it ended: workers it left behind
    (multiprocessing's resource tracker ends by itself once the run has, within a moment)."""
    session = int(open(session_file).read())
    deadline = time.time() + grace
    while in_session(session) and time.time() < deadline:
        time.sleep(0.2)
    return in_session(session)


def run_sft_with(toy, out_dir, *args):
    """(exit code, output) of a short sft.py run, and asserts that no process of it is left."""
    session_file = str(out_dir) + ".session"
    code, output = run_script("sft.py", *sft_args(toy, out_dir, *args), before=SESSION_TO.format(path=session_file))
    assert processes_left(session_file) == []
    return code, output


@pytest.mark.slow
def test_sft_logs_the_same_with_data_workers_and_leaves_no_process(toy, tmp_path):
    """sft.py with a record whose clip is gone, skip_bad: the same losses, grad norms and skip counts with 0 and 2
    workers; without skip_bad the same error, and no worker left behind either way."""
    data_dir, _ = toy
    records = json.load(open(os.path.join(data_dir, "sft.json")))[:20]
    records[1]["path"] = "./videos/gone.mp4"
    records[1]["data_type"] = "video"
    cot = tmp_path / "cot.json"
    cot.write_text(json.dumps(records))
    data_args = (f"--train_json={cot}", f"--media_root={data_dir}")
    logs = []
    for workers in (0, 2):
        out_dir = tmp_path / f"w{workers}"
        code, output = run_sft_with(toy, out_dir, *data_args, "--skip_bad=True", f"--data_workers={workers}")
        assert code == 0, output[-6000:]
        lines = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
        logs.append([{k: v for k, v in m.items() if k != "step_time"} for m in lines])
    assert logs[0] == logs[1]
    assert sum(m["skipped"] for m in logs[0]) >= 1

    errors = []
    for workers in (0, 2):
        code, output = run_sft_with(toy, tmp_path / f"bad{workers}", *data_args, f"--data_workers={workers}")
        assert code != 0
        # the error the run ends with (a worker's traceback follows it, as a note)
        errors.append([line for line in output.splitlines() if line.startswith("data.DataError: ")][-1])
    assert errors[0] == errors[1]
    assert errors[0].endswith("cot.json record 1 (problem_id 1): " + os.path.join(data_dir, "videos", "gone.mp4")
                              + ": video file not found")


@pytest.mark.slow
def test_tgrpo_steps_are_the_same_with_data_workers(toy, tmp_path):
    """Three T-GRPO steps with contrast rollouts: every logged number but the timings equal with 0 and 2 workers (the
    contrast shuffles and the sampling seed drawn after them)."""
    logs = []
    for workers in (0, 2):
        out_dir = tmp_path / f"w{workers}"
        code, output = run_script("tgrpo.py", *tgrpo_args(toy, out_dir, "--max_steps=3", f"--data_workers={workers}"))
        assert code == 0, output[-6000:]
        lines = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
        timings = ("step_time", "rollout_tokens_per_s", "credit_time")
        logs.append([{k: v for k, v in m.items() if k not in timings} for m in lines])
    assert logs[0] == logs[1] and len(logs[0]) == 3


@pytest.mark.slow
def test_eval_results_are_byte_identical_with_data_workers(toy, shuffled_run, tmp_path):
    """eval.py --shuffled=True answers the same bytes with 0 and 2 workers, and a run resumed with other
    data_workers keeps its settings. The 0-worker run is conftest's shuffled_run (data_workers 0 is
    eval.py's default)."""
    here = shuffled_run[0]
    run_eval(toy, tmp_path / "w2", "--shuffled=True", "--data_workers=2")
    outputs = [(out_dir / "results.rank0.jsonl").read_bytes()
               for out_dir in (here, tmp_path / "w2")]
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") > 30
    # data_workers changes no answer: a run of 2 workers resumes one of 0
    shutil.copytree(here, tmp_path / "resumed")
    run_eval(toy, tmp_path / "resumed", "--shuffled=True", "--data_workers=2")


def test_cuda_graph_reaches_model_generate_from_every_script(toy, monkeypatch):
    """Each script's cuda_graph is what its model.generate call gets (on CPU the step runs eager either way)."""
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    passed = []

    def generate(*args, cuda_graph, **kwargs):
        passed.append(cuda_graph)
        return torch.zeros(len(args[1].input_ids), 1, dtype=torch.long), torch.ones(len(args[1].input_ids), 1)
    monkeypatch.setattr(model, "generate", generate)
    records = records_of(toy, "rl.json")[:2]
    for module in (tgrpo, E, groups):
        monkeypatch.setattr(module, "cuda_graph", False)
    monkeypatch.setattr(E, "config", dict(E.config, max_prompt_tokens=1024))
    tgrpo.rollout(net, records, tok, 0, "cpu")
    items = [(("toy", r["index"], False), r) for r in records]
    E.run_batch(net, tok, items, None, "cpu")
    groups.sample(net, tok, records, None)
    assert passed == [False, False, False]

