"""The simulated workload behind `pagedlm demo`: every request is served, nothing leaks, and
the C++ manager and the pure-Python model see the same run."""
import re

import pytest

import pagedlm
from pagedlm.cli import main
from pagedlm.workload import simulate, synthetic_requests
from py_block_manager import PyBlockManager


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_simulation_serves_every_request_and_frees_everything(prefix_caching):
    requests = synthetic_requests(60, seed=3, max_prompt=300, max_new_tokens=40)
    runs = []
    for manager in (pagedlm.BlockManager(160, 8, prefix_caching), PyBlockManager(160, 8, prefix_caching)):
        stats = simulate(manager, requests, max_running=16, seed=3)
        assert manager.stats()["used_blocks"] == 0 and manager.num_free_blocks == 160
        runs.append(stats)
    cpp, py = runs
    assert cpp == py
    assert cpp.generated_tokens == sum(r.max_new_tokens * r.num_samples for r in requests)
    assert cpp.preemptions > 0  # the cache is small enough to exercise preemption
    assert all(0 < u <= 1 for u in cpp.paged_utilization)


def test_cli_info_and_demo(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pagedlm {pagedlm.__version__}\n") and "CUDA kernels" in out
    assert main(["demo", "--block-manager", "--requests", "40", "--num-blocks", "2048", "--quiet"]) == 0
    out = capsys.readouterr().out
    # The printed figures are the simulation's own: rerun it on a fresh manager and compare.
    requests = synthetic_requests(40, seed=0)
    stats = simulate(pagedlm.BlockManager(2048, 16, True), requests, max_running=256, seed=0)

    def figure(name):
        return int(re.search(rf"^{re.escape(name)}\s+([\d,]+)", out, re.M)[1].replace(",", ""))

    assert figure("tokens generated") == stats.generated_tokens == sum(r.max_new_tokens * r.num_samples
                                                                        for r in requests)
    assert figure("prompt tokens") == stats.prompt_tokens
    assert figure("  served from the prefix cache") == stats.cached_prompt_tokens > 0
    assert figure("decode steps") == stats.steps
