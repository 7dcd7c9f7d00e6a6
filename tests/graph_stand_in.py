"""A stand-in for CUDA-graph capture on the CPU (monkeypatched over engine.cuda_graphs.capture,
the one capture every graph set goes through): "capturing" runs the forward once, and each
replay reruns it into the captured outputs, so the graph sets' buckets, static inputs and
padding run through the CPU kernels' strict input checks."""
import torch


class Replayed:
    """Outputs: the draft chain's tokens, or a forward's (logits, choices)."""

    def __init__(self, forward, output):
        self.forward, self.outputs = forward, output if isinstance(output, tuple) else (output,)

    def replay(self):
        with torch.inference_mode():
            fresh = self.forward()
            for output, value in zip(self.outputs, fresh if isinstance(fresh, tuple) else (fresh,)):
                output.copy_(value)


def replay_eagerly(forward, pool, device):
    output = forward()
    return Replayed(forward, output), output
