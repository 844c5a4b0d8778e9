"""``edgetwin sim ble`` as a user starts it: under nohup, in CI, with stdin closed."""

from __future__ import annotations

import json
import subprocess
import time

from tests.conftest import EDGETWIN
from tests.harness.processes import free_port


def test_sim_ble_serves_with_stdin_from_dev_null_without_a_traceback() -> None:
    proc = subprocess.Popen(
        [EDGETWIN, "sim", "ble", "--port", str(free_port())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] and ready["sensors"][0]["name"] == "env-sensor-1"
        time.sleep(1.5)  # the loop has run past the point where it watches stdin
        assert proc.poll() is None, "the simulator ended with stdin at end of file"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err and "Exception in" not in err, err
