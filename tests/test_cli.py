"""The `pagedlm` command as a user meets it: every option explained with its default, the
engine demo sized to the device with a summary that adds up, and ordinary mistakes (no GPU,
a missing folder, a bad device) reported in one line with exit status 2."""
import argparse
import re

import pytest
import torch

from pagedlm._device import resolve_device
from pagedlm.cli import build_parser, main


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_every_option_has_help_and_shows_its_default():
    for parser in all_parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert f"default: {action.default}" in " ".join(text.split()), (parser.prog, action.option_strings)


def test_engine_demo_summary_adds_up(capsys):
    assert main(["demo", "--random-weights", "--requests", "7", "--num-blocks", "120", "--block-size", "8",
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    expected = int(re.search(r"Serving 7 synthetic requests \(([\d,]+) output tokens", out)[1].replace(",", ""))
    served = int(re.search(r"output tokens\s+([\d,]+) in", out)[1].replace(",", ""))
    assert served == expected > 0  # EOS is ignored: every request runs to its max_tokens
    utilization = float(re.search(r"KV utilization\s+([\d.]+)%", out)[1])
    assert 0 < utilization <= 100
    hits, prompt_tokens = (int(x.replace(",", "")) for x in re.search(r"prefix-cache hits\s+([\d,]+) of ([\d,]+)",
                                                                         out).groups())
    assert 0 <= hits < prompt_tokens


def test_demo_workload_is_smaller_on_a_cpu():
    from pagedlm.cli import DEMO_WORKLOADS
    cpu, gpu = DEMO_WORKLOADS["cpu"], DEMO_WORKLOADS["cuda"]
    assert all(cpu[k] < gpu[k] for k in cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")
def test_asking_for_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["generate", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pagedlm generate: error: --device: 'cuda' asked for, but ")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["generate", "--device", "tpu"], "--device: 'tpu' is not a device"),
    (["demo", "--device", "meta"], "--device: 'meta' is not supported"),
])
def test_mistakes_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_folder_without_config_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "not a model folder (it has no config.json)" in capsys.readouterr().err


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: 'cuda:x'"):
        resolve_device("cuda:x")


def test_info_tells_no_driver_apart(capsys, monkeypatch):
    import pagedlm._device as device
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device.torch.version, "cuda", "13.0")
    monkeypatch.setattr(device, "cuda_driver_version", lambda: None)
    assert device.cuda_unavailable_reason() == "no NVIDIA driver found (libcuda.so.1 is not installed)"
    monkeypatch.setattr(device, "cuda_driver_version", lambda: 12040)
    assert device.cuda_unavailable_reason().startswith("the NVIDIA driver supports CUDA 12.4, older than the CUDA 13.0")
    monkeypatch.setattr(device, "cuda_driver_version", lambda: 13000)
    assert device.cuda_unavailable_reason().startswith("no CUDA GPU is visible")
