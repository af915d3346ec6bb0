"""The command line's own behaviour, no cluster: addresses, usage errors, a gateway that is not
there, help with defaults, Serve's failure reasons in one line."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_serve.cli import address, build_parser, main
from moe_serve.launcher import serve_reason
from tests.cluster_fixtures import free_port


def test_an_address_without_a_port_goes_to_the_gateway_port():
    assert address("10.0.0.7") == "10.0.0.7:9000"
    assert address("gw.internal:9100") == "gw.internal:9100"
    assert address("127.0.0.1:9000") == "127.0.0.1:9000"


def test_model_without_local_is_an_error_naming_the_fix(capsys):
    assert main(["generate", "--model", "somewhere", "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "--model is read only with --local" in err and "moe-serve up --model" in err


def test_no_gateway_says_to_run_up(capsys):
    port = free_port()  # nothing listens there
    assert main(["generate", "--address", f"127.0.0.1:{port}", "--prompt-ids", "1,2", "--timeout", "5"]) == 1
    assert capsys.readouterr().err.strip() == \
        f"moe-serve generate: no gateway at 127.0.0.1:{port}: is `moe-serve up` running?"


def test_help_shows_defaults_and_load_needs_no_rps():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert "(default: 9000)" in sub["up"].format_help()
    load = sub["load"].parse_args([])
    assert load.rps is None and load.concurrency == 16  # closed loop at --concurrency
    assert parser.description.startswith("Serve a Mixtral-family")


def test_serve_reason_is_the_exception_line_not_the_traceback():
    trace = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
             "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    g()\n"
             "ValueError: checkpoint /m is missing model.layers.0.block_sparse_moe.gate.weight\n")
    status = SimpleNamespace(status="DEPLOY_FAILED", message="", deployments={
        "Gateway": SimpleNamespace(status="HEALTHY", message=""),
        "Router": SimpleNamespace(status="DEPLOY_FAILED", message=trace)})
    assert serve_reason(status) == "Router: ValueError: checkpoint /m is missing model.layers.0.block_sparse_moe.gate.weight"


@pytest.mark.parametrize("argv", [["up", "--help"], ["load", "--help"], ["simulate", "--help"]])
def test_every_help_prints(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
