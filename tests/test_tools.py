"""Tools of multi-turn rollouts (rollout/tools/): the calculator's arithmetic, the python sandbox's limits (each
failure one line back to the model), user tools by module:function, the call formats."""
import os
import subprocess
import time

import pytest

from dapo_megatron.rollout.tools import ToolLimits, get_tool, run_tool, tool_names
from dapo_megatron.rollout.tools.formats import FencedFormat, HermesFormat
from dapo_megatron.rollout.tools.python_sandbox import network_isolated, sandbox_user_and_interpreter

LIMITS = ToolLimits(timeout_s=2.0, max_output_chars=100, memory_mb=256)


def shout(text: str) -> str:  # a user tool, named tests.test_tools:shout
    return text.upper()


def py(code, limits=LIMITS):
    return run_tool(get_tool("python"), {"code": code}, limits)


def one_line_error(outcome, status="error"):
    assert outcome.status == status and outcome.text.startswith("Error: ") and "\n" not in outcome.text, outcome
    return outcome.text


def test_registry_lists_the_builtin_tools_and_loads_user_tools():
    assert {"calculator", "python"} <= set(tool_names())
    out = run_tool(get_tool("tests.test_tools:shout"), {"text": "hi"}, LIMITS)
    assert (out.text, out.status) == ("HI", "ok")
    assert one_line_error(run_tool(get_tool("tests.test_tools:shout"), {"nope": 1}, LIMITS)).startswith(
        "Error: TypeError: shout() got an unexpected keyword argument")
    with pytest.raises(ValueError, match="'nosuch' is unknown; use one of calculator, python"):
        get_tool("nosuch")


@pytest.mark.parametrize("expr, want", [("123*45", "5535"), ("(1+2)**3 - 4/2", "25"), ("7//2 + 7%2", "4"),
                                        ("-3.5*2", "-7"), ("1/4", "0.25")])
def test_calculator_arithmetic(expr, want):
    out = run_tool(get_tool("calculator"), {"expression": expr}, LIMITS)
    assert (out.text, out.status) == (want, "ok")


@pytest.mark.parametrize("expr, msg", [("__import__('os').system('true')", "only numbers"), ("x + 1", "only numbers"),
                                       ("9**10**10", "exponent 10000000000 is larger than 1000"),
                                       ("1/0", "division by zero"), ("2 +", "not an arithmetic expression"),
                                       ("(10**99)*(10**99)", "result out of range")])
def test_calculator_refuses_names_and_unbounded_work(expr, msg):
    assert msg in one_line_error(run_tool(get_tool("calculator"), {"expression": expr}, LIMITS))


def test_python_runs_code_and_caps_output():
    out = py("print(sum(range(10)))")
    assert (out.text, out.status) == ("45\n", "ok")
    out = py("print('a' * 5000)")
    assert out.status == "ok" and out.text == "a" * 100  # max_output_chars
    out = py("while True: print('x' * 1000)")  # an endless print loop: file-size cap, then the wall limit
    assert out.status in ("ok", "error", "timeout") and len(out.text) <= 100


def test_python_timeout_is_one_line_and_kills_the_process_group():
    start, seconds = time.monotonic(), f"300.{os.getpid()}{time.monotonic_ns() % 10**6}"  # this test's sleep only
    text = one_line_error(py(f"import subprocess, time\nsubprocess.Popen(['sleep', '{seconds}'])\nwhile True: pass"),
                          status="timeout")
    assert text == "Error: timeout: python ran longer than 2s" and time.monotonic() - start < 30
    alive = subprocess.run(["pgrep", "-f", f"^sleep {seconds}$"], capture_output=True).stdout.split()
    assert not alive, "the sandbox's child outlived the timeout"


def test_python_memory_limit():
    assert one_line_error(py("x = bytearray(2 * 1024 ** 3)")) == "Error: MemoryError"


def test_python_exception_is_its_last_line():
    assert one_line_error(py("def f():\n    return 1 / 0\nf()")) == "Error: ZeroDivisionError: division by zero"


def test_python_network_is_blocked():
    if not network_isolated():
        pytest.skip("this machine gives no network namespace (unshare(CLONE_NEWNET) refused): not contained here")
    text = one_line_error(py("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)"))
    assert "Network is unreachable" in text
    out = py("import socket\nprint(socket.if_nameindex())")  # only the (down) loopback of its own namespace
    assert out.text.strip() == "[(1, 'lo')]"


def test_python_cannot_write_outside_its_dir(tmp_path):
    uid, _ = sandbox_user_and_interpreter()
    if uid is None:
        pytest.skip("not root: the sandbox runs as this user and may write where it may (said in the module doc)")
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o755)
    text = one_line_error(py(f"open({str(target)!r}, 'w').write('x')"))
    assert text.startswith("Error: PermissionError") and not target.exists()
    out = py("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())")  # its own dir is writable
    assert out.text == "ok\n"


def test_python_fork_bomb_is_contained():
    start = time.monotonic()
    out = py("import os\nwhile True:\n    os.fork()")
    assert out.status in ("error", "timeout") and "\n" not in out.text and time.monotonic() - start < 30
    assert py("print(1)").text == "1\n"  # and the next call runs


def test_hermes_and_fenced_parsing():
    h = HermesFormat()
    args = {"calculator": "expression"}
    call = h.parse('x <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>', args)
    assert (call.name, call.args, call.error) == ("calculator", {"expression": "1+1"}, "")
    call = h.parse('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>', args)
    assert call.args == {"expression": "2"}
    assert h.parse("no call here", args) is None
    assert h.parse("<tool_call>[1]</tool_call>", args).error.startswith("malformed tool call")
    f = FencedFormat()
    assert f.parse("```calculator\n3*4\n```\n", args).args == {"expression": "3*4"}
    assert f.parse("```calculator\n3*4\n```", args) is None  # not closed (no stop string matched)
    assert f.parse("```bash\nls\n```\n", args).error == "unknown tool 'bash'"


def test_time_waiting_for_a_free_worker_is_not_a_timeout():
    """Twelve 0.3 s calls on two workers with a 0.5 s limit: the last ones wait 1.5 s for a worker; none times out."""
    import asyncio
    import concurrent.futures

    from dapo_megatron.rollout.tools import arun_tool

    spec = get_tool("tests.test_multi_turn:sleepy")
    limits = ToolLimits(timeout_s=0.5)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        async def calls():
            return await asyncio.gather(*(arun_tool(spec, {"input": "0.3"}, limits, pool) for _ in range(12)))
        outs = asyncio.run(calls())
    assert [o.status for o in outs] == ["ok"] * 12 and {o.text for o in outs} == {"woke"}
