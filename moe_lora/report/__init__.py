"""Reports: results.json + routing.jsonl files -> tables (markdown, CSV, LaTeX) and PNG plots."""

from moe_lora.report.build import build_report

__all__ = ["build_report"]
