"""rewriter package."""
