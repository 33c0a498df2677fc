"""The gateway's request pipeline, one stage a module, over services.gateway.types (no protobuf, no grpc):
admit (auth, then validation, guardrails and limits) → cache (lookup, replay) → route (the router's
stream) → settle (usage, limits reconciled, token metrics, cache store). services.gateway.service runs them."""
