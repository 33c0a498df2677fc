"""Strata: gateway, router, semantic cache and inference services."""
