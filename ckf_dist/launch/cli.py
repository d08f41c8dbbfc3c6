"""The ``ckf submit`` and ``ckf jobs`` subcommands; ``ckf_dist.cli`` calls :func:`add_cli`.

    ckf submit CONFIG [--set KEY=VALUE ...] --address http://HEAD:8265 [--env NAME ...]
    ckf jobs list   [--address URL]
    ckf jobs logs   ID [--follow] [--tail N] [--address URL]
    ckf jobs stop   ID [--no-wait] [--address URL]
    ckf jobs status ID [--address URL]

The address defaults to $RAY_API_SERVER_ADDRESS, then an http:// $RAY_ADDRESS, then
http://127.0.0.1:8265; an explicit --address always wins over the environment.
"""

from __future__ import annotations

import argparse
import functools
import sys

from ckf_dist.launch.client import DEFAULT_ADDRESS

_ADDRESS_HELP = (f"Ray Jobs API (dashboard) URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                 f"an http:// $RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def _user_errors(fn):
    """Turn errors a user can fix into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        from ckf_dist.errors import CKFError

        try:
            return int(fn(args) or 0)
        except CKFError as exc:
            print(f"ckf: error: {exc}", file=sys.stderr)
            return 2

    return wrapper


@_user_errors
def cmd_submit(args) -> int:
    from ckf_dist.launch.submit import submit

    return submit(
        args.config, args.address, args.overrides,
        follow=not args.no_follow, tail_lines=args.tail_lines, progress=not getattr(args, "quiet", False),
        command=args.command_name, working_dir=args.working_dir, runtime_env_file=args.runtime_env,
        env_names=args.env, excludes=args.exclude, pip=args.pip, image_uri=args.image_uri,
        ship_package=args.ship_package, entrypoint=args.entrypoint, python=args.python,
        submission_id=args.submission_id, local_cluster=args.local_cluster,
    )


@_user_errors
def cmd_jobs_list(args) -> int:
    from ckf_dist.launch.jobs import format_jobs, list_jobs

    rows = list_jobs(args.address)
    print(format_jobs(rows) if rows else "no submitted jobs")
    return 0


@_user_errors
def cmd_jobs_logs(args) -> int:
    from ckf_dist.launch.jobs import job_logs

    return job_logs(args.address, args.job_id, follow=args.follow, tail=args.tail)


@_user_errors
def cmd_jobs_stop(args) -> int:
    from ckf_dist.launch.jobs import stop_job

    return stop_job(args.address, args.job_id, wait=not args.no_wait)


@_user_errors
def cmd_jobs_status(args) -> int:
    from ckf_dist.launch.jobs import job_status

    status, code = job_status(args.address, args.job_id)
    print(status)
    return 0 if code is None else code


def add_cli(subparsers) -> None:
    """Register ``submit`` and ``jobs list|logs|stop|status`` on an argparse subparsers object."""
    _add_submit(subparsers)
    _add_jobs(subparsers)


def _add_submit(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="run `ckf train CONFIG` on a Ray cluster through the Jobs API and follow it",
        description="Upload the working dir (data, checkpoints, venvs and secret files excluded), submit "
        "`python -m ckf_dist.cli train CONFIG --set ...` as a Ray job, follow its log and exit with the "
        "job's status (0 when it SUCCEEDED). Credentials are never read from the config: pass them from "
        "your environment by name with --env, or give the cluster its own identity.",
    )
    p.add_argument("config", help="YAML run config (inside the uploaded working dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, passed to the job's `ckf train` (repeatable)")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable from your shell to the job, by name only, e.g. "
                   "--env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY (repeatable; values are masked in output)")
    p.add_argument("--runtime-env", default=None, metavar="YAML",
                   help="base runtime_env file, e.g. cluster/runtime_env.yaml (no credentials allowed in it)")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="folder to upload (default: the ckf-dist project holding CONFIG, else CONFIG's folder)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="extra gitignore-style pattern to leave out of the upload (repeatable)")
    env = p.add_mutually_exclusive_group()
    env.add_argument("--pip", default=None, metavar="REQUIREMENTS",
                     help="pinned requirements file installed for the job (e.g. cluster/requirements-gpu.txt)")
    env.add_argument("--image-uri", default=None, metavar="IMAGE",
                     help="container image the job runs in (Ray's image_uri runtime_env; needs podman on nodes)")
    p.add_argument("--ship-package", action="store_true",
                   help="also upload the local ckf_dist package (for clusters whose image lacks it)")
    p.add_argument("--command", dest="command_name", default="train", choices=["train", "prepare"],
                   help="the ckf command the job runs with CONFIG (default: train)")
    p.add_argument("--entrypoint", default=None, metavar="CMD",
                   help="advanced: a shell command to run instead of `ckf COMMAND CONFIG` (the config is still "
                   "validated and uploaded)")
    p.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    p.add_argument("--submission-id", default=None,
                   help="job id (default: the run name plus a short random suffix)")
    p.add_argument("--local-cluster", action="store_true",
                   help="the cluster runs on this machine: make the config's relative paths (data.output, "
                   "train.storage, ...) absolute against the current directory so the job finds them")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return once submitted")
    p.add_argument("--tail-lines", type=int, default=50, metavar="N",
                   help="log lines printed again when the job fails (default: 50)")
    p.set_defaults(func=cmd_submit)


def _add_jobs(subparsers) -> None:
    jobs = subparsers.add_parser("jobs", help="list, follow and stop jobs on a Ray cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="list|logs|stop|status")
    jsub.required = True

    q = jsub.add_parser("list", help="submitted jobs, newest first")
    q.add_argument("--address", default=None, help=_ADDRESS_HELP)
    q.set_defaults(func=cmd_jobs_list)

    q = jsub.add_parser("logs", help="print a job's log (secrets of your environment masked)")
    q.add_argument("job_id", help="submission id (see `ckf jobs list`)")
    q.add_argument("--address", default=None, help=_ADDRESS_HELP)
    q.add_argument("-f", "--follow", action="store_true", help="stream until the job ends; exit with its status")
    q.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines")
    q.set_defaults(func=cmd_jobs_logs)

    q = jsub.add_parser("stop", help="stop a running job")
    q.add_argument("job_id", help="submission id (see `ckf jobs list`)")
    q.add_argument("--address", default=None, help=_ADDRESS_HELP)
    q.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    q.set_defaults(func=cmd_jobs_stop)

    q = jsub.add_parser("status", help="print a job's status; exit with its exit status once it has ended")
    q.add_argument("job_id", help="submission id (see `ckf jobs list`)")
    q.add_argument("--address", default=None, help=_ADDRESS_HELP)
    q.set_defaults(func=cmd_jobs_status)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m ckf_dist.launch.cli``) with only these subcommands."""
    parser = argparse.ArgumentParser(prog="ckf")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
