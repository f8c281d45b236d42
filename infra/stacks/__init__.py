"""Stacks: compose the constructs of :mod:`infra.constructs`; no resource is defined here directly."""
