"""An adversarial corpus of broken model versions, each built the way it could really arrive.

Every case is a builder that puts one damaged version (or a badly named version directory)
into a model directory and returns the path it created, plus the reason codes the loader
must report for it. Damage is applied to a valid version (tiny 784-8-10 models, so loading
takes milliseconds) and, unless the checksum is the defect, the checksum is recomputed, so
the defect under test is the one the loader must catch rather than a checksum mismatch.

Groups: the zip container, the .npy headers, the arrays, the metadata, the checksum file,
file types, directory names. `tests/test_loader_corpus.py` runs them against a real server.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model import CHECKSUM_FILE, WEIGHTS_FILE, save_model
from support.versions_util import tiny_model


@dataclass(frozen=True)
class Ctx:
    """Where a case may put things: `outside` is a directory outside the repository."""

    repo: Path
    outside: Path


Builder = Callable[[Ctx, Path, int], Path]


@dataclass(frozen=True)
class Case:
    """`reasons`: what the loader may report (one code, or two where the OS decides, e.g. a
    device node on a nodev mount is `unreadable`). `named` cases never become a version:
    they are refused by name (metric reason `version_name`) and never listed."""

    id: str
    group: str
    build: Builder
    reasons: frozenset[str]
    named: bool = False


# --- building blocks -------------------------------------------------------------------------


def good_version(target: Path, seed: int) -> Path:
    """A valid version written at `target` (which must not exist)."""
    target.mkdir(parents=True)
    save_model(tiny_model(seed), target)
    return target


def members(v: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(v / WEIGHTS_FILE) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def zip_bytes(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a case, not a mistake
        with zipfile.ZipFile(buf, "w", compression=method) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def write_weights(v: Path, data: bytes, *, fix_checksum: bool = True) -> None:
    (v / WEIGHTS_FILE).write_bytes(data)
    if fix_checksum:
        digest = hashlib.sha256(data).hexdigest()
        (v / CHECKSUM_FILE).write_text(f"{digest}  {WEIGHTS_FILE}\n")


def npy(array: np.ndarray[Any, Any], *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header(descr: Any, shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + payload


def load_member(data: bytes) -> np.ndarray[Any, Any]:
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


def remove(path: Path) -> None:
    """Remove whatever a case created there: a tree, a file, a FIFO, a socket, a link."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def staged(damage: Callable[[Path, Ctx], None]) -> Builder:
    """A builder that damages a valid version in a hidden staging directory, then renames it
    into place (how publishing really delivers a version: all at once)."""

    def build(ctx: Ctx, model_dir: Path, version: int) -> Path:
        stage = good_version(model_dir / f".stage-{version}", seed=version)
        damage(stage, ctx)
        target = model_dir / str(version)
        stage.rename(target)
        return target

    return build


def edit_members(fn: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
                 method: int = zipfile.ZIP_STORED) -> Builder:
    return staged(lambda v, _ctx: write_weights(v, zip_bytes(fn(members(v)), method)))


def replace_member(name: str, data: bytes | Callable[[bytes], bytes]) -> Builder:
    def fn(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [
            (n, (data(d) if callable(data) else data) if n == f"{name}.npy" else d)
            for n, d in entries
        ]

    return edit_members(fn)


def map_array(name: str, fn: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]) -> Builder:
    return replace_member(name, lambda d: npy(fn(load_member(d))))


def poke(value: float, where: tuple[int, ...]) -> Callable[[np.ndarray[Any, Any]], Any]:
    def fn(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        a = a.copy()
        a[where] = value
        return a

    return fn


def metadata_raw(fn: Callable[[dict[str, Any]], bytes]) -> Builder:
    """Rewrite the metadata member with the bytes `fn` makes from the valid metadata."""

    def member(d: bytes) -> bytes:
        meta = json.loads(load_member(d).tobytes())
        return npy(np.frombuffer(fn(meta), dtype=np.uint8))

    return replace_member("metadata", member)


def metadata(fn: Callable[[dict[str, Any]], Any]) -> Builder:
    """Edit the metadata as a dict (or replace it by any JSON value) and re-encode it.
    json.dumps escapes lone surrogates, so they survive into the file as valid JSON."""

    def edit(meta: dict[str, Any]) -> bytes:
        out = fn(meta)
        return json.dumps(meta if out is None else out).encode()

    return metadata_raw(edit)


def set_key(key: str, value: Any) -> Builder:
    return metadata(lambda m: m.__setitem__(key, value))


def patch_zip(data: bytes, member: str, *, flags: int = 0, method: int | None = None,
              file_size: int | None = None) -> bytes:
    """Change fields of one member in its local header and its central-directory entry."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        pos = zf.start_dir  # type: ignore[attr-defined]
    for info in infos:
        if info.filename == member:
            off = info.header_offset
            assert buf[off:off + 4] == b"PK\x03\x04"
            struct.pack_into("<H", buf, off + 6, struct.unpack_from("<H", buf, off + 6)[0] | flags)
            if method is not None:
                struct.pack_into("<H", buf, off + 8, method)
            if file_size is not None:
                struct.pack_into("<I", buf, off + 22, file_size)
    while buf[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<3H", buf, pos + 28)
        if bytes(buf[pos + 46:pos + 46 + n]).decode() == member:
            struct.pack_into("<H", buf, pos + 8, struct.unpack_from("<H", buf, pos + 8)[0] | flags)
            if method is not None:
                struct.pack_into("<H", buf, pos + 10, method)
            if file_size is not None:
                struct.pack_into("<I", buf, pos + 24, file_size)
        pos += 46 + n + m + k
    return bytes(buf)


def patched(member: str, **fields: int) -> Builder:
    return staged(lambda v, _ctx: write_weights(
        v, patch_zip(zip_bytes(members(v)), member, **fields)  # type: ignore[arg-type]
    ))


def _corrupt_deflate(v: Path, _ctx: Ctx) -> None:
    data = bytearray(zip_bytes(members(v), zipfile.ZIP_DEFLATED))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("W0.npy")
    n, m = struct.unpack_from("<2H", data, info.header_offset + 26)
    start = info.header_offset + 30 + n + m
    data[start:start + 64] = b"\xff" * 64  # garbage where the first deflate blocks are
    write_weights(v, bytes(data))


def _bad_crc(v: Path, _ctx: Ctx) -> None:
    data = bytearray(zip_bytes(members(v)))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("W1.npy")
    n, m = struct.unpack_from("<2H", data, info.header_offset + 26)
    data[info.header_offset + 30 + n + m + 200] ^= 0xFF  # one byte of W1, CRC left as it was
    write_weights(v, bytes(data))


def _bad_directory_offset(v: Path, _ctx: Ctx) -> None:
    data = bytearray(zip_bytes(members(v)))
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, eocd + 16, len(data) * 4)  # central directory past the end
    write_weights(v, bytes(data))


def _many_members(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return entries + [(f"x{i}.npy", b"") for i in range(3000)]


def _fifo_or(path: Path) -> None:
    os.mkfifo(path)


def _device(path: Path) -> None:
    """A character device (/dev/null's numbers); a FIFO where mknod is not permitted."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)


def _socket(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFSOCK | 0o600)
    except OSError as e:  # some file systems refuse; a bound socket is the same inode type
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))


def replace_file(name: str, make: Callable[[Path], None]) -> Builder:
    def damage(v: Path, _ctx: Ctx) -> None:
        (v / name).unlink()
        make(v / name)

    return staged(damage)


def _sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    return make


def _outside_file(name: str) -> Builder:
    def damage(v: Path, ctx: Ctx) -> None:
        target = ctx.outside / f"{name}-{v.name}"
        shutil.copy(v / name, target)  # a valid file; only where it lives is wrong
        (v / name).unlink()
        (v / name).symlink_to(target)

    return staged(damage)


def _self_loop(v: Path, _ctx: Ctx) -> None:
    (v / WEIGHTS_FILE).unlink()
    (v / WEIGHTS_FILE).symlink_to(WEIGHTS_FILE)


def _two_link_loop(v: Path, _ctx: Ctx) -> None:
    (v / WEIGHTS_FILE).unlink()
    (v / WEIGHTS_FILE).symlink_to("other.npz")
    (v / "other.npz").symlink_to(WEIGHTS_FILE)


def _dangling(v: Path, _ctx: Ctx) -> None:
    (v / WEIGHTS_FILE).unlink()
    (v / WEIGHTS_FILE).symlink_to("gone.npz")


def _as_directory(name: str) -> Builder:
    def damage(v: Path, _ctx: Ctx) -> None:
        (v / name).unlink()
        (v / name).mkdir()

    return staged(damage)


def _version_is_file(ctx: Ctx, model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    target.write_bytes(b"not a directory\n")
    return target


def _version_link_outside(ctx: Ctx, model_dir: Path, version: int) -> Path:
    real = good_version(ctx.outside / f"{model_dir.name}-{version}", seed=version)
    target = model_dir / str(version)
    target.symlink_to(real, target_is_directory=True)
    return target


def _version_link_loop(ctx: Ctx, model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    target.symlink_to(str(version))
    return target


def _version_link_dangling(ctx: Ctx, model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    target.symlink_to(f"missing-{version}")
    return target


def named(make_name: Callable[[int], str]) -> Builder:
    """A complete, valid version under a name that cannot be a version number."""

    def build(ctx: Ctx, model_dir: Path, version: int) -> Path:
        return good_version(model_dir / make_name(version), seed=version)

    return build


def _many_probes(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """2000 probes that the weights do reproduce: only their number is wrong."""
    grown = {
        n: npy(np.repeat(load_member(d), 500, axis=0))
        for n, d in entries if n in ("probe_inputs.npy", "probe_outputs.npy")
    }
    return [(n, grown.get(n, d)) for n, d in entries]


def _nested(depth: int) -> Callable[[dict[str, Any]], bytes]:
    def fn(meta: dict[str, Any]) -> bytes:
        meta["training"] = "@DEEP@"
        return json.dumps(meta).replace('"@DEEP@"', "[" * depth + "]" * depth).encode()

    return fn


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__delitem__(key)


def _checksum_text(text: bytes) -> Builder:
    return staged(lambda v, _ctx: (v / CHECKSUM_FILE).write_bytes(text))


# --- the corpus ------------------------------------------------------------------------------

_W = WEIGHTS_FILE
_C = CHECKSUM_FILE
S = frozenset


def _cases() -> list[Case]:
    c: list[tuple[str, str, Builder, str | frozenset[str]]] = [
        # the zip container
        ("zip", "truncated", staged(lambda v, _c: write_weights(
            v, (v / _W).read_bytes()[: (v / _W).stat().st_size // 2])), "truncated"),
        ("zip", "not_a_zip", staged(lambda v, _c: write_weights(v, b"text\n" * 400)), "not_npz"),
        ("zip", "empty_file", staged(lambda v, _c: write_weights(v, b"")), "not_npz"),
        ("zip", "encrypted_flag", patched("W0.npy", flags=0x1), "encrypted"),
        ("zip", "unknown_method", patched("W0.npy", method=99), "compression"),
        ("zip", "bzip2_member", edit_members(lambda e: e, zipfile.ZIP_BZIP2), "compression"),
        ("zip", "lzma_member", edit_members(lambda e: e, zipfile.ZIP_LZMA), "compression"),
        ("zip", "corrupt_deflate", staged(_corrupt_deflate), "corrupt"),
        ("zip", "bad_crc", staged(_bad_crc), "corrupt"),
        ("zip", "directory_past_end", staged(_bad_directory_offset), "corrupt"),
        ("zip", "too_many_members", edit_members(_many_members), "too_many_members"),
        ("zip", "duplicate_member", edit_members(lambda e: [*e, e[0]]), "duplicate_member"),
        ("zip", "member_in_subdir", edit_members(
            lambda e: [(f"x/{n}" if n == "W0.npy" else n, d) for n, d in e]), "unexpected_key"),
        ("zip", "member_without_npy", edit_members(
            lambda e: [(n.removesuffix(".npy") if n == "b0.npy" else n, d) for n, d in e]),
         "unexpected_key"),
        ("zip", "extra_member", edit_members(lambda e: [*e, ("W9.npy", e[0][1])]),
         "unexpected_key"),
        ("zip", "missing_member", edit_members(lambda e: [x for x in e if x[0] != "W1.npy"]),
         "missing_key"),
        ("zip", "non_ascii_member", edit_members(lambda e: [*e, ("Wé.npy", e[0][1])]),
         "unexpected_key"),
        ("zip", "declared_size_huge", patched("W0.npy", file_size=0xFFFF_FFF0), "too_large"),
        # the .npy headers
        ("npy", "bad_magic", replace_member("W0", lambda d: b"\x93NUMPX" + d[6:]), "corrupt"),
        ("npy", "npy_version_9", replace_member("W0", lambda d: d[:6] + b"\x09\x00" + d[8:]),
         "corrupt"),
        ("npy", "header_not_a_dict", replace_member(
            "b0", b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + b"[1, 2, 3]".ljust(117)
            + b"\n" + b"\0" * 32), "corrupt"),
        ("npy", "header_50k", replace_member(
            "b0", b"\x93NUMPY\x02\x00" + struct.pack("<I", 50_000) + b" " * 49_999 + b"\n"),
         "corrupt"),
        ("npy", "shape_40TB", replace_member(
            "W0", npy_header("<f4", (10_000_000, 1_000_000), b"\0" * 64)), "too_large"),
        ("npy", "shape_2_62", replace_member("W0", npy_header("<f4", (2**62, 2**62))),
         "too_large"),
        ("npy", "shape_beyond_data", replace_member(
            "W0", npy_header("<f4", (784, 9), b"\0" * (784 * 8 * 4))), "corrupt"),
        ("npy", "data_beyond_shape", replace_member(
            "W0", lambda d: d + b"\0" * 16), "corrupt"),
        ("npy", "object_pickle", replace_member(
            "b0", npy(np.array([{"boom": 1}] * 8, dtype=object), allow_pickle=True)), "pickle"),
        ("npy", "struct_with_object", replace_member(
            "b0", npy_header([("a", "<f4"), ("b", "|O")], (8,), b"\0" * 96)), "pickle"),
        ("npy", "shorter_than_magic", replace_member("W1", b"\x93NU"), "corrupt"),
        ("npy", "negative_shape", replace_member("b1", npy_header("<f4", (-10,))), "corrupt"),
        ("npy", "unicode_dtype", replace_member("b0", npy(np.array(["x"] * 8))), "dtype"),
        # the arrays
        ("array", "float64", map_array("W1", lambda a: a.astype(np.float64)), "dtype"),
        ("array", "big_endian", map_array("W1", lambda a: a.astype(">f4")), "dtype"),
        ("array", "int32", map_array("b1", lambda a: a.astype(np.int32)), "dtype"),
        ("array", "nan_weight", map_array("W0", poke(np.nan, (0, 0))), "not_finite"),
        ("array", "inf_bias", map_array("b1", poke(np.inf, (3,))), "not_finite"),
        ("array", "nan_probe_output", map_array("probe_outputs", poke(np.nan, (0, 0))),
         "not_finite"),
        ("array", "783_inputs", replace_member("W0", npy(np.zeros((783, 8), np.float32))),
         "input_size"),
        ("array", "shapes_do_not_chain", replace_member("W1", npy(np.zeros((9, 10), np.float32))),
         "shape"),
        ("array", "3d_weights", replace_member("W0", npy(np.zeros((784, 8, 1), np.float32))),
         "input_size"),
        ("array", "bias_wrong_shape", replace_member("b0", npy(np.zeros((9,), np.float32))),
         "shape"),
        ("array", "probe_outputs_shape", map_array("probe_outputs", lambda a: a[:, :9]), "shape"),
        ("array", "no_probes", map_array("probe_inputs", lambda a: a[:0]), "shape"),
        ("array", "2000_probes", edit_members(_many_probes), "shape"),
        ("array", "weights_altered", map_array("W1", lambda a: a * np.float32(1.5)),
         "probe_mismatch"),
        ("array", "metadata_float32", replace_member("metadata", npy(np.zeros(8, np.float32))),
         "metadata"),
        # the metadata
        ("metadata", "not_json", metadata_raw(lambda m: b"{not json"), "metadata"),
        ("metadata", "not_utf8", metadata_raw(lambda m: json.dumps(m).encode()[:-2] + b"\xff}"),
         "metadata"),
        ("metadata", "nested_100k_deep", metadata_raw(_nested(100_000)), "metadata"),
        ("metadata", "nested_100_deep", metadata_raw(_nested(100)), "metadata"),
        ("metadata", "string_16MiB", set_key("created_at", "x" * (16 << 20)), "metadata"),
        ("metadata", "string_5000", set_key("trainer_version", "v" * 5000), "metadata"),
        ("metadata", "lone_surrogate_label", metadata(
            lambda m: m["labels"].__setitem__(3, "\ud800")), "metadata"),
        ("metadata", "lone_surrogate_key", set_key("training", {"\udfff": 1}), "metadata"),
        ("metadata", "int_5000_digits", metadata_raw(
            lambda m: json.dumps(m).replace('"epochs": 0', '"epochs": ' + "9" * 5000).encode()),
         "metadata"),
        ("metadata", "int_10e400_metric", set_key("metrics", {"test_accuracy": 10**400}),
         "metadata"),
        ("metadata", "nine_labels", metadata(lambda m: m["labels"].pop()), "metadata"),
        ("metadata", "int_labels", set_key("labels", list(range(10))), "metadata"),
        ("metadata", "long_label", metadata(lambda m: m["labels"].__setitem__(0, "L" * 100)),
         "metadata"),
        ("metadata", "format_version_2", set_key("format_version", 2), "metadata"),
        ("metadata", "no_labels_key", metadata(_delete("labels")), "metadata"),
        ("metadata", "json_array", metadata(lambda m: [m]), "metadata"),
        ("metadata", "unknown_activation", set_key("activations", ["gelu"]), "metadata"),
        ("metadata", "unknown_output", set_key("output", "linear"), "metadata"),
        ("metadata", "layer_sizes_disagree", set_key("layer_sizes", [784, 9, 10]), "shape"),
        ("metadata", "100_layers", set_key("layer_sizes", [784] + [8] * 99 + [10]), "metadata"),
        # the checksum file
        ("checksum", "missing", staged(lambda v, _c: (v / _C).unlink()), "missing_file"),
        ("checksum", "wrong_digest", _checksum_text(b"0" * 64 + b"  model.npz\n"), "checksum"),
        ("checksum", "not_hex", _checksum_text(b"z" * 64 + b"  model.npz\n"), "checksum"),
        ("checksum", "empty", _checksum_text(b""), "checksum"),
        ("checksum", "binary_junk", _checksum_text(bytes(range(256)) * 4), "checksum"),
        ("checksum", "sparse_200MiB", replace_file(_C, _sparse(200 << 20)), "checksum"),
        ("checksum", "fifo", replace_file(_C, _fifo_or), "not_regular_file"),
        ("checksum", "directory", _as_directory(_C), "not_regular_file"),
        ("checksum", "link_outside", _outside_file(_C), "unsafe_path"),
        # file types
        ("filetype", "weights_missing", staged(lambda v, _c: (v / _W).unlink()), "missing_file"),
        ("filetype", "weights_fifo", replace_file(_W, _fifo_or), "not_regular_file"),
        ("filetype", "weights_socket", replace_file(_W, _socket), "not_regular_file"),
        ("filetype", "weights_device", replace_file(_W, _device),
         S({"not_regular_file", "unreadable"})),
        ("filetype", "weights_directory", _as_directory(_W), "not_regular_file"),
        ("filetype", "weights_self_loop", staged(_self_loop), "symlink_loop"),
        ("filetype", "weights_two_link_loop", staged(_two_link_loop), "symlink_loop"),
        ("filetype", "weights_dangling_link", staged(_dangling), "missing_file"),
        ("filetype", "weights_link_outside", _outside_file(_W), "unsafe_path"),
        ("filetype", "weights_sparse_300MiB", replace_file(_W, _sparse(300 << 20)), "too_large"),
        ("filetype", "version_is_a_file", _version_is_file, "not_a_directory"),
        ("filetype", "version_link_outside", _version_link_outside, "unsafe_path"),
        ("filetype", "version_link_loop", _version_link_loop, "symlink_loop"),
        ("filetype", "version_link_dangling", _version_link_dangling, "missing_file"),
    ]
    out = [Case(i, g, b, S({r}) if isinstance(r, str) else r) for g, i, b, r in c]
    for name, make in [
        ("beyond_int64", lambda v: str(2**63 + v)),
        ("beyond_uint64", lambda v: str(2**64 + v)),
        ("200_digits", lambda v: "9" * 199 + str(v)),
        ("leading_zero", lambda v: f"0{v}"),
        ("leading_zeros", lambda v: f"000{v}"),
        ("zero", lambda v: "0"),
    ]:
        out.append(Case(name, "dirname", named(make), S({"version_name"}), named=True))
    return out


CASES = _cases()
GROUPS = sorted({c.group for c in CASES})
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
