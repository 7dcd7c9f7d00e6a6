"""A child process that runs op calls for the fuzz tests (tests/test_fuzz_ops.py) and
bench/sanitize_fuzz.py, so that a crash or a hang ends the child and not the test run.

OpRunner keeps one child (spawned: CUDA is never initialised in the parent) and sends it
one case at a time: (op name, args, kwargs, device, debug). Tensors travel as CPU tensors;
the child moves them to `device`, runs pagedlm.ops.<op> with PAGEDLM_DEBUG set as asked, and
sends back ("returned", outputs and the tensor arguments after the call, on the CPU) or
("raised", exception type name, message). A child that dies or overruns the timeout yields
("died", how) and is replaced for the next case."""
import concurrent.futures
import multiprocessing
import os


def _to(value, device):
    import torch
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def run_case(op, args, kwargs, device, debug):
    """In the child: one call, its outcome as plain CPU data."""
    import torch
    import pagedlm.ops as ops
    os.environ["PAGEDLM_DEBUG"] = "1" if debug else "0"
    args, kwargs = _to(args, device), _to(kwargs, device)
    try:
        result = getattr(ops, op)(*args, **kwargs)
        if device != "cpu":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the parent judges which exceptions are acceptable
        return ("raised", type(e).__name__, str(e))
    return ("returned", _to(result, "cpu"), _to(list(args), "cpu"), _to(kwargs, "cpu"))


class OpRunner:
    def __init__(self, timeout=60.0):
        self.timeout = timeout
        self.cases = 0
        self._pool = None

    def _start(self):
        context = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)

    def __call__(self, op, *args, device="cpu", debug=False, **kwargs):
        if self._pool is None:
            self._start()
        self.cases += 1
        future = self._pool.submit(run_case, op, args, kwargs, device, debug)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            return ("died", "the child process ended (a signal?)")
        except concurrent.futures.TimeoutError:
            for pid in list(self._pool._processes):  # the hung child, which we started
                os.kill(pid, 9)
            self.close()
            return ("died", f"no answer within {self.timeout} s")

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
