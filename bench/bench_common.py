"""What every benchmark script shares: the machine's and the commit's names for the
results header, a process's CPU time, the card's ceilings (copy bandwidth, matmul rate),
FlashInfer's version and the best anchor, and appending a table to bench/RESULTS.md or
another file."""
import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit():
    if os.environ.get("PAGEDLM_COMMIT"):  # set by gpu_check.sh: the GPU machine's copy may lack .git
        return os.environ["PAGEDLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def process_cpu_seconds(pid):
    """User + system CPU seconds of process pid so far (None without a pid, or off Linux)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_bandwidth():
    """The current GPU's copy bandwidth in bytes/s: a 1 GiB device-to-device copy, bytes read +
    written over the median time."""
    import torch
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(n=8192):
    """The current GPU's dense bf16 matrix-product rate in FLOP/s (an n x n x n product, median)."""
    import torch
    from triton.testing import do_bench
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def flashinfer_version():
    """FlashInfer's version string when it imports here, else None (the anchor is optional)."""
    try:
        import flashinfer
    except ImportError:
        return None
    return getattr(flashinfer, "__version__", "unknown")


def anchor_columns(times, anchors):
    """The best anchor's label among `anchors` that ran, and pagedlm's speed against it."""
    ran = [a for a in anchors if a in times]
    if not ran:
        return "—", "—"
    best = min(ran, key=times.get)
    return best, f"{times[best] / times['pagedlm']:.2f}x"


class StepClock:
    """Times each step of an LLM, sorted by kind: "decode" when every scheduled sequence
    computes one token, "prefill" when some compute a prompt chunk (mixed with the decodes of
    the others; the scheduler is spied on to tell them apart), "overlapped decode" and
    "overlapped prefill" for the steps of async scheduling (each launches a step and lands the
    one before). Installs itself on llm.

    On a GPU, profile=N also runs steps (after the first 16) under torch.profiler until N of
    each kind are profiled, and sums their kernels' device time: the device's busy time per
    step of each kind, against which the wall time says how much of a step the device waits
    for the host. Profiled steps are left out of the wall times."""

    def __init__(self, llm, profile=0):
        kinds = ("decode", "prefill", "overlapped decode", "overlapped prefill")
        self.times = {name: [] for name in kinds}
        # Per kind, each timed step's (schedule, runner) seconds: the scheduler's, and the runner's
        # (inputs, launches, the wait for the device, sampling); the rest of a step is emission.
        self.parts = {name: [] for name in kinds}
        self.busy = {"decode": [], "prefill": []}  # device busy seconds of each profiled step
        self.kernels = {}  # kind -> the first profiled step's kernel table (most device time first)
        self.profile = profile
        schedule, step, run, kind = llm.scheduler.schedule, llm.step, llm.runner.step, {}
        launch = llm.runner.launch

        def spied_launch(*args):
            start = time.perf_counter()
            flight = launch(*args)
            kind["runner"] = time.perf_counter() - start
            kind["last"] = "overlapped " + kind["last"]
            return flight

        def spied_schedule():
            start = time.perf_counter()
            scheduled, copies = schedule()
            kind["schedule"] = time.perf_counter() - start
            if scheduled:
                kind["last"] = "decode" if all(s.num_new == 1 for s in scheduled) else "prefill"
            return scheduled, copies

        def spied_run(*args):
            start = time.perf_counter()
            emitted = run(*args)
            kind["runner"] = time.perf_counter() - start
            return emitted

        def timed_step():
            if profile and sum(map(len, self.times.values())) >= 16 and not self.profiled_enough():
                return self._profiled(step, kind)
            start = time.perf_counter()
            emitted = step()
            if "last" in kind:
                name = kind.pop("last")
                self.times[name].append(time.perf_counter() - start)
                self.parts[name].append((kind.get("schedule", 0.0), kind.pop("runner", 0.0)))
            return emitted
        self._spied = llm, schedule, step, run, launch
        llm.scheduler.schedule, llm.step, llm.runner.step = spied_schedule, timed_step, spied_run
        llm.runner.launch = spied_launch

    def remove(self):
        """Puts back what the clock spied on: the steps after it are not its to time."""
        llm, schedule, step, run, launch = self._spied
        llm.scheduler.schedule, llm.step, llm.runner.step, llm.runner.launch = schedule, step, run, launch

    def profiled_enough(self):
        return all(len(busy) >= self.profile for busy in self.busy.values())

    def _profiled(self, step, kind):
        import torch
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            emitted = step()
            torch.cuda.synchronize()
        name = kind.pop("last", None)
        if name in self.busy and len(self.busy[name]) < self.profile:
            events = profiler.key_averages()
            self.busy[name].append(sum(e.self_device_time_total for e in events) / 1e6)
            self.kernels.setdefault(name, events.table(sort_by="self_device_time_total", row_limit=16))
        return emitted

    def summary(self):
        """'N decode steps (median X ms, total Y s), M prefill steps (...)', and the profiled
        device busy time per step of each kind where there is one."""
        parts = [f"{len(times)} {name} steps (median {_median(times) * 1e3:.1f} ms, {sum(times):.2f} s in all; "
                 f"{self.split_summary(name)})" for name, times in self.times.items() if times]
        return ", ".join(parts + ([self.busy_summary()] if self.busy_summary() else [])) or "no steps"

    def split_summary(self, kind):
        """'schedule A ms, runner B ms, emission C ms': the median step's parts (the median of
        each part over the steps, and the median wall time less both for emission); for
        overlapped steps 'schedule A ms, launch B ms, landing C ms' (the landing waits for the
        step before and emits its tokens)."""
        schedule, runner = (_median([p[i] for p in self.parts[kind]]) for i in (0, 1))
        rest = "landing" if kind.startswith("overlapped") else "emission"
        return (f"schedule {schedule * 1e3:.2f} ms, {'launch' if rest == 'landing' else 'runner'} "
                f"{runner * 1e3:.2f} ms, {rest} {(self.median(kind) - schedule - runner) * 1e3:.2f} ms")

    def busy_summary(self):
        """'device busy per decode step X ms (median of N profiled), per prefill step ...', or ''."""
        parts = [f"per {name} step {_median(busy) * 1e3:.2f} ms (median of {len(busy)} profiled)"
                 for name, busy in self.busy.items() if busy]
        return "device busy " + ", ".join(parts) if parts else ""

    def median(self, kind):
        return _median(self.times[kind])


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def write_results(text, out=None, append_results=False):
    print(text)
    for path in filter(None, [out, os.path.join(HERE, "RESULTS.md") if append_results else None]):
        with open(path, "a") as f:
            f.write("\n" + text)
