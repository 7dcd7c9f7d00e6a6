"""`pagedlm serve [MODEL]`: the OpenAI-compatible server (serving.app) on uvicorn.

add_parser(subparsers) hangs the `serve` command on the top-level pagedlm CLI; main(argv)
runs it alone: `python -m pagedlm.serving.cli --port 8000`.

SIGTERM or Ctrl-C: the listening socket closes, new requests on open connections get 503,
running requests get up to --drain-timeout seconds to finish, then the rest are aborted (their
streams end) and the process exits with status 0. A second Ctrl-C quits at once.
"""
import argparse
import gc
import logging
import signal
import sys
import threading

from pagedlm.cli import HelpFormatter

DEFAULT_DRAIN_TIMEOUT = 30.0


def add_parser(subparsers):
    serve = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)",
        description="Serve a model folder over OpenAI's HTTP API: POST /v1/completions, /v1/chat/completions "
                    "(streaming or not), GET /v1/models, /health, /metrics.",
        formatter_class=HelpFormatter)
    _add_arguments(serve)
    serve.set_defaults(func=run)
    return serve


def _add_arguments(p):
    p.add_argument("model", nargs="?", default=None,
                   help="folder with config.json, *.safetensors, tokenizer.json (default: the code model shipped "
                        "in the package)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: MODEL as given, or 'tiny-code' for the shipped one)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja2 chat template, or a file holding one (default: the folder's tokenizer_config.json "
                        "chat_template, else a plain 'role: content' template)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    engine.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "float", "bfloat16", "float16", "half"),
                        help="weights and activations (auto: bfloat16 on cuda, float32 on cpu)")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
                        help="KV cache element type (auto: the model's dtype; fp8 holds twice the tokens)")
    engine.add_argument("--calculate-kv-scales", action="store_true",
                        help="with an fp8 KV cache: measure its scales from the first prefill")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    engine.add_argument("--num-blocks", type=int, default=None,
                        help="KV-cache blocks (default: --gpu-memory-utilization of free GPU memory; 1 GiB on cpu)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of free GPU memory for the KV cache")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="sequences in a step at most")
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="tokens in a step at most (longer prompts are prefilled in chunks)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + max_tokens at most (default: the model's max_position_embeddings)")
    engine.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--disable-cascade-attn", action=argparse.BooleanOptionalAction, default=True,
                        help="decode reads prefixes that requests share (n > 1, prefix-cache hits) once per row "
                             "(default: True); --no-disable-cascade-attn reads each once per group")
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each step while the one before runs (steps whose requests ask for no logprobs, "
                             "penalties, logit bias or min_tokens; default: on a GPU without speculation or tensor "
                             "parallelism); --no-async-scheduling runs each step to its end first")
    engine.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many GPUs (processes; on cpu: gloo), one rank each")
    engine.add_argument("--seed", type=int, default=0, help="engine seed (requests without a seed draw from it)")
    server = p.add_argument_group("server")
    server.add_argument("--max-waiting", type=int, default=1024,
                        help="requests waiting for admission beyond which new ones get 503 (0: no bound)")
    server.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                        help="seconds running requests get to finish on SIGTERM/Ctrl-C before they are aborted")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's and pagedlm's log level")


def check_extras():
    """MissingExtraError naming `pip install 'pagedlm[serve]'` unless the server's packages are here."""
    from pagedlm._extras import import_extra
    for module in ("fastapi", "uvicorn", "jinja2", "prometheus_client"):
        import_extra(module, "serve", "pagedlm serve")


def build(args):
    """(AsyncLLM, FastAPI app) from parsed arguments."""
    check_extras()
    from pagedlm.serving.app import build_app
    from pagedlm.serving.async_llm import AsyncLLM
    from pagedlm.serving.chat_template import ChatTemplate, load_chat_template

    folder, name = args.model, args.served_model_name
    if folder is None:
        from pagedlm.data import tiny_model
        folder, name = tiny_model("target"), name or "tiny-code"
    engine = AsyncLLM(folder, max_model_len=args.max_model_len, max_waiting=args.max_waiting or None,
                      device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                      calculate_kv_scales=args.calculate_kv_scales, block_size=args.block_size,
                      num_blocks=args.num_blocks,
                      gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                      enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                      disable_cascade_attn=args.disable_cascade_attn, async_scheduling=args.async_scheduling)
    template = ChatTemplate(*load_chat_template(folder, args.chat_template))
    return engine, build_app(engine, served_model_name=name or str(args.model), chat_template=template)


def make_server(engine, app, *, host="127.0.0.1", port=8000, drain_timeout=DEFAULT_DRAIN_TIMEOUT, log_level="info"):
    """A uvicorn.Server that drains the engine on shutdown: new requests get 503, running ones
    get drain_timeout seconds, then are aborted."""
    import uvicorn

    class Server(uvicorn.Server):
        drain_timer = None

        def handle_exit(self, sig, frame):
            engine.start_draining()
            if self.should_exit:  # a second signal: abort now
                engine.abort_all()
            else:
                self.drain_timer = threading.Timer(drain_timeout, engine.abort_all)
                self.drain_timer.daemon = True
                self.drain_timer.start()
            super().handle_exit(sig, frame)

        def run(self, *args, **kwargs):
            try:
                return super().run(*args, **kwargs)
            finally:
                if self.drain_timer is not None:
                    self.drain_timer.cancel()
                    self.drain_timer.join()

        def capture_signals(self):
            return _signals_without_reraise(self)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5,
                            lifespan="off", access_log=log_level == "debug")
    return Server(config)


class _signals_without_reraise:
    """uvicorn re-raises the signal after shutting down (the process then dies by it); a server
    that drained and stopped cleanly exits with status 0 instead."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self.server.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        else:
            self.saved = {}

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def run(args):
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from pagedlm._extras import MissingExtraError
    try:
        engine, app = build(args)
    except (ValueError, FileNotFoundError, MissingExtraError) as e:
        print(f"pagedlm serve: error: {e}", file=sys.stderr)
        return 2
    server = make_server(engine, app, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                         log_level=args.log_level)
    try:
        server.run()
    finally:
        engine.shutdown()
    status = 0 if server.started or server.should_exit else 1
    # The engine, the app and the server refer to one another; collected now, before the
    # interpreter's exit, the compiled block manager goes with them.
    del engine, app, server
    gc.collect()
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pagedlm serve", formatter_class=HelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
