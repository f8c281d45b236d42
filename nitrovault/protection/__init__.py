"""Protection of a served model against stealing: output hardening, calibrated noise with per-subject
privacy budgets, and extraction detection. Pure cores (numpy, scipy); the serving layer applies them
(see ``docs/model-stealing.md``)."""

from nitrovault.protection.extraction import (
    Action,
    Decision,
    ExtractionMonitor,
    ExtractionPolicy,
    PradaDetector,
    PradaResult,
)
from nitrovault.protection.hardening import HardeningPolicy
from nitrovault.protection.privacy import BudgetPolicy, BudgetState, PrivacyBudget, PrivacyMechanism

__all__ = [
    "Action",
    "BudgetPolicy",
    "BudgetState",
    "Decision",
    "ExtractionMonitor",
    "ExtractionPolicy",
    "HardeningPolicy",
    "PradaDetector",
    "PradaResult",
    "PrivacyBudget",
    "PrivacyMechanism",
]
