"""Deprecated: the audit's report moved to :mod:`cppo_lightning.audit.report` (this path goes in the next version)."""

import warnings

from cppo_lightning.audit.report import audit_html, audit_markdown, proposed_pools_yaml, write_audit_report

warnings.warn("callbacks.audit_report moved to cppo_lightning.audit.report", DeprecationWarning, stacklevel=2)

__all__ = ["audit_html", "audit_markdown", "proposed_pools_yaml", "write_audit_report"]
