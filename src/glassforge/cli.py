"""The `glassforge` command: a thin layer over each stage's entry function.

Every subcommand parses its arguments and calls one function; a `UserError`
becomes a one-line message and exit code 2, never a traceback.

Each command imports what it runs inside its own function: importing every
stage (torch, FastAPI, ...) up front made `glassforge --version`, `--help`
and every one-line error take 2.2 s on the reference machine instead of
0.1 s. The imports are still plain imports, so the layers contract and the
cycle check see them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from glassforge import __version__
from glassforge.core.errors import UserError
from glassforge.core.runfolder import TRAINING_STAGES, Run, resolve_release


def _read_text_arg(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _stage(name: str):
    def command(args) -> int:
        from glassforge.build import run_stage

        result = run_stage(Run.open(args.run), name)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result, indent=2, default=str))
        return 0

    return command


def cmd_build(args) -> int:
    from glassforge.build import build

    build(args.recipe, Path(args.out), force=args.force, data_options=_data_options(args))
    return 0


def _data_options(args) -> dict:
    """--executor, --workers, --address as run_data's keyword arguments (absent ones left to the recipe)."""
    return {k: v for k, v in (("executor", args.executor), ("workers", args.workers), ("address", args.address))
            if v is not None}


def cmd_data(args) -> int:
    from glassforge.build import run_stage
    from glassforge.tools.inspect import inspect

    if args.action == "inspect":
        print(inspect(Run.open(args.run), doc=args.doc, token=args.token, step=args.step))
        return 0

    run = Run.open(args.run)
    results = [run_stage(run, "data", **_data_options(args))]
    if run.tokenizer_json.is_file():  # shards need the tokenizer
        results.append(run_stage(run, "shards"))
    print(json.dumps(results, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from glassforge.build import run_stage
    from glassforge.evaluate.stage import run_eval

    run = Run.open(args.run)
    # With --tasks this is an ad-hoc evaluation: it does not mark the build's eval stage as done.
    result = run_eval(run, args.tasks) if args.tasks else run_stage(run, "eval")
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_release(args) -> int:
    from glassforge.build import run_stage

    result = run_stage(Run.open(args.run), "release", sign_key=Path(args.sign_key) if args.sign_key else None)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_sign(args) -> int:
    from glassforge.release.verify import sign_command

    print(json.dumps(sign_command(Path(args.release), Path(args.key)), indent=2))
    return 0


def cmd_prove(args) -> int:
    from glassforge.release.proofs import prove_command

    return prove_command(Path(args.release), args.doc, Path(args.out) if args.out else None)


def cmd_verify_proof(args) -> int:
    from glassforge.release.proofs import verify_proof_command

    return verify_proof_command(args.proof, Path(args.release) if args.release else None, args.root, args.text)


def cmd_export(args) -> int:
    from glassforge.release.export import export_gguf

    print(json.dumps(export_gguf(resolve_release(args.release), Path(args.out), dtype=args.dtype), indent=2,
                     default=str))
    return 0


def cmd_verify(args) -> int:
    from glassforge.release.verify import verify_command

    # Not resolve_release: a release whose weights were deleted must still get its FAIL lines.
    data = args.data if args.data is True else (Path(args.data) if args.data else False)
    return verify_command(Path(args.release), args.replay, data, Path(args.public_key) if args.public_key else None,
                          samples=args.samples, seed=args.seed, threads=args.threads)


def cmd_generate(args) -> int:
    from glassforge.serve.generate import generate

    print(generate(args.run, _read_text_arg(args.prompt), args.max_tokens, args.temperature, args.seed, chat=args.chat))
    return 0


def cmd_serve(args) -> int:
    from glassforge.serve.limits import FLAGS, Limits

    limits = Limits(**{name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})
    from glassforge.serve.app import serve  # after the limits: a bad one fails before torch is imported
    serve(args.run, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("GLASSFORGE_API_KEY"),
          max_batch=args.max_batch, max_context=args.max_context, banner=args.banner,
          decode_weights=args.decode_weights, stream_interval_ms=args.stream_interval_ms, limits=limits,
          allowed_hosts=args.allowed_host, prefix_cache=False if args.no_prefix_cache else None)
    return 0


def cmd_chat(args) -> int:
    from glassforge.serve.chat import chat

    chat(args.run, temperature=args.temperature, max_tokens=args.max_tokens)
    return 0


def cmd_trace(args) -> int:
    from glassforge.release.trace import trace_command

    return trace_command(args.run, _read_text_arg(args.text), as_json=args.json, min_tokens=args.min_tokens)


def cmd_contains(args) -> int:
    from glassforge.release.trace import contains_command

    return contains_command(args.run, _read_text_arg(args.text), as_json=args.json)


def cmd_report(args) -> int:
    from glassforge.tools.report import write_report

    print(write_report(Path(args.run), Path(args.out) if args.out else None))
    return 0


def cmd_plot(args) -> int:
    from glassforge.train.metrics import plot_metrics

    run = Run.open(args.run)
    for stage in TRAINING_STAGES:
        png = plot_metrics(run.metrics(stage), run.loss_plot(stage), title=stage)
        if png:
            print(png)
    return 0


def _executor_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the data stage runs (the same bytes on each; default: the recipe's [data])")
    g.add_argument("--executor", choices=["inprocess", "processes", "ray"], help="data.executor")
    g.add_argument("--workers", type=int, help="data.workers: processes or Ray CPUs (0: every core)")
    g.add_argument("--address", help="data.ray_address: host:port of a running Ray cluster")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glassforge", description="Open data to a served chat model, every step checkable.")
    p.add_argument("--version", action="version", version=f"glassforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="run every stage of a recipe into a run folder, skipping finished ones")
    b.add_argument("--recipe", default="default", help="a built-in recipe name (tiny, default, ...) or a .toml path")
    b.add_argument("--out", required=True, help="the run folder")
    b.add_argument("--force", action="store_true", help="re-run every stage even if its inputs are unchanged")
    _executor_arguments(b)
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("data", help="collect, clean and deduplicate the documents (or inspect them)")
    d.add_argument("action", nargs="?", choices=["inspect"], help="inspect: show a document, token or step")
    d.add_argument("run")
    d.add_argument("--doc", help="a document id, or its name (pystdlib:json.dumps, files:a.jsonl#L7)")
    d.add_argument("--token", type=int, help="a position in the training token stream")
    d.add_argument("--step", type=int, help="a training step: the documents in its batch")
    _executor_arguments(d)
    d.set_defaults(func=cmd_data)

    for name, help_ in [("tokenizer", "train the byte-level BPE tokenizer"),
                        ("shards", "tokenize the documents into memory-mapped shards"),
                        ("pretrain", "pretrain the base model (resumes; torchrun for several processes)"),
                        ("sft", "fine-tune the base model on conversations"),
                        ("rl", "reinforcement learning from the fine-tuned model, rewards checked against the "
                               "training documents (the recipe's [rl] section)"),
                        ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("run")
        s.set_defaults(func=_stage(name))

    e = sub.add_parser("eval", help="evaluate the model into eval/eval.json")
    e.add_argument("run")
    e.add_argument("--tasks", help="comma-separated tasks: val-loss, pystdlib-docmatch, or .jsonl paths "
                                   "(default: the recipe's)")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("release", help="assemble release/: weights, config, tokenizer, cards, manifest, attestation")
    r.add_argument("run")
    r.add_argument("--sign-key", metavar="KEY", help="an ECDSA P-256 private key (PEM) to sign the release with "
                                                     "(OpenSSF Model Signing: model.sig over every file)")
    r.set_defaults(func=cmd_release)

    sg = sub.add_parser("sign", help="sign a finished release with OpenSSF Model Signing (model.sig over every file)")
    sg.add_argument("release", help="a release folder or its run folder")
    sg.add_argument("--key", required=True, help="an ECDSA P-256 private key (PEM); make one with: openssl genpkey "
                                                 "-algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem")
    sg.set_defaults(func=cmd_sign)

    pr = sub.add_parser("prove", help="an RFC 9162 inclusion proof that a document is in the attested training data")
    pr.add_argument("release", help="a release folder or its run folder")
    pr.add_argument("--doc", required=True, help="the document id (a row of data/documents.parquet)")
    pr.add_argument("--out", help="write the proof (JSON) to this file instead of printing it")
    pr.set_defaults(func=cmd_prove)

    vp = sub.add_parser("verify-proof", help="check an inclusion proof offline (PASS/FAIL per claim)")
    vp.add_argument("proof", help="the proof file glassforge prove wrote, or - for stdin")
    against = vp.add_mutually_exclusive_group(required=True)
    against.add_argument("--release", help="check against this release's attested roots and its data pack's text")
    against.add_argument("--root", help="check against this Merkle root (hex) that you trust; needs --text")
    vp.add_argument("--text", help="the document's text, byte for byte (a file, or - for stdin); with --release, "
                                   "instead of the data pack's")
    vp.set_defaults(func=cmd_verify_proof)

    x = sub.add_parser("export", help="export a release to another format (GGUF for llama.cpp)")
    x.add_argument("release", help="a release folder or its run folder")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--out", required=True, help="the file to write")
    x.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32",
                   help="storage of the weight matrices (norms stay f32); q8_0 matches the server's int8 decode")
    x.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check a release's hashes and attestation (PASS/FAIL per claim)")
    v.add_argument("release", help="a release folder or its run folder")
    v.add_argument("--data", nargs="?", const=True, default=False, metavar="RUN",
                   help="check the training documents the release carries (hashes, Merkle roots, order); "
                        "with RUN, a run folder's documents instead")
    v.add_argument("--replay", nargs="?", const="last", choices=("last", "all", "sample"),
                   help="re-train from the release's data and compare with the attested checkpoints: each stage's "
                        "last interval (last, the default), every interval (all), or --samples intervals drawn "
                        "with --seed (sample)")
    v.add_argument("--samples", type=int, default=2, metavar="K", help="intervals to draw with --replay sample")
    v.add_argument("--seed", type=int, help="the seed --replay sample draws with (default: a fresh one, printed)")
    v.add_argument("--threads", type=int, help="replay with this many threads instead of the recorded count "
                                               "(the bits then differ: a tolerance verdict)")
    v.add_argument("--public-key", help="the ECDSA public key (PEM) the release must be signed with (default: check "
                                        "with the key it ships, which shows it is whole but not who signed it)")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("generate", help="continue a prompt with the model")
    g.add_argument("run", help="a run folder or its release/")
    g.add_argument("--prompt", required=True, help="the prompt, or - for stdin")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="treat the prompt as a user message and answer it")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible API (and the web chat)")
    s.add_argument("run", help="a run folder or its release/")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require this bearer key (default: $GLASSFORGE_API_KEY, else none)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-context", type=int, help="tokens per sequence (default: the model's)")
    s.add_argument("--decode-weights", choices=("int8", "bf16", "f32"),
                   help="precision of the weights in decode steps (default: int8, or $GLASSFORGE_DECODE_WEIGHTS; "
                        "prompts are always scored in f32)")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (default: a prompt that begins as an earlier one reuses that "
                        "beginning's keys and values; $GLASSFORGE_PREFIX_CACHE=0 also turns it off)")
    s.add_argument("--stream-interval-ms", type=float,
                   help="send a stream's tokens at most this often, its first and last at once (default: 10, "
                        "or $GLASSFORGE_STREAM_INTERVAL_MS; 0: after every decode step)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (repeatable; '*': any). Loopback names, IP "
                        "addresses and the --host name always are; any other Host gets 403 (DNS rebinding)")
    from glassforge.serve.limits import FLAGS, HELP, Limits  # no heavy imports: --help stays fast

    for name, flag in FLAGS.items():
        default = getattr(Limits, name)
        s.add_argument(flag, dest=name, type=type(default), metavar="N", help=f"{HELP[name]} (default: {default})")
    s.add_argument("--banner", action="store_true", help="print how to talk to the server")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="a streaming chat in the terminal")
    c.add_argument("run")
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--max-tokens", type=int, default=256)
    c.set_defaults(func=cmd_chat)

    t = sub.add_parser("trace", help="find the training documents that contain spans of a text")
    t.add_argument("run")
    t.add_argument("text", help="the text, or - for stdin")
    t.add_argument("--json", action="store_true")
    t.add_argument("--min-tokens", type=int, default=8)
    t.set_defaults(func=cmd_trace)

    ct = sub.add_parser("contains", help="count the training documents that contain a text verbatim")
    ct.add_argument("run")
    ct.add_argument("text", help="the text, or - for stdin")
    ct.add_argument("--json", action="store_true")
    ct.set_defaults(func=cmd_contains)

    rp = sub.add_parser("report", help="write one self-contained HTML report of a run (curves, data, eval, attestation)")
    rp.add_argument("run", help="a run folder (or a release folder)")
    rp.add_argument("--out", help="the HTML file to write (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report)

    pl = sub.add_parser("plot", help="redraw loss.png for the run's training stages")
    pl.add_argument("run")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"glassforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glassforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
