"""The simulated workload behind `pagedlm demo`: every request is served, nothing leaks, and
the C++ manager and the pure-Python model see the same run."""
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
    main(["info"])
    out = capsys.readouterr().out
    assert f"pagedlm {pagedlm.__version__}" in out and "CUDA kernels" in out
    main(["demo", "--block-manager", "--requests", "40", "--num-blocks", "2048", "--quiet"])
    out = capsys.readouterr().out
    assert "tokens generated" in out and "prefix cache" in out
