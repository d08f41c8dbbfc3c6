"""The ``ckf`` command line. Each subcommand parses its arguments and calls the library.

    ckf config show CONFIG [--set KEY=VALUE ...]
    ckf prepare CONFIG [--set ...] [--overwrite]
    ckf train CONFIG [--set ...]
    ckf consolidate CKPT_URL --out DIR
    ckf evaluate RUN_DIR_OR_CKPT --config CONFIG [--set ...]
    ckf study CONFIG [--set ...]      train + evaluate the ablation grid of study.variants
    ckf demo [CONFIG]                 prepare -> train -> consolidate -> evaluate
    ckf plan CONFIG... [--gpus N --gpu-memory GiB]   memory per GPU, the largest micro-batch
    ckf submit CONFIG --address http://HEAD:8265   /   ckf jobs list|logs|stop
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DEMO_CONFIG = "configs/demo-cpu.yaml"


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML run config (see configs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by its dotted key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _load(args):
    from ckf_dist.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> int:
    from ckf_dist.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_prepare(args) -> int:
    from ckf_dist.config import load_config
    from ckf_dist.stages.prepare import run_prepare

    overrides = list(args.overrides or [])
    if args.address is not None:           # before the user's --set, which may still change them
        overrides = ["data.engine=ray", f"data.ray_address={args.address}"] + overrides
    run_prepare(load_config(args.config, overrides), overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    from ckf_dist.stages.train import run_train

    result = run_train(_load(args), progress=not args.quiet)
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_consolidate(args) -> int:
    from ckf_dist.stages.consolidate import consolidate

    out = consolidate(args.checkpoint, args.out, progress=not args.quiet, verify=args.verify,
                      with_backbone=args.with_backbone)
    print(f"consolidated into {out}")
    return 0


def cmd_study(args) -> int:
    from ckf_dist.stages.study import run_study

    run_study(_load(args), progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from ckf_dist.stages.evaluate import run_evaluate

    run_evaluate(_load(args), args.run, out_dir=args.out, progress=not args.quiet, compare=args.compare)
    return 0


def cmd_demo(args) -> int:
    from ckf_dist.stages.demo import run_demo

    return run_demo(args.config or DEFAULT_DEMO_CONFIG, args.overrides)


def cmd_plan(args) -> int:
    from ckf_dist.stages.plan import run_plan

    run_plan(args.configs, args.overrides, args.gpus, args.gpu_memory, args.length, args.mfu, args.peak_tflops)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckf",
        description="Train CKF adapters (CF-fused prompts + Multi-LoRA) for LLM multi-task recommendation "
        "on a Ray + DeepSpeed cluster.",
        epilog="Start with: ckf demo   (MovieLens-100k + SmolLM2-135M on this machine's CPUs)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="show")
    csub.required = True
    show = csub.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("prepare", help="raw log -> CF embeddings + pre-tokenized Arrow shards on any fsspec URL")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset at data.output")
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="prepare on this Ray cluster: parsing, k-core, split, samples, prompt rows and shards "
                        "(sets data.engine=ray and data.ray_address; data.ray_workers actors, default 2)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="run the Ray Train + DeepSpeed job; checkpoints go to train.storage")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("consolidate", help="committed checkpoint -> bridge.safetensors + one peft adapter per task")
    p.add_argument("checkpoint", help="checkpoint URL (a run folder picks its latest committed checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--verify", action="store_true",
                   help="sha256 every file of the checkpoint (ZeRO shards, resume state), not only those read")
    p.add_argument("--with-backbone", action="store_true",
                   help="copy the frozen backbone and its tokenizer into OUT/backbone and have the adapters name "
                        "it there (relative to OUT), so the folder loads on a machine without this run's cache")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("evaluate", help="score the test split of every task; table vs baselines, JSON, PNG")
    p.add_argument("run", help="a consolidated folder or a checkpoint URL")
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="", help="output folder (default: eval.output)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="other runs (consolidated folders or checkpoint URLs) trained on the same dataset, e.g. "
                        "one with model.bridge.use_cf_slots=false: each becomes a column on the same rows")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("study", help="train and evaluate the ablation grid of study.variants; one table, same rows",
                       description="Train every variant declared under study.variants (name -> KEY=VALUE overrides) one "
                                   "after another on one prepared dataset, then evaluate them together on the same test "
                                   "rows with paired 95% intervals. A rerun skips finished variants.")
    _add_config_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="prepare -> train -> consolidate -> evaluate on the embedded default")
    _add_config_args(p, required=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plan", help="memory per GPU by component and the largest micro-batch that fits, per config",
                       description="Predict what a run needs per GPU before renting any: exact parameter counts (the "
                                   "model built on the meta device from the backbone's config.json, or the preset's "
                                   "known architecture), frozen and trainable weights, gradients, AdamW state and ZeRO "
                                   "buffers for the ZeRO stage, activations with and without gradient checkpointing "
                                   "at the config's micro-batch and length, and the largest micro-batch that fits.")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML run config(s), e.g. configs/*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every config (repeatable)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (one worker each; default: train.num_workers)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory of one GPU (default 80)")
    p.add_argument("--length", type=int, default=None, metavar="TOKENS",
                   help="tokens per row (default data.max_length, the longest a micro-batch can pad to)")
    p.add_argument("--mfu", type=float, default=None, help="with --peak-tflops: predict tokens/s at this MFU")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak of one GPU in the config's dtype")
    p.set_defaults(func=cmd_plan)

    from ckf_dist.launch.cli import add_cli   # argparse only: ray loads when a command talks to a cluster

    add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ckf`` console script: a :class:`CKFError` is one line on stderr, status 2."""
    from ckf_dist.errors import CKFError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CKFError as exc:
        print(f"ckf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckf: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ckf_dist.stages.failures import as_user_error

        error = as_user_error(exc)
        if error is None:
            raise                                  # a bug: keep its traceback
        print(f"ckf: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
