"""Ray at the orchestration layer: analyzers as tasks over step ranges of a run."""

from dynatrack.parallel.analyze import analyze_and_report, analyze_run, write_analysis
from dynatrack.parallel.cluster import ClusterError, ray_session
from dynatrack.parallel.tasks import AnalyzeConfig

__all__ = ["AnalyzeConfig", "ClusterError", "analyze_and_report", "analyze_run", "ray_session", "write_analysis"]
