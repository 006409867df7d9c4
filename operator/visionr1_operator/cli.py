"""`visionr1`: the command line of the project.

    visionr1 validate FILE...   check manifests; one line per problem, naming the field
    visionr1 crd                print the CustomResourceDefinition
    visionr1 plan FILE          the ordered stages with resources, images and artifact URIs
    visionr1 render FILE        the Kubernetes objects the operator creates for each stage
    visionr1 eval --model M --benchmark NAME=FORMAT:SOURCE   score checkpoints on benchmarks

Exit status: 0 success, 1 invalid input, 2 bad usage. Never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
from .crd import render_crd_yaml
from .cluster.jobs import build_stage_objects
from .cluster.naming import Owner
from .manifest import ManifestError, load_run, load_runs
from .plan import DEFAULT_TRAINER_IMAGE, StagePlan, build_plan


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _print_problems(exc: ManifestError, err: Console | None = None) -> None:
    """One line per problem, each naming the file and the field."""
    err = err or _stderr()
    for line in exc.lines():
        err.print(line, markup=False)


def cmd_validate(args: argparse.Namespace) -> int:
    out, err = Console(highlight=False, soft_wrap=True), _stderr()
    failed = False
    for path in args.files:
        try:
            runs = load_runs(path)
        except ManifestError as exc:
            failed = True
            _print_problems(exc, err)
            continue
        for run in runs:
            stages = ", ".join(p.name for p in build_plan(run))
            out.print(f"{path}: valid: VisionR1Run {run.name} ({stages})", markup=False)
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(render_crd_yaml())
    return 0


def _resources_text(plan: StagePlan) -> str:
    r = plan.resources
    parts = [f"{r.nodes} node{'s' if r.nodes > 1 else ''}", f"{r.gpus_per_node} GPU/node"]
    parts += [f"cpu {r.cpu}"] if r.cpu else []
    parts += [f"mem {r.memory}"] if r.memory else []
    return ", ".join(parts)


def _settings_text(plan: StagePlan) -> str:
    c = plan.config
    if plan.kind == "grpo":
        return (f"{c.ptst.max_completion_length} tok x {c.ptst.num_generations} gens, "
                f"{c.ptst.steps} steps, from {c.init_uri or 'base model'}")
    if plan.kind == "sft":
        return f"{c.sft.epochs:g} epochs, lr {c.sft.learning_rate:g}, data {c.data_uri or c.data.source}"
    if plan.kind == "bridge":
        return (f"{c.bridge.multimodal_model.backend}:{c.bridge.multimodal_model.model or '-'} + "
                f"{c.bridge.reasoning_model.backend}:{c.bridge.reasoning_model.model or '-'}, "
                f"source {c.source.source}")
    return f"{', '.join(b.name for b in c.benchmarks)} on {', '.join(c.models)}"


def plan_document(plans: list[StagePlan]) -> list[dict]:
    """The plan as plain data (``-o json`` / ``-o yaml``)."""
    return [
        {
            "name": p.name,
            "kind": p.kind,
            "image": p.image,
            "resources": p.resources.model_dump(mode="json", exclude_none=True),
            "backoffLimit": p.backoff_limit,
            "outputUri": p.output_uri,
            "config": p.config_json(),
        }
        for p in plans
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.file)
    except ManifestError as exc:
        _print_problems(exc)
        return 1
    plans = build_plan(run, default_image=args.image)
    if args.output == "json":
        print(json.dumps(plan_document(plans), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(plan_document(plans), sort_keys=False), end="")
    else:
        table = Table(title=f"VisionR1Run {run.namespace}/{run.name}: {len(plans)} stages", title_justify="left")
        for col in ("#", "stage", "kind", "image", "resources", "settings", "artifacts"):
            table.add_column(col, overflow="fold")
        for i, p in enumerate(plans, start=1):
            table.add_row(str(i), p.name, p.kind, p.image, _resources_text(p), _settings_text(p), p.output_uri)
        Console(width=max(160, Console().width)).print(table)
    return 0


def render_objects(run, default_image: str = DEFAULT_TRAINER_IMAGE) -> list[dict]:
    """What the operator creates for each stage's first attempt, stage by stage: its
    ConfigMap, a headless Service for a multi-node stage, its Job (the same builder the
    operator calls). The owner reference to the run is left out: it needs the run's uid,
    which only the API server assigns."""
    owner = Owner(run.name, run.namespace, uid="")
    objects = []
    for plan in build_plan(run, default_image=default_image):
        for obj in build_stage_objects(owner, run.spec, plan, 1, suspend=bool(run.spec.queue_name)):
            obj["metadata"].pop("ownerReferences", None)
            objects.append(obj)
    return objects


def cmd_render(args: argparse.Namespace) -> int:
    try:
        runs = load_runs(args.file)
    except ManifestError as exc:
        _print_problems(exc)
        return 1
    docs = []
    for run in runs:
        for obj in render_objects(run, args.image):
            source = f"# Source: {run.namespace}/{run.name} {obj['kind']} {obj['metadata']['name']}\n"
            docs.append(source + yaml.safe_dump(obj, sort_keys=False))
    print("---\n".join(docs), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionr1",
        description="Run the Vision-R1 recipe (bridge, SFT, PTST/GRPO, eval) from one VisionR1Run manifest.",
    )
    parser.add_argument("--version", action="version", version=f"visionr1 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check VisionR1Run manifests")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition YAML")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("plan", help="show the ordered stages of a run")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("--image", default=DEFAULT_TRAINER_IMAGE, help="default trainer image")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("render", help="print the Kubernetes objects the operator creates for each stage (like helm template)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--image", default=DEFAULT_TRAINER_IMAGE, help="default trainer image (the operator's --trainer-image)")
    p.set_defaults(func=cmd_render)

    from . import cli_local

    cli_local.register(sub)

    from . import cli_eval

    cli_eval.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `visionr1 crd | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
