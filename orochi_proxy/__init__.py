"""orochi_proxy package."""
