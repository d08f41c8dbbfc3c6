"""Starting runs on clusters: ``ckf submit`` (Ray Jobs API) and ``ckf jobs list|logs|stop|status``.

Ray is imported only when a function talks to a cluster, so importing this package is cheap.
Scripts and cluster definitions live beside the package, in ``launch/`` and ``cluster/``.
"""

from ckf_dist.launch.client import DEFAULT_ADDRESS, LaunchError, connect, resolve_address
from ckf_dist.launch.jobs import job_logs, job_status, list_jobs, stop_job
from ckf_dist.launch.submit import make_submission_id, plan_submission, submit

__all__ = [
    "DEFAULT_ADDRESS", "LaunchError", "connect", "job_logs", "job_status", "list_jobs", "make_submission_id",
    "plan_submission", "resolve_address", "stop_job", "submit",
]
