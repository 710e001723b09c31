"""The console: progress lines once, others' chatter off the console, warnings once, a log file."""
import logging
import warnings
from types import SimpleNamespace

import pytest

from raytrain.console import add_log_file, emit_forwarded, log_file, setup_console


@pytest.fixture
def console():
    """setup_console() for one test; the root logger's handlers and levels restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("raytrain").level)
    logging.captureWarnings(False)     # an earlier in-process `raytrain` call may have captured them
    setup_console()
    yield
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    logging.getLogger("raytrain").setLevel(saved[2])
    logging.captureWarnings(False)


def test_progress_once_chatter_off_warnings_once(console, capsys, tmp_path):
    path = add_log_file(tmp_path / "run" / "raytrain.log")
    assert log_file() == path
    logging.getLogger("raytrain.train.logger").info("[raytrain] step 1/6 epoch 0")
    logging.getLogger("raytrain.data.reader").debug("bad sample in shard-0: truncated")
    logging.getLogger("otherlib.controller").info("Reporting training result 1: {...}")   # chatter
    for _ in range(3):
        logging.getLogger("smplx").warning("only 10 shape coefficients")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)
    emit_forwarded("raytrain.train.logger", logging.INFO, "[raytrain] step 2/6 epoch 0")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[raytrain] step 1/6 epoch 0"
    assert lines[1] == "warning: smplx: only 10 shape coefficients"
    assert "DeprecationWarning: a deprecated thing" in lines[2]
    assert lines[3] == "[raytrain] step 2/6 epoch 0"
    assert len(lines) == 4
    logged = path.read_text()
    for text in ("step 1/6", "bad sample in shard-0", "Reporting training result 1", "step 2/6"):
        assert text in logged, text
    assert logged.count("only 10 shape coefficients") == 3       # the file keeps every record


def test_setup_twice_prints_once(console, capsys, tmp_path):
    setup_console()
    add_log_file(tmp_path / "a.log")
    second = add_log_file(tmp_path / "b.log")
    logging.getLogger("raytrain.cli").info("hello")
    assert capsys.readouterr().out == "hello\n"
    assert log_file() == second and "hello" in second.read_text()
    assert "hello" not in (tmp_path / "a.log").read_text()


def test_loss_line_has_no_negative_zero(console, capsys):
    from raytrain.train.logger import RunLogger
    cfg = SimpleNamespace(train=SimpleNamespace(tensorboard=False, mlflow_uri=None, sample_log=None,
                                                log_every=1, storage_path="unused"), name="t")
    run_logger = RunLogger(cfg, SimpleNamespace(rank=0, world_size=1), total_steps=2)
    run_logger.step(SimpleNamespace(step=1, epoch=0), {"cam": 0.5, "cont": -0.0}, 4, 1e-3, ["k"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("[raytrain] step 1/2 epoch 0 ") and " cam=0.5 cont=0 " in line


def test_run_log_path_is_beside_the_run(tmp_path, monkeypatch):
    from raytrain.config import load_config
    from raytrain.train.launch import run_log_path
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'runs'}", "name=exp"])
    assert run_log_path(cfg) == tmp_path / "runs" / "exp" / "raytrain.log"
    assert run_log_path(cfg, experiment=str(tmp_path / "runs/tune/exp")) == tmp_path / "runs/tune/exp/raytrain.log"
    monkeypatch.setenv("RAYTRAIN_HOME", str(tmp_path / "home"))
    remote = load_config(None, ["train.storage_path=s3://bucket/runs", "name=exp"])
    assert run_log_path(remote) == tmp_path / "home" / "logs" / "exp.log"
