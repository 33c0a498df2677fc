"""Offline commands: they measure or fit what the services use, and serve nothing.

    cache_eval.py            `strata cache eval`: precision and recall of the cache's hit decision
    train_cache_decision.py  `python -m tools.train_cache_decision`: fits services/cache/hit_model.json
    cache_pairs.py           labelled question pairs and the retrieval protocol both of the above share
    guardrails_eval.py       the guardrails' rates on labelled corpora (tests, `python -m bench.guardrails`)
    calibrate_injection.py   `python -m tools.calibrate_injection`: how the injection similarity threshold was chosen
    perplexity.py            a model's perplexity on a text, one pass or in decode-sized steps (the precision
                             modes' quality checks)

Tools import the services' pieces; no service imports a tool (only the `strata` CLI, services/cli.py,
dispatches `cache eval` here).
"""
