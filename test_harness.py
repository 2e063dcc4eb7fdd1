"""The test harness itself (conftest.run_script): a hang is killed with every process it started."""
import os
import threading
import time
import pytest
from conftest import run_script

HANGS = """
import subprocess, sys, time
# a child in a session of its own, as torchrun starts its ranks, holding the output pipe
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print("child", child.pid, flush=True)
time.sleep(600)
"""


def alive(pid):
    """Whether pid still exists (not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # a script run and a 5 s timeout
def test_a_hang_is_killed_with_the_children_in_their_own_sessions(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(HANGS)
    result = {}
    # in a thread, so that a harness which waits on the child fails this test instead of hanging it
    worker = threading.Thread(target=lambda: result.update(out=run_script(str(script), timeout=5)))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "run_script still waits on a killed run's child"
    code, output = result["out"]
    assert code != 0 and "[killed after 5 s: a hang]" in output
    child = int(output.split("child ")[1].split()[0])
    deadline = time.time() + 10  # the orphan is reaped by init once killed
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)
