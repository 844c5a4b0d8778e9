"""``scripts/demo`` as a newcomer runs it: the offline story from start to summary, and
the commands it prints, run as printed while it runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("beacon-1", "boiler-1", "boiler-mb", "env-sensor-1", "env-sensor-2", "hall-sensor")
COMMANDS = (
    ("get", r"twin get plant/boiler-1 --config"),
    ("set", r"twin set plant/boiler-1 setpoint=65 --config"),
    ("kubectl", r"KUBECONFIG=\S+ \S*kubectl get devices"),
)


def _run_printed(line: str) -> subprocess.CompletedProcess[str]:
    """A command line as the demo printed it, run by a shell from the same folder."""
    return subprocess.run(line.strip(), shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)


def run_demo(
    *args: str, before_step: int | None = None
) -> tuple[int, str, dict[str, str], dict[str, subprocess.CompletedProcess[str]]]:
    """``scripts/demo ARGS`` to its end: (exit status, output, the commands it printed,
    their results). With ``--steps`` it presses Enter for each step, and runs the printed
    commands while the demo waits before step ``before_step``."""
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "demo"), "--exit", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE if "--steps" in args else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    killer = threading.Timer(240, proc.kill)  # a hung demo fails here instead of hanging CI
    killer.start()
    lines: list[str] = []
    printed: dict[str, str] = {}
    answers: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for line in proc.stdout:
            lines.append(line)
            for key, pattern in COMMANDS:
                if re.search(pattern, line):
                    printed[key] = line
            step = re.match(r"\[press Enter\] step (\d):", line)
            if step:
                if int(step.group(1)) == before_step:
                    answers = {key: _run_printed(cmd) for key, cmd in printed.items()}
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
        code = proc.wait(timeout=30)
    finally:
        killer.cancel()
    return code, "".join(lines), printed, answers


def check_story(code: int, out: str, step_prefix: str) -> None:
    """The five steps and a summary that says nothing was lost."""
    assert code == 0, out
    assert "Traceback" not in out and "Exception in" not in out and "!!!" not in out, out
    steps = re.findall(rf"^{re.escape(step_prefix)}step (\d): (.*)$", out, re.M)
    assert [n for n, _ in steps] == ["1", "2", "3", "4", "5"], steps
    summary = out[out.index("\nsummary\n") :]
    assert re.search(r"link cut, restored\s+yes, yes", summary), summary
    assert re.search(r"gateway restarts\s+1 ", summary), summary
    found = re.search(
        r"it came back with (\d+) values and (\d+) properties waiting for the cluster; 0 older or gone",
        summary,
    )
    assert found and int(found.group(1)) >= 25 and int(found.group(2)) > 0, summary
    queued = re.search(r"queued while cut\s+(\d+) devices, (\d+) properties", summary)
    assert queued and int(queued.group(2)) > 0, summary
    assert re.search(r"^  lost\s+0$", summary, re.M), summary
    checked = re.search(
        r"in the cluster\s+(\d+) of (\d+) properties .*\(kubectl get devices -o json\)", summary
    )
    assert checked and checked.group(1) == checked.group(2) and int(checked.group(2)) >= 25, summary
    assert re.search(r"backlog in the cluster \d+\.\d s after the link came back", summary), summary
    # kubectl's own table, printed by the demo, has every device with its values.
    table = out[out.index("step 5:") : out.index("\nsummary\n")]
    for name in DEVICES:
        assert re.search(rf"^{name}\s+demo-node\s+True\s+online\s+.*=", table, re.M), table
    values = re.search(r"bytes on the link\s+([\d,]+) both ways.*at least ([\d,]+)", summary)
    assert values and int(values.group(1).replace(",", "")) < int(values.group(2).replace(",", "")), summary


def test_scripts_demo_tells_the_offline_story_and_loses_nothing() -> None:
    """The default: no terminal, no flags but --exit (the default without a terminal)."""
    code, out, printed, _ = run_demo()
    check_story(code, out, "")
    assert set(printed) == {"get", "set", "kubectl"}, out


def test_the_commands_the_demo_prints_work_as_printed_while_the_link_is_cut() -> None:
    """With --steps, the commands run while the demo waits before the restart (step 3):
    the link is cut, and the set goes to the device through the gateway with no cloud
    at all. Taken while the demo waits, they cannot race the restart on a slow machine."""
    code, out, printed, answers = run_demo("--steps", before_step=3)
    check_story(code, out, "[press Enter] ")
    assert set(answers) == {"get", "set", "kubectl"}, out
    for key, result in answers.items():
        assert result.returncode == 0, (key, result.stdout, result.stderr)
    assert re.search(r"^setpoint\s", answers["get"].stdout, re.M), answers["get"].stdout
    assert "desired 65" in answers["set"].stdout, answers["set"].stdout
    assert all(name in answers["kubectl"].stdout for name in DEVICES), answers["kubectl"].stdout
    assert shlex.split(printed["get"])  # printed as a command line
