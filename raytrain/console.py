"""What a person sees: one `logging` setup for the entry points, and the channel that brings
the training workers' own lines to the driver (docs/design.md §6.5).

    setup_console()                       # cli / apps, once: raytrain INFO + everyone's WARNING
    add_log_file(run_dir / "raytrain.log")  # everything (DEBUG for raytrain) into the run's log
    with WorkerLines() as lines:          # driver: Ray is started with log_to_driver=False ...
        trainer = build_trainer(cfg, console=lines.queue)   # ... the workers forward to it

Library modules only log (`log = logging.getLogger(__name__)`); they never configure handlers.
On the console, raytrain's INFO records (progress lines) are printed as they are, WARNING and
above from any logger as `warning: <logger>: <message>`, each distinct warning once.
"""
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_OURS = "raytrain"


class _Stdout(logging.StreamHandler):
    """Writes to the current sys.stdout (so contextlib.redirect_stdout applies)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _ConsoleFilter(logging.Filter):
    """raytrain's INFO and above; others' WARNING and above; a repeated warning only once."""

    def __init__(self):
        super().__init__()
        self.shown: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == _OURS or record.name.startswith(_OURS + ".")
        if record.levelno < (logging.INFO if ours else logging.WARNING):
            return False
        if record.levelno >= logging.WARNING:
            key = (record.name, record.getMessage())
            if key in self.shown:
                return False
            self.shown.add(key)
        return True


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == "py.warnings":             # "file:line: Category: message\n  source line"
            text = text.splitlines()[0]
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {record.name}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_console():
    """Entry points only (idempotent): the console handler on the root logger, Python
    warnings routed through logging, raytrain's own loggers at DEBUG for the log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_raytrain", None) == "console":
            root.removeHandler(handler)
    console = _Stdout()
    console._raytrain = "console"
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.getLogger(_OURS).setLevel(logging.DEBUG)
    logging.captureWarnings(True)


def add_log_file(path: str | os.PathLike) -> Path:
    """Every record (raytrain's from DEBUG, others' from INFO) with time and logger into
    `path`, replacing the log file of an earlier call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_raytrain", None) == "file":
            root.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path)
    handler._raytrain = "file"
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return path


def log_file() -> Path | None:
    """The log file add_log_file attached, if any."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_raytrain", None) == "file":
            return Path(handler.baseFilename)
    return None


# ----------------------------------------------------------------------------- worker -> driver

class WorkerLines:
    """Driver side: a Ray queue the training workers put their raytrain log records on, and a
    thread that logs them here (console and log file). Needs Ray initialised."""

    def __init__(self):
        from ray.util.queue import Queue
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raytrain-worker-lines", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self.queue.shutdown(force=True)

    def _drain(self):
        from ray.util.queue import Empty
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception as err:               # noqa: BLE001 - the queue actor is gone
                log.debug("worker lines stopped: %r", err)
                return
            emit_forwarded(*item)


def emit_forwarded(name: str, levelno: int, message: str):
    """Log a record forwarded from a worker under its own logger name."""
    logging.getLogger(name).handle(logging.makeLogRecord(
        {"name": name, "levelno": levelno, "levelname": logging.getLevelName(levelno), "msg": message}))


class _ForwardHandler(logging.Handler):
    """Worker side: raytrain's INFO and above to the driver's queue. Only in the process that
    attached it (not in forked DataLoader workers, which have no Ray connection)."""

    def __init__(self, queue):
        super().__init__(logging.INFO)
        self.queue, self.pid = queue, os.getpid()

    def emit(self, record: logging.LogRecord):
        if os.getpid() != self.pid:
            return
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.queue.put_nowait((record.name, record.levelno, text))
        except Exception:                          # noqa: BLE001 - never break training for a log line
            pass


def forward_to_driver(queue):
    """Inside a training worker: send raytrain's records to the driver's WorkerLines."""
    ours = logging.getLogger(_OURS)
    for handler in list(ours.handlers):
        if isinstance(handler, _ForwardHandler):
            ours.removeHandler(handler)
    if queue is not None:
        ours.addHandler(_ForwardHandler(queue))
