"""Shared pytest fixtures: a small tokenizer with Qwen's special tokens (no hub access exists here or in CI); and
run_script and run_eval, which run a script in a process of its own (forked from a server that has
imported the libraries once) or in torchrun's ranks."""
import glob
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple
import pytest
import torch
import lifecycle
import model
import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts' folder: every script run's cwd
CORPUS = ["<think>In the first frames the red square is at the left. So it moves right.</think>\n<answer>B</answer>",
          "What colour is the square? Options:\nA. red\nB. green\nC. blue\nD. yellow\n",
          "Please think about this question as if you were a human pondering deeply. Provide your detailed reasoning "
          "between the <think> and </think> tags, and then give your final answer between the <answer> and "
          "</answer> tags."]


def pytest_configure(config):
    """The `slow` marker: the tests that `python -m pytest -m "not slow"` (the fast loop) leaves
    out; CI runs them all. The only pytest_configure here: a second def of it would replace this
    one (a merge once left two, and the thread pin below was dead)."""
    config.addinivalue_line("markers", "slow: multi-process, DeepSpeed, script runs, over ~2 s")
    # one CPU thread in this process, as the scripts run (threads = 1): the tiny models gain nothing
    # from more, and on 2 cores shared with other jobs, test_decode.py and test_model.py's fast tests
    # took 53 s on two threads against 7 s on one
    torch.set_num_threads(1)
    # and in every script run the suite starts (forked or launched, they inherit this environment),
    # whose torch reads it as it imports
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tokenizer():
    return synthetic.build_tokenizer(CORPUS * 4)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny Qwen2.5-VL, written with save_pretrained and loaded back through the checkpoint path."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")
    synthetic.ensure_tiny_model(path, CORPUS * 4)
    net, tok = lifecycle.load_model(path, "cpu")
    return net.eval(), tok, path


@pytest.fixture(scope="session")
def tiny3(tmp_path_factory):
    """The tiny Qwen3-VL, with the tiny Qwen2.5-VL's tokenizer, written and loaded back the same way."""
    path = str(tmp_path_factory.mktemp("tiny3") / "tiny-qwen3-vl")
    synthetic.ensure_tiny_model(path, CORPUS * 4, model_type="qwen3_vl")
    net, tok = lifecycle.load_model(path, "cpu")
    return net.eval(), tok, path


def random_clip(t, height, width, is_video=True, second_per_grid=1.0, seed=0, patch=14):
    """A clip of random pixels with t temporal patches (pixel content does not matter to position/equality tests);
    a video's patches 1 s apart (Qwen3-VL's timestamps)."""
    from data import Clip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(t * (height // patch) * (width // patch), 3 * 2 * patch * patch, generator=g)
    timestamps = [0.5 + i for i in range(t)] if is_video else None
    return Clip(pixels, (t, height // patch, width // patch), is_video, second_per_grid, timestamps)


def encode_text(tok, text, clip, fam=None):
    """Token ids and mm types of a chat prompt around `clip` (None: a text-only prompt), in `fam`'s layout."""
    import data
    import family
    fam = fam or family.DEFAULT
    before, after = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    if clip:
        before, after = data.chat_template(clip, fam)
    prompt = before + text + after
    ids = tok(prompt, add_special_tokens=False).input_ids
    kinds = {tok.convert_tokens_to_ids(t): kind for t, kind in data.MM_TYPE.items()}
    return ids, [kinds.get(i, 0) for i in ids]


def ours_with_grads(net, batch, completion, mask, share_prompts=False):
    """Our completion log-probs (B, T) and the parameter gradients of their sum; the net's gradients are zeroed."""
    net.zero_grad()
    ours = model.completion_logprobs(net, batch, completion, mask, share_prompts=share_prompts)
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    return ours, grads


def assert_matches_transformers(net, ours, ours_grads, logits, completion):
    """`logits` (B, T, V): transformers' own forward at the completion's positions. Its log-probs of the completion
    equal ours, and the gradients of their sum equal ours_grads, parameter by parameter."""
    plain = logits.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    plain.sum().backward()
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    assert len(ours_grads) == len([p for p in net.parameters() if p.grad is not None])
    for name, p in net.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A small synthetic task and the tiny model built from its text, as the default run builds them."""
    import data
    import synthetic
    root = tmp_path_factory.mktemp("toy")
    paths = synthetic.generate(str(root / "synthetic"), seed=0, n_sft=48, n_rl=24, n_eval=30)
    records, _ = data.load_records(paths["sft"])
    model_path = str(root / "tiny")
    synthetic.ensure_tiny_model(model_path, [data.question_text(r) + data.sft_target(r) for r in records])
    return str(root / "synthetic"), model_path


ON_RANK_1 = "import os\nif os.environ['RANK'] == '1':\n    "  # run_script's `before` for one rank of two
RANK_1_CLIPS_FAIL = ON_RANK_1 + ("import data\n    def fail(record, **limits):\n"
                                 "        raise data.DataError(record['path'] + ': gone')\n    data.read_media = fail")


# Every multi-process run checks, before each checkpoint, that the ranks' weights are equal bit for bit (not under
# ZeRO-3, whose ranks hold different partitions). The scripts keep them equal by construction (one averaged
# gradient, one optimizer step): this checks the construction from outside, so the scripts carry no check of it.
SAME_WEIGHTS_ON_RANKS = """
import common, lifecycle, model, torch
def weights_checked(save):
    def checked(out_dir, step, tokenizer, optimizer, config, consumed):
        if not common.is_zero3(optimizer.model):
            w = torch.cat([p.detach().double().flatten() for p in model.unwrap(optimizer.model).parameters()])
            gathered = [torch.zeros_like(w) for _ in range(common.WORLD)]
            torch.distributed.all_gather(gathered, w)
            assert all(torch.equal(g, gathered[0]) for g in gathered), f"ranks out of sync at step {step}"
        return save(out_dir, step, tokenizer, optimizer, config, consumed)
    return checked
lifecycle.save_checkpoint = weights_checked(lifecycle.save_checkpoint)
"""


# A single-process script run forks from a server that has imported the third-party libraries once
# (multiprocessing's forkserver, with PRELOAD): a fresh interpreter spends about 7 s of CPU importing
# torch, transformers, peft and the model classes, which was most of a toy run's cost and, over the
# suite's ~60 such runs, about a quarter of CI's CPU time. Each run is still a process of its own, in a
# session of its own, importing the scripts' modules anew, so a run leaves nothing behind for the next.
# Multi-rank runs go through torch.distributed.run as a user's do.
PRELOAD = ["torch", "numpy", "decord", "PIL.Image", "peft", "rouge_score.rouge_scorer", "transformers",
           "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "transformers.models.qwen3_vl.modeling_qwen3_vl"]
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(PRELOAD)
IN_A_FORK = """
import os, sys
os.setsid()  # a session of its own, as a fresh process has: a hang is killed with what it started
os.chdir({here!r})
os.environ.clear()  # the caller's environment now, not the server's from when it started
os.environ.update(caller_environment)
for fd, path in ((1, {stdout!r}), (2, {stderr!r})):
    opened = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(opened, fd)
    os.close(opened)
sys.stdout.reconfigure(line_buffering=True)
sys.argv = {argv!r}
"""


RUN_ARGV = "import runpy, sys; sys.path.insert(0, '.')\nrunpy.run_path(sys.argv[0], run_name='__main__')"


class Finished(NamedTuple):
    """How a script run ended: its exit code (negative: killed by that signal) and its output."""
    returncode: int
    stdout: str
    stderr: str


def run_forked(code, argv, timeout, merged):
    """Run Python `code` with sys.argv = argv in a process forked from the preloaded server, cwd this
    folder; stderr into stdout if `merged`. A run that outlives `timeout` seconds is killed with every
    process it started."""
    with tempfile.TemporaryDirectory() as folder:
        stdout = os.path.join(folder, "stdout")
        stderr = stdout
        if not merged:
            stderr = os.path.join(folder, "stderr")
        for path in {stdout, stderr}:
            open(path, "w").close()
        prefix = IN_A_FORK.format(here=HERE, stdout=stdout, stderr=stderr, argv=list(argv))
        names = {"__name__": "__forked__", "caller_environment": dict(os.environ)}
        proc = FORKS.Process(target=exec, args=(prefix + code, names))
        proc.start()
        proc.join(timeout)
        killed = proc.exitcode is None
        if killed:
            kill_tree(proc.pid)
            proc.join()
        out = read_text(stdout)
        err = read_text(stderr)
    if killed:
        out += f"\n[killed after {timeout} s: a hang]"
    return Finished(proc.exitcode, out, err)


def read_text(path):
    with open(path) as f:
        return f.read()


def torchrun(nproc):
    """The launcher a user runs for nproc ranks on this machine (each rank a fresh interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_script(script, *args, nproc=1, before="", timeout=300):
    """Run `script` with `args` from this folder: forked from the preloaded server (above), or under
    torch.distributed.run when nproc > 1 (with the check above); `before` is Python run first in every
    process (a test's stand-in for a broken input). A run that outlives `timeout` seconds (a hang) is
    killed with all its processes. Returns (exit code, stdout + stderr)."""
    code = f"{SAME_WEIGHTS_ON_RANKS * (nproc > 1)}\n{before}\n{RUN_ARGV}"
    argv = [script, *map(str, args)]
    if nproc == 1:
        finished = run_forked(code, argv, timeout, merged=True)
        return finished.returncode, finished.stdout
    in_each_rank = "import sys; sys.argv = sys.argv[1:]\n" + code
    launcher = [*torchrun(nproc), "--no-python", sys.executable, "-c", in_each_rank]
    proc = subprocess.Popen([*launcher, *argv], text=True, cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: killing the launcher's group alone
        # leaves the ranks holding the output pipe, and communicate() would then wait on them
        kill_tree(proc.pid)
        output = proc.communicate()[0] + f"\n[killed after {timeout} s: a hang]"
    return proc.returncode, output


def kill_tree(pid):
    """SIGKILL pid, every process it started, and its session's process group (pid leads one)."""
    for member in process_tree(pid):
        kill_if_alive(member)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the group's last process has gone already
        return


def process_tree(pid):
    """pid and all its descendants, from Linux's /proc/PID/task/TID/children lists."""
    tree = [pid]
    for parent in tree:  # the list grows as the walk finds children
        for children in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(children) as f:
                    tree.extend(int(child) for child in f.read().split())
            except FileNotFoundError:  # that thread or process ended during the walk
                continue
    return tree


def kill_if_alive(pid):
    """SIGKILL pid; one that has already ended is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


UNTIL_A_MODEL_LOADS = """
import runpy, sys
import lifecycle
def refuse(*args, **kwargs):
    raise SystemExit("a model was loaded")
lifecycle.load_model = refuse
for argv in {argvs!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except BaseException as err:
        print(argv[0], argv[-1], "->", type(err).__name__, str(err).splitlines()[0], flush=True)
"""


def run_until_a_model_loads(argvs):
    """Run each argv (script, args...) in one process with lifecycle.load_model refused, so that a check before any
    model loads shows its error and a run that passes every check stops with "SystemExit a model was loaded".
    Returns the lines "script last-arg -> ErrorType first line of its message", one per argv, and the other lines
    printed (notes)."""
    result = subprocess.run([sys.executable, "-c", UNTIL_A_MODEL_LOADS.format(argvs=argvs)], text=True,
                            cwd=HERE, capture_output=True)
    lines = result.stdout.splitlines()
    outcomes = [line for line in lines if line.startswith(tuple(f"{argv[0]} {argv[-1]} -> " for argv in argvs))]
    assert len(outcomes) == len(argvs), result.stdout + result.stderr[-3000:]
    return outcomes, [line for line in lines if line not in outcomes]


def run_eval(toy, out_dir, *args, nproc=1, check=True):
    """eval.py on the toy eval set (or --data=...), small batches and 8 new tokens to stay fast: forked
    from the preloaded server, or under torch.distributed.run when nproc > 1. With check, the run must
    succeed: returns (summary, stdout); else a Finished (returncode, stdout, stderr apart)."""
    data_dir, model_path = toy
    argv = ["eval.py", f"--model_path={model_path}", f"--data={os.path.join(data_dir, 'eval.json')}",
            f"--out_dir={out_dir}", "--batch_size=4", "--max_new_tokens=8", *args]
    if nproc == 1:
        result = run_forked(RUN_ARGV, argv, 300, merged=False)
    else:
        result = subprocess.run([*torchrun(nproc), *argv], cwd=HERE, capture_output=True, text=True)
    if not check:
        return result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f), result.stdout


@pytest.fixture(scope="session")
def shuffled_run(toy, tmp_path_factory):
    """One full 1-process eval.py run with the shuffled diagnostic, for the tests that only read it
    (test_eval.py and test_prefetch.py's 0-worker run): (out_dir, summary, stdout)."""
    out_dir = tmp_path_factory.mktemp("eval") / "full"
    return (out_dir, *run_eval(toy, out_dir, "--shuffled=True"))
