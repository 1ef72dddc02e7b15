"""`mnist-client` admin subcommands: steer which versions serve, through mnist.v1.Admin.

    mnist-client rescan
    mnist-client set-current mnist 6        # roll back to 6 (0 returns to the policy)
    mnist-client set-label mnist stable 6   # move a label (version 0 removes it)
    mnist-client load mnist 5 / unload mnist 5

The token comes from --admin-token or MNIST_ADMIN_TOKEN (the environment keeps it out of
shell history and `ps`); --admin-target reaches an admin service on its own port. Each
command prints the model's status after the change (or JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from mnist_client.client import ClientError
from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb

TOKEN_ENV = "MNIST_ADMIN_TOKEN"


def _channel(args: argparse.Namespace) -> grpc.Channel:
    target = args.admin_target or args.target
    if not (args.tls or args.tls_ca):
        return grpc.insecure_channel(target)
    files = [
        Path(p).read_bytes() if p else None for p in (args.tls_ca, args.tls_key, args.tls_cert)
    ]
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(*files), options=options)


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    token = args.admin_token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ClientError(f"admin commands need --admin-token or {TOKEN_ENV}")
    with _channel(args) as channel:
        stub = apb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        try:
            return getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=args.timeout_s
            )
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or code.name
            if code == grpc.StatusCode.UNIMPLEMENTED:
                details = "the server has no admin service here (--admin-enabled? --admin-port?)"
            raise ClientError(f"{method}: {code.name}: {details}", code) from None


def format_status(m: apb.AdminModelStatus) -> list[str]:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"
    pinned = " (pinned by admin)" if m.current_pinned else ""
    lines = [
        f"{m.name}  current {m.current_version or '-'}{pinned}  policy {m.policy}  "
        f"labels {labels}"
    ]
    if m.canary_version:
        lines.append(f"  canary {m.canary_version} at {m.canary_percent:g}%")
    if m.shadow_version:
        lines.append(f"  shadow {m.shadow_version} (answers compared, never returned)")
    if m.rollout_note:
        lines.append(f"  last rollout event: {m.rollout_note}")
    for v in m.versions:
        state = pb.VersionState.Name(v.state).removeprefix("VERSION_STATE_")
        why = f"  ({v.reason}: {v.detail})" if v.detail else f"  ({v.reason})" if v.reason else ""
        tags = f"  [{', '.join(v.labels)}]" if v.labels else ""
        lines.append(f"  version {v.version}  {state}{tags}{why}")
    return lines


def _print(args: argparse.Namespace, models: list[apb.AdminModelStatus]) -> int:
    if args.json:
        print(json.dumps([MessageToDict(m) for m in models]))
    else:
        for m in models:
            print("\n".join(format_status(m)))
    return 0


def cmd_rescan(args: argparse.Namespace) -> int:
    return _print(args, list(_call(args, "Rescan", apb.AdminRescanRequest()).models))


def cmd_set_current(args: argparse.Namespace) -> int:
    request = apb.AdminSetCurrentVersionRequest(
        model=args.name, version=args.to_version, hold=args.hold
    )
    return _print(args, [_call(args, "SetCurrentVersion", request)])


def cmd_set_label(args: argparse.Namespace) -> int:
    request = apb.AdminSetLabelRequest(
        model=args.name, label=args.label_name, version=args.to_version
    )
    return _print(args, [_call(args, "SetLabel", request)])


def cmd_load(args: argparse.Namespace) -> int:
    request = apb.AdminLoadVersionRequest(model=args.name, version=args.to_version)
    return _print(args, [_call(args, "LoadVersion", request)])


def cmd_unload(args: argparse.Namespace) -> int:
    request = apb.AdminUnloadVersionRequest(model=args.name, version=args.to_version)
    return _print(args, [_call(args, "UnloadVersion", request)])


def cmd_promote(args: argparse.Namespace) -> int:
    request = apb.AdminPromoteVersionRequest(
        model=args.name, version=args.to_version, force=args.force
    )
    return _print(args, [_call(args, "PromoteVersion", request)])


def cmd_canary(args: argparse.Namespace) -> int:
    request = apb.AdminSetCanaryRequest(
        model=args.name, version=args.to_version, percent=args.percent
    )
    return _print(args, [_call(args, "SetCanary", request)])


def cmd_shadow(args: argparse.Namespace) -> int:
    request = apb.AdminSetShadowRequest(model=args.name, version=args.to_version)
    return _print(args, [_call(args, "SetShadow", request)])


def register(
    sub: Any,
    parents: list[argparse.ArgumentParser] | None = None,
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> None:
    """Add the admin subcommands to mnist-client's subparsers (`parents`: options every
    command takes)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin-token", default="", help=f"bearer token (default: ${TOKEN_ENV})"
    )
    common.add_argument(
        "--admin-target", default="", help="host:port of the admin service (default: --target)"
    )

    def add(name: str, help_text: str, run: Any, *positional: tuple[str, str, Any]
            ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text,
            parents=[common, *(parents or [])], formatter_class=formatter_class,
        )
        for dest, text, kind in positional:
            metavar = {"name": "MODEL", "label_name": "LABEL", "to_version": "VERSION"}[dest]
            p.add_argument(dest, type=kind, help=text, metavar=metavar)
        p.set_defaults(run=run)
        return p

    model = ("name", "model name", str)
    add("rescan", "admin: rescan the model repository now", cmd_rescan)
    p = add("set-current", "admin: pin the current version (0: back to the policy)",
            cmd_set_current, model, ("to_version", "version to serve by default, or 0", int))
    p.add_argument("--hold", action="store_true",
                   help="newer versions do not lift the pin: they load and wait for a canary "
                   "or promote")
    add("set-label", "admin: point a label at a version (0: remove it)", cmd_set_label,
        model, ("label_name", "label, e.g. stable", str),
        ("to_version", "version, or 0 to remove", int))
    add("load", "admin: load a version and keep it loaded", cmd_load,
        model, ("to_version", "version", int))
    add("unload", "admin: unload a version", cmd_unload, model, ("to_version", "version", int))
    p = add("promote", "admin: make a version current (ends its canary/shadow; a pin)",
            cmd_promote, model, ("to_version", "version", int))
    p.add_argument("--force", action="store_true",
                   help="serve it even though its quality gate rejected it (recorded)")
    p = add("canary", "admin: send a share of default traffic to a version (0: end it)",
            cmd_canary, model, ("to_version", "canary version, or 0 to end the canary", int))
    p.add_argument("--percent", type=float, default=10.0,
                   help="share of requests naming no version, in (0, 100]")
    add("shadow", "admin: copy live traffic to a version, compare, never answer (0: end)",
        cmd_shadow, model, ("to_version", "shadow version, or 0 to end it", int))
