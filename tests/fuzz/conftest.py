"""Property-based checks of every entry point under hostile input: a clear, documented exception naming what is
wrong, or a valid output; never a hang past the bound, never a deep framework error.

Each test records what it saw in `OUTCOMES` (printed at the end of the session with `-s`, and asserted on)."""

import collections
import signal

import pytest

# Exceptions a user may get from bad input: the library's contract (README, "Bad input gets a clear error"). OSError:
# an unreadable checkpoint folder, as diffusers reports it (FileNotFoundError is one); MediaDecodeError is a ValueError.
CLEAR = (ValueError, TypeError, OSError)
OUTCOMES: collections.Counter = collections.Counter()
BOUND_S = 20  # no single call may run longer


def outcome(fn):
    """Run `fn()`; count a valid result, a clear error or a crash, and re-raise crashes (the test fails on them)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"a call ran past {BOUND_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(BOUND_S)
    try:
        fn()
        OUTCOMES["valid output"] += 1
    except TimeoutError:
        OUTCOMES["hang"] += 1
        raise
    except CLEAR as e:
        message = str(e)
        assert message and "Traceback" not in message, f"an empty or raw error: {e!r}"
        OUTCOMES["clear error"] += 1
    except Exception:
        OUTCOMES["crash"] += 1
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_terminal_summary(terminalreporter):
    if OUTCOMES:
        terminalreporter.write_line(f"fuzz outcomes: {dict(OUTCOMES)}")


@pytest.fixture(scope="module")
def pipes(tiny_tokenizer):
    from cosmos3.pipelines import (
        Cosmos3ImageToVideoPipeline,
        Cosmos3TextToImagePipeline,
        Cosmos3TextToVideoPipeline,
        Cosmos3TransferPipeline,
        Cosmos3VideoToVideoPipeline,
        Cosmos3WorldActionPipeline,
    )
    from cosmos3.testing import tiny_parts

    parts = tiny_parts(tiny_tokenizer, sound=True)
    out = {}
    for name, cls in (("t2i", Cosmos3TextToImagePipeline), ("t2v", Cosmos3TextToVideoPipeline),
                      ("i2v", Cosmos3ImageToVideoPipeline), ("v2v", Cosmos3VideoToVideoPipeline),
                      ("transfer", Cosmos3TransferPipeline), ("world_action", Cosmos3WorldActionPipeline)):
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out
