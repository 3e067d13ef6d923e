"""The routing report: cost/ROI, bias across data groups, load imbalance, explainability, traffic.

    from adaroute.report import ReportRequest, build_report
    build_report(ReportRequest(routed="out/routed-0.5", data=["builtin:heldout"], output="out/report"))
"""

from adaroute.report.build import ReportRequest, build_report
from adaroute.report.measure import Budget

__all__ = ["Budget", "ReportRequest", "build_report"]
