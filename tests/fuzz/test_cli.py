"""`cosmos3 generate` under arbitrary option values: exit status 2 with a one-line message, or a written file."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmos3 import cli

from .conftest import OUTCOMES

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
VALUES = st.one_of(st.integers(-10**9, 10**9).map(str), st.sampled_from(["0", "-1", "nan", "inf", "1e30", "", "x",
                                                                          "5", "9", "16", "32", "edge", "a=b"]))
OPTIONS = ["--frames", "--height", "--width", "--fps", "--steps", "--guidance", "--seed", "--chunk", "--tier",
           "--device", "--dtype", "--attention", "--control", "--control-video", "--chunk-frames", "--domain"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    from cosmos3.pipelines import Cosmos3WorldActionPipeline
    from cosmos3.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("cli") / "model", tiny_tokenizer,
                              pipeline_class=Cosmos3WorldActionPipeline)


@SETTINGS
@given(task=st.sampled_from(list(cli.TASKS)), option=st.sampled_from(OPTIONS), value=VALUES)
def test_generate_options(folder, tmp_path_factory, capsys, task, option, value):
    out = tmp_path_factory.mktemp("out") / ("o.png" if task == "t2i" else "o.mp4")
    argv = ["generate", "--task", task, "--model", folder, "--prompt", "a cat", "--out", str(out), "--steps", "1",
            "--height", "32", "--width", "32", "--frames", "5", "--device", "cpu", "--dtype", "float32",
            option, value]
    try:
        cli.main(argv)
        OUTCOMES["valid output"] += 1
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and err.strip() and "Traceback" not in err, (argv, e.code, err[-500:])
        OUTCOMES["clear error"] += 1
