"""The conformance suite's other process (tests/other_process.py) fails a check that fails."""
import pytest
from other_process import run_elsewhere

SECRET = object()


def test_a_check_runs_there_and_sees_nothing_of_this_process():
    out = run_elsewhere("""
        import os
        print(os.getpid(), torch.__version__, "SECRET" in globals())
    """)
    pid, _, seen = out.split()
    import os
    assert int(pid) != os.getpid() and seen == "False"


def test_a_failing_check_fails_with_its_traceback():
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        run_elsewhere("1 / 0")
    with pytest.raises(AssertionError, match="no such"):
        run_elsewhere("assert False, 'no such'")


def test_a_crash_fails_the_check_and_the_next_check_gets_a_new_process():
    first = run_elsewhere("import os; print(os.getpid())")
    with pytest.raises(AssertionError, match="ended or timed out"):
        run_elsewhere("import os; os._exit(3)")
    second = run_elsewhere("import os; print(os.getpid())")
    assert first != second
    with pytest.raises(AssertionError, match="ended or timed out"):
        run_elsewhere("import time; time.sleep(5)", timeout=0.5)
    assert run_elsewhere("print(1 + 1)").strip() == "2"
