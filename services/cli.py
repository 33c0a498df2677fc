"""The `strata` command."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from services.cache.main import add_serve_args as add_cache_serve_args
    from services.gateway.main import add_serve_args as add_gateway_serve_args
    from services.inference.config import add_engine_args
    from services.inference.main import add_serve_args
    from services.router.main import add_serve_args as add_router_serve_args

    parser = argparse.ArgumentParser(prog="strata", description="Strata LLM serving suite")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service")
    serve_sub = serve.add_subparsers(dest="service", required=True)
    add_serve_args(serve_sub.add_parser("inference", help="the model engine over gRPC"))
    add_cache_serve_args(serve_sub.add_parser("cache", help="the semantic cache over Redis"))
    add_router_serve_args(serve_sub.add_parser("router", help="picks an inference replica per request"))
    add_gateway_serve_args(serve_sub.add_parser("gateway", help="API keys, limits, guardrails, cache, usage"))

    from services import up
    from services.console import add_chat_args, add_status_args
    up.add_args(sub.add_parser("up", help="the whole suite on this machine (Redis, inference, cache, router, gateway)",
                               description=up.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_chat_args(sub.add_parser("chat", help="stream an answer through the gateway"))
    add_status_args(sub.add_parser("status", help="health, load, cache and circuit state of a running suite"))

    cache = sub.add_parser("cache", help="semantic cache tools")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    ev = cache_sub.add_parser("eval", help="precision/recall of the hit decision on labelled pairs")
    ev.add_argument("--pairs", required=True, help='JSONL of {"text_a", "text_b", "label"}, or GPTCache\'s '
                    'benchmark JSON (a list of {"origin", "similar"})')
    ev.add_argument("--json", action="store_true", help="print the full report as JSON")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ev.add_argument("--plot", default=None, help="also draw the precision/recall curves into this PNG")
    ev.add_argument("--similarity-threshold", type=float, default=None,
                    help="evaluate plain cosine >= this as the service's decision instead of the classifier")

    from services.inference.models import catalog
    catalog.add_args(sub.add_parser("models", help="the installed models: architecture, size, quantization, file",
                                    description=catalog.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    gen = sub.add_parser("generate", help="offline batch generation over a JSONL file")
    gen.add_argument("--prompts", required=True, help='JSONL: {"prompt": str} or {"messages": [...]} per line')
    gen.add_argument("--output", required=True, help="JSONL written in input order")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    add_engine_args(gen)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.service == "inference":
        from services.inference import main as inference_main
        inference_main.run(args)
    elif args.command == "serve" and args.service == "cache":
        from services.cache import main as cache_main
        cache_main.run(args)
    elif args.command == "serve" and args.service == "gateway":
        from services.gateway import main as gateway_main
        gateway_main.run(args)
    elif args.command == "serve" and args.service == "router":
        from services.router import main as router_main
        router_main.run(args)
    elif args.command == "cache" and args.cache_command == "eval":
        from tools import cache_eval
        cache_eval.run(args)
    elif args.command == "up":
        from services import up
        up.run(args)
    elif args.command == "chat":
        from services import console
        console.chat(args)
    elif args.command == "status":
        from services import console
        console.status(args)
    elif args.command == "models":
        from services.inference.models import catalog
        catalog.run(args)
    elif args.command == "generate":
        from services.inference import offline
        offline.run(args)


if __name__ == "__main__":
    main()
