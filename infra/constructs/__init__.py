"""Constructs: each owns its resources and the grants on them; stacks only compose them."""
