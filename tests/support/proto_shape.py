"""What a compiled .proto declares, as plain data, to compare our files with Triton's.

Imported by the tests (the project's venv) and by the Triton client scripts beside it, which
run in .tools/triton-venv with tritonclient's older protobuf: so it imports nothing else.
"""

from __future__ import annotations

from typing import Any


def _repeated(field: Any) -> bool:
    """protobuf >= 6.31 has is_repeated; older versions only the (now deprecated) label."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def proto_shape(file: Any) -> dict[str, Any]:
    """For a FileDescriptor: its package; each message (nested ones as `Outer.Inner`) with
    each field's [number, type, repeated, message or enum type]; each top-level enum's values;
    each service's RPCs with [input type, output type]."""
    messages: dict[str, Any] = {}

    def walk(descs: Any, prefix: str) -> None:
        for m in descs:
            name = prefix + m.name
            messages[name] = {
                f.name: [f.number, f.type, _repeated(f),
                         f.message_type.full_name if f.message_type else
                         (f.enum_type.full_name if f.enum_type else "")]
                for f in m.fields
            }
            walk(m.nested_types, name + ".")

    walk(file.message_types_by_name.values(), "")
    return {
        "package": file.package,
        "messages": messages,
        "enums": {e.name: {v.name: v.number for v in e.values}
                  for e in file.enum_types_by_name.values()},
        "services": {s.name: {m.name: [m.input_type.full_name, m.output_type.full_name]
                              for m in s.methods}
                     for s in file.services_by_name.values()},
    }
