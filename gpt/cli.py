"""The `gpt` command: use a trained model from the terminal.

    gpt generate  stream a completion of a prompt (argument, --file, or stdin), print tokens/s at the end
    gpt chat      multi-turn chat with a chat model in the terminal (streamed replies, /reset, /exit)
    gpt info      config, parameter count, tokenizer, lineage and size on disk of a model directory
    gpt serve     the web UI + OpenAI-compatible API (gpt/serve/)
    gpt quantize  INT8 / bf16 / fp16 copy of a model directory (gpt/quantize.py)
    gpt export    Hugging Face directory (GPT-2/Llama/Qwen3/Mixtral/Qwen3-MoE, safetensors, tokenizer.json), or a
                  GGUF file for llama.cpp / Ollama / LM Studio (--format gguf, gpt/gguf.py)
    gpt import    a local Hugging Face directory of those architectures → our model directory (gpt/hf_dir.py)

`--checkpoint` defaults to `paths.model` from ./params.yaml (data/model), the train stage's output. `generate`
and `serve` generate through the front door, gpt/generate.py (it checks the sampling values). Every expected failure
is a GptError and ends in one `gpt <command>: error: ...` line naming the file or the value: exit status 2 for bad
usage (a bad flag or sampling value), 1 for anything else; Ctrl-C prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import GptError

if TYPE_CHECKING:
    from gpt.generate import GenerationInputError

EXIT_USAGE, EXIT_FAILURE = 2, 1


class UsageError(GptError, ValueError):
    """A bad command-line value; printed as `gpt <command>: error: ...` with exit status 2."""

    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `gpt <command>: error: ...` line (exit 2) instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The front door (gpt.generate) names a bad sampling value by its field; the command line by its flag.
GENERATE_FLAGS = {"max_new_tokens": "--max-new-tokens/-m", "temperature": "--temperature/-t", "top_k": "--top-k",
                  "top_p": "--top-p", "seed": "--seed", "stop": "--stop", "prompt": "PROMPT"}


def _default_checkpoint(key: str = "model") -> Path:
    """`paths.<key>` from ./params.yaml (validated like every stage does); data/model (data/chat-model for
    `chat_model`) where there is none."""
    from gpt.config import PARAMS_FILE

    fallback = Path("data/chat-model" if key == "chat_model" else "data/model")
    if not PARAMS_FILE.is_file():  # outside the project: the documented default
        return fallback
    from gpt.params import load_params

    return Path(getattr(load_params().paths, key, fallback))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", type=Path, default=None, metavar="DIR",
                   help="model directory (model.safetensors, config.json, tokenizer.model); "
                        "default: paths.model from ./params.yaml (data/model)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice). On a busy machine 1 thread can decode "
                        "faster, INT8 especially (see bench/README.md)")


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="stream a completion to the terminal",
                         description="Stream a completion of PROMPT (or --file, or stdin) token by token; "
                                     "tokens/s goes to stderr at the end.")
    _add_checkpoint(gen)
    gen.add_argument("prompt", nargs="?", help="the prompt text (else --file, else stdin)")
    gen.add_argument("--file", "-f", type=Path, help="read the prompt from this file")
    # sampling values are only parsed here; gpt.generate.SamplingSpec checks them (one rule for every caller)
    gen.add_argument("--max-new-tokens", "-m", type=int, default=100, help="default: 100")
    gen.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (0..2^63-1)")
    gen.add_argument("--num-samples", "-n", type=_positive_int, default=1, help="completions to generate")
    gen.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    gen.add_argument("--no-prompt", action="store_true", help="print only the completion, not the prompt")
    gen.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_threads(gen)


def _add_chat(sub: Any) -> None:
    chat = sub.add_parser("chat", help="chat with a chat model in the terminal",
                          description="Multi-turn chat with a chat model (the sft stage's output): replies stream "
                                      f"as they are generated; {CHAT_HELP}. When the conversation outgrows the "
                                      "context, its oldest exchanges are dropped (with a notice).")
    chat.add_argument("--checkpoint", "-c", type=Path, default=None, metavar="DIR",
                      help="chat model directory; default: paths.chat_model from ./params.yaml (data/chat-model)")
    chat.add_argument("--system", "-s", default=None, help="system prompt (kept across /reset)")
    chat.add_argument("--max-new-tokens", "-m", type=int, default=256, help="longest reply (default: 256)")
    chat.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    chat.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    chat.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default: 0.95)")
    chat.add_argument("--seed", type=int, default=None, help="makes the replies reproducible")
    chat.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    chat.add_argument("--show-thinking", action="store_true",
                      help="print the reply's <think>…</think> reasoning too (default: the answer only)")
    _add_threads(chat)


def _add_info(sub: Any) -> None:
    info = sub.add_parser("info", help="describe a model directory",
                          description="Config, parameter count, tokenizer, lineage and size on disk.")
    _add_checkpoint(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="web UI + OpenAI-compatible API",
                           description="Serve the model over HTTP: web UI at /, OpenAI-style /v1/completions "
                                       "/v1/chat/completions and /v1/models, /health. Requests are decoded together "
                                       "(continuous batching, up to --max-batch) from a bounded FIFO queue.")
    _add_checkpoint(serve)
    from gpt.serve.config import API_KEY_ENV, ServeConfig

    d = ServeConfig()
    serve.add_argument("--host", default=d.host, help=f"bind address (default: {d.host}, this machine only)")
    serve.add_argument("--port", type=int, default=d.port, help=f"default: {d.port}")
    serve.add_argument("--name", default=None, help="model id to show and accept (default: the directory name)")
    serve.add_argument("--max-prompt-tokens", type=_positive_int, default=d.max_prompt_tokens)
    serve.add_argument("--max-tokens", type=_positive_int, default=d.max_tokens, help="largest max_tokens allowed")
    serve.add_argument("--default-max-tokens", type=_positive_int, default=None,
                       help=f"max_tokens of a request that gives none (default: {d.default_max_tokens}, "
                            "or --max-tokens if lower)")
    serve.add_argument("--max-n", type=_positive_int, default=d.max_n, help="largest n allowed")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=d.max_body_bytes)
    serve.add_argument("--max-queue", type=_positive_int, default=d.max_queue,
                       help=f"requests that may wait for the generation worker; more get HTTP 503 + Retry-After "
                            f"(default: {d.max_queue})")
    serve.add_argument("--max-batch", type=_positive_int, default=d.max_batch,
                       help="generations decoded together (continuous batching; one KV-cache slot each); "
                            f"1 = one at a time (default: {d.max_batch})")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset = open)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host header is NAME (repeatable; '*' = any). IP addresses "
                            "and localhost are always accepted; other names are refused (DNS-rebinding guard)")
    serve.add_argument("--max-connections", type=_positive_int, default=d.max_connections,
                       help=f"open connections at most; more are answered 503 (default: {d.max_connections})")
    serve.add_argument("--header-timeout", type=float, default=d.header_timeout,
                       help=f"seconds a client has to send a request's headers (default: {d.header_timeout:g})")
    serve.add_argument("--body-timeout", type=float, default=d.body_timeout,
                       help=f"seconds a client has to send a request's body (default: {d.body_timeout:g})")
    serve.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                       help="on SIGTERM/Ctrl-C, seconds running requests may finish before they are cancelled "
                            f"(default: {d.drain_timeout:g})")
    serve.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_threads(serve)


def _add_conversions(sub: Any) -> None:
    quant = sub.add_parser("quantize", help="INT8 / bf16 / fp16 copy of a model",
                           description="Write a quantized copy of a model directory (safetensors + "
                                       "quantization.json; loads in generate/serve/info).")
    _add_checkpoint(quant)
    quant.add_argument("--dtype", required=True, choices=["int8", "bf16", "fp16"],
                       help="int8: weight-only per-channel INT8 for CPU inference; bf16/fp16: half-size copies")
    quant.add_argument("--out", "-o", type=Path, required=True, help="output directory (must not exist)")

    export = sub.add_parser("export", help="export to a Hugging Face directory or a GGUF file",
                            description="hf: write a directory that transformers' AutoModelForCausalLM and "
                                        "AutoTokenizer load offline, as the transformers architecture that "
                                        "computes the same function (GPT-2, Llama, Qwen3, Mixtral or Qwen3-MoE; "
                                        "presets without one, e.g. moe's shared expert, are refused). "
                                        "gguf: write one .gguf file for llama.cpp / Ollama / LM Studio (gpt2, "
                                        "llama, qwen3 or qwen3moe graph; vocabulary and chat template included).")
    _add_checkpoint(export)
    export.add_argument("--format", required=True, choices=["hf", "gguf"],
                        help="hf: a transformers model directory; gguf: a llama.cpp model file")
    export.add_argument("--out", "-o", type=Path, required=True, help="output directory/file (must not exist)")
    export.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                        help="gguf only: precision of the weight matrices (default f32)")

    imp = sub.add_parser("import", help="import a local Hugging Face model directory",
                         description="Convert a local Hugging Face GPT-2, Llama, Qwen3, Mixtral or Qwen3-MoE "
                                     "directory (config.json, safetensors weights, tokenizer) into a model "
                                     "directory for generate/serve.")
    imp.add_argument("--from", dest="source_format", required=True, choices=["hf"])
    imp.add_argument("source", type=Path, metavar="DIR", help="the Hugging Face model directory")
    imp.add_argument("--out", "-o", type=Path, required=True, help="output model directory (must not exist)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt", description="Use a gpt-pipeline model: generate, inspect, serve, quantize, "
                                             "export to / import from Hugging Face.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_chat, _add_info, _add_serve, _add_conversions):
        add(sub)
    return parser


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give the prompt either as an argument or with --file, not both")
    if args.file is not None:
        if not args.file.is_file():
            raise UsageError(f"--file: prompt file not found: {args.file}")
        try:
            return args.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"--file: {args.file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is not None and not sys.stdin.isatty():
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as err:
            raise UsageError(f"stdin is not UTF-8 text ({err.reason} at byte {err.start})") from None
    raise UsageError("no prompt: give PROMPT, --file FILE, or pipe text on stdin")


def _usage_error(err: GenerationInputError) -> UsageError:
    return UsageError(f"{GENERATE_FLAGS.get(err.field, err.field)}: {err.reason}")


def cmd_generate(args: argparse.Namespace) -> int:
    from gpt.generate import (
        GenerationInputError,
        SamplingSpec,
        encode_prompt,
        make_generator,
        stream_completion,
    )
    from gpt.model_dir import load

    try:  # checked before the model loads: a bad value fails at once
        spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    except GenerationInputError as err:
        raise _usage_error(err) from None
    prompt = _read_prompt(args)
    _check_device(args.device)
    loaded = load(args.checkpoint, device=args.device)
    try:
        encoded = encode_prompt(loaded.tokenizer, prompt, loaded.max_seq_len)
    except GenerationInputError as err:
        raise _usage_error(err) from None
    if encoded.num_dropped:
        print(f"gpt generate: prompt has {encoded.num_tokens} tokens; keeping the last {len(encoded.ids)} "
              "(max_seq_len)", file=sys.stderr)
    gen = make_generator(spec.seed, next(loaded.model.parameters()).device)  # the samples share one sequence
    out = sys.stdout
    total_tokens, total_seconds = 0, 0.0
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1}/{args.num_samples} ---\n")
        if not args.no_prompt:
            out.write(prompt)
        out.flush()
        start = time.perf_counter()
        for delta in stream_completion(loaded.model, loaded.tokenizer, encoded.ids, spec, gen):
            out.write(delta.text)
            out.flush()
            if delta.finish_reason is not None:
                total_tokens += delta.num_tokens
        total_seconds += time.perf_counter() - start
    out.write("\n")
    rate = total_tokens / total_seconds if total_seconds > 0 else float("nan")
    print(f"[{total_tokens} tokens in {total_seconds:.2f} s: {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


CHAT_HELP = "/reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def _chat_reply(loaded: Any, template: Any, prompt_ids: list[int], spec: Any, gen: Any,
                show_thinking: bool = False) -> tuple[str, str]:
    """Stream one assistant turn to stdout; Ctrl-C stops it (finish reason "interrupted"). Returns (text, finish)."""
    from gpt.generate import stream_chat

    pieces, finish = [], "length"
    stream = stream_chat(loaded.model, template, prompt_ids, spec, gen, show_thinking=show_thinking)
    try:
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            pieces.append(delta.text)
            finish = delta.finish_reason or finish
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        stream.close()
    sys.stdout.write("\n")
    return "".join(pieces), finish


def cmd_chat(args: argparse.Namespace) -> int:
    from gpt.chat import ChatTemplate
    from gpt.generate import GenerationInputError, SamplingSpec, make_generator, trim_chat
    from gpt.model_dir import load

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:  # checked before the model loads: a bad value fails at once
        spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    except GenerationInputError as err:
        raise _usage_error(err) from None
    loaded = load(args.checkpoint, device=args.device)
    template = ChatTemplate(loaded.tokenizer)  # a tokenizer without the chat tokens fails here, in one line
    gen = make_generator(spec.seed, next(loaded.model.parameters()).device)
    # room for a reply, but never less than half the context for the conversation
    budget = loaded.max_seq_len - min(spec.max_new_tokens, loaded.max_seq_len // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"chatting with {loaded.name} ({loaded.max_seq_len}-token context); {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D
            sys.stdout.write("\n")
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("[new conversation]", file=sys.stderr)
            continue
        if not line or line.startswith("/"):
            if line:
                print(f"[unknown command {line}: {CHAT_HELP}]", file=sys.stderr)
            continue
        try:
            prompt = trim_chat(template, system + history + [{"role": "user", "content": line}], budget)
        except GenerationInputError as err:
            print(f"gpt chat: error: {err.field}: {err.reason}", file=sys.stderr)
            continue
        if prompt.num_dropped:
            print(f"[history trimmed: the {prompt.num_dropped} oldest messages no longer fit the "
                  f"{loaded.max_seq_len}-token context]", file=sys.stderr)
            history = history[prompt.num_dropped:]
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        reply, finish = _chat_reply(loaded, template, prompt.ids, spec, gen, args.show_thinking)
        if finish == "interrupted":
            print("[reply stopped]", file=sys.stderr)
        elif finish == "length":
            print(f"[reply cut at --max-new-tokens {spec.max_new_tokens}]", file=sys.stderr)
        if reply.strip():  # an empty (stopped) reply leaves the user's message unanswered: forget both
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def _print_info(info: dict[str, Any]) -> None:
    cfg, tok = info["config"], info["tokenizer"]
    print(f"checkpoint   {info['checkpoint']}")
    print(f"parameters   {info['parameters']:,}")
    shape = ", ".join(f"{k}={cfg[k]}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"))
    print(f"config       {shape}")
    variants = ", ".join(f"{k}={cfg[k]}" for k in ("norm", "position", "mlp", "activation", "tie_embeddings")
                         if k in cfg)
    print(f"             {variants}")
    quant = info["quantization"]
    print(f"weights      {quant['dtype'] + ' (' + quant['method'] + ')' if quant else 'fp32'}")
    match = tok.get("matches_lineage")
    check = "" if match is None else ("  (matches lineage)" if match else "  (DOES NOT match lineage!)")
    print(f"tokenizer    {tok['file']}, vocab {tok['vocab_size']}, bos={tok['bos_id']} eos={tok['eos_id']}")
    print(f"             sha256 {tok['sha256']}{check}")
    lineage = info["lineage"]
    if lineage:
        brief = {k: v for k, v in lineage.items() if k != "params"}  # the full params: `gpt info --json`
        for key, value in sorted(brief.items()):
            print(f"lineage      {key}: {json.dumps(value)}")
    else:
        print("lineage      (no lineage.json)")
    print(f"size on disk {info['size_on_disk_bytes'] / 1e6:.2f} MB")
    for name, size in info["files"].items():
        print(f"             {name:24s} {size / 1e6:10.2f} MB")


def cmd_info(args: argparse.Namespace) -> int:
    from gpt.model_dir import describe

    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_info(info)
    return 0


def _check_device(device: str) -> None:
    """A --device torch can use on this machine, or one line saying why not (before any model loads)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from gpt.config import ConfigError
    from gpt.model_dir import load
    from gpt.serve.app import create_app
    from gpt.serve.config import API_KEY_ENV, ServeConfig
    from gpt.serve.engine import no_openmp_pool
    from gpt.serve.server import bind_socket, make_server, serve_on

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        cfg = ServeConfig(host=args.host, port=args.port, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens, max_n=args.max_n,
                          default_max_tokens=args.default_max_tokens
                          or min(args.max_tokens, ServeConfig.default_max_tokens),
                          max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                          api_key=api_key,
                          allowed_hosts=tuple(args.allow_host), max_connections=args.max_connections,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          drain_timeout=args.drain_timeout)
    except ConfigError as err:
        raise UsageError(str(err).replace("serve.", "--").replace("_", "-")) from None
    _check_device(args.device)
    sock = bind_socket(cfg.host, cfg.port)  # a taken port fails now, in one line, before the model loads
    try:
        with no_openmp_pool():  # the decoding thread gets the threads (gpt/serve/engine.py)
            loaded = load(args.checkpoint, device=args.device, name=args.name)
            app = create_app(loaded, cfg)
        server = make_server(app, cfg)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if not _is_loopback(cfg.host) and not cfg.api_key:
            print(f"gpt serve: warning: listening on {cfg.host} without an API key: anyone who can reach port "
                  f"{port} can use this server (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
        print(f"serving {loaded.name} from {loaded.directory} on http://{shown}:{port}/ "
              "(web UI at /, API at /v1)", file=sys.stderr, flush=True)
        serve_on(server, sock)
    finally:
        sock.close()
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gpt.model_dir import save_quantized

    out = save_quantized(args.checkpoint, args.out, args.dtype)
    print(f"wrote {args.dtype} model to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from gpt.gguf import export_gguf

        out = export_gguf(args.checkpoint, args.out, args.dtype or "f32")
        print(f"wrote GGUF model to {out} (llama-cli -m {out} / llama-server -m {out}; README: llama.cpp / Ollama)")
        return 0
    if args.dtype is not None:
        raise UsageError("--dtype is for --format gguf (the hf export keeps the model's precision)")
    from gpt.hf_dir import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"wrote Hugging Face model to {out} (AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gpt.hf_dir import import_hf

    out = import_hf(args.source, args.out)
    print(f"wrote model directory {out} (use: gpt generate --checkpoint {out} ...)")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "serve": cmd_serve, "quantize": cmd_quantize,
            "export": cmd_export, "import": cmd_import}


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "checkpoint", "unset") is None:
        args.checkpoint = _default_checkpoint("chat_model" if args.command == "chat" else "model")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return COMMANDS[args.command](args)


def _idle_cpus(seconds: float = 0.05) -> float | None:
    """How many CPUs sat idle over the next `seconds` (machine-wide, from /proc/stat); None where unknown."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all
    try:
        idle0, all0 = sample()
        time.sleep(seconds)
        idle1, all1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(1, all1 - all0)


def openmp_wait_policy(threads: int | None) -> str | None:
    """The OMP_WAIT_POLICY to decode with: None (libgomp's default: spin a while, then sleep) when the machine has
    an idle core for every thread, "PASSIVE" (sleep at once) when it is busy or unknown. Measured on the 2-core
    box, seed model, 2 threads: idle, PASSIVE costs 25-40% of batch-1 decode speed (each of the ~40 parallel ops
    per token wakes a sleeping thread); busy (load 10), spinning costs 15-25x (1.3-2 vs 25-54 tok/s): a spinning
    thread uses up its time slice and every op then waits for the scheduler (bench/README.md)."""
    idle = _idle_cpus()
    return None if idle is not None and idle >= (threads or os.cpu_count() or 1) - 0.5 else "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad usage: one line, exit 2 (_Parser.error)
    # Before torch loads libgomp (it reads this once); a policy set by the user stays.
    if "OMP_WAIT_POLICY" not in os.environ:
        decodes = args.command in ("generate", "chat", "serve")
        policy = openmp_wait_policy(getattr(args, "threads", None)) if decodes else "PASSIVE"
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy
    where = f"gpt {args.command}"
    try:
        return _run(args)
    except GptError as err:  # every expected failure; UsageError exits 2, the rest 1
        print(f"{where}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted", file=sys.stderr)  # after a half-written line of generated text
        return 130
    except BrokenPipeError:  # e.g. `gpt generate ... | head`: the reader left; not an error
        with contextlib.suppress(OSError):  # no "Exception ignored" when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the system refused (permission denied, disk full): the message names the file
        print(f"{where}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
