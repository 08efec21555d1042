"""`make demo` (examples/demo.py) tells the story and cleans up after itself, also on Ctrl-C."""

from __future__ import annotations

import importlib.util
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import e2e_stack as st
import pytest

pytestmark = pytest.mark.e2e

DEMO = st.ROOT / "examples" / "demo.py"


def _ports(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"^  \w+ +127\.0\.0\.1:(\d+) ", text, re.M)]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_tells_the_story_and_stops_everything() -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(DEMO)], cwd=st.ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    out = r.stdout
    steps = re.split(r"^\d\. ", out, flags=re.M)[1:]
    assert len(steps) == 5, out
    assert "-> OK: balance" in steps[0] and "assurance=aal1" in steps[0]
    assert "-> UNAUTHENTICATED: insufficient_user_authentication" in steps[1]
    assert "acr_values=phr phrh  max_age=(not asked)" in steps[1]
    assert "-> OK: transfer" in steps[2] and "assurance=aal2_phr" in steps[2]
    assert "-> PERMISSION_DENIED" in steps[3] and "www-authenticate" not in steps[3]
    assert "acr_values=(not asked)  max_age=3600" in steps[4]
    ports = _ports(out)
    assert len(ports) == 3
    assert not [p for p in ports if _listening(p)], "a demo process is still listening"


def test_demo_stops_everything_on_ctrl_c() -> None:
    """With --hold the stack stays up after the story; SIGINT (Ctrl-C) stops all three processes."""
    p = subprocess.Popen(
        [sys.executable, str(DEMO), "--hold"],
        cwd=st.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        lines: list[str] = []
        while not (lines and lines[-1].startswith("Holding the stack")):
            line = p.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        ports = _ports("".join(lines))
        assert len(ports) == 3, lines
        assert all(_listening(port) for port in ports)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:  # SIGTERM lets the demo stop its children; SIGKILL would orphan them
            p.terminate()
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    assert p.returncode == 130, out + err
    assert "Stopped the sidecar, the bank and Envoy." in out
    assert not [port for port in ports if _listening(port)], "a demo process survived Ctrl-C"


def test_hold_wakes_when_ctrl_c_lands_on_another_thread() -> None:
    """The kernel may deliver a process-directed SIGINT to any thread (the demo has grpc's); one
    that lands on another thread must still stop `hold()`, which sleeps in the main thread."""
    spec = importlib.util.spec_from_file_location("stepup_demo", DEMO)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    main_thread = threading.main_thread().ident
    assert main_thread == threading.get_ident()

    class Stuck(Exception):
        pass

    def _stuck(signum: int, frame: object) -> None:
        raise Stuck

    done = threading.Event()

    def _other_thread() -> None:
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # handled in main, but not woken
        if not done.wait(5):
            assert main_thread is not None
            signal.pthread_kill(main_thread, signal.SIGUSR1)  # watchdog: the main thread still sleeps

    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_usr1 = signal.signal(signal.SIGUSR1, _stuck)
    t = threading.Thread(target=_other_thread, daemon=True)
    t0 = time.monotonic()
    try:
        t.start()
        with pytest.raises(KeyboardInterrupt):
            demo.hold()
        done.set()
        assert time.monotonic() - t0 < 2
    finally:
        done.set()
        t.join()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGUSR1, old_usr1)
