"""Pack downloaded wheels into kit parts of at most --limit-mib each, one device call per part.

    python pack_kit.py WHEELS_DIR KIT_DIR [--limit-mib 50] [--trim DIST=PREFIX,PREFIX ...]

A trimmed wheel (--trim) becomes a zip of its members minus the named prefixes, unpacked into the
site directory by device-setup.sh (pip would refuse a wheel whose RECORD lists missing files). A file
larger than the limit is cut into chunks (NAME.chunkNNN, spread over parts) that device-setup.sh
joins in name order. Layout: KIT_DIR/pN/{wheels,zips,chunks}/..."""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

MIB = 2**20


def trimmed_zip(wheel: Path, skip: tuple[str, ...], out: Path) -> Path:
    """The wheel's members minus those under `skip`, recompressed into out/<wheel stem>.zip."""
    dest = out / f"{wheel.stem}.zip"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            if not info.filename.startswith(skip):
                with src.open(info) as f_in, z.open(info.filename, "w", force_zip64=True) as f_out:
                    shutil.copyfileobj(f_in, f_out, 1 << 24)
    return dest


def chunks(path: Path, limit: int, out: Path) -> list[Path]:
    """path cut into files of at most `limit` bytes: out/<name>.chunk000, .chunk001, ..."""
    pieces = []
    with open(path, "rb") as f:
        while data := f.read(limit):
            piece = out / f"{path.name}.chunk{len(pieces):03d}"
            piece.write_bytes(data)
            pieces.append(piece)
    return pieces


def pack(items: list[tuple[str, Path]], limit: int) -> list[list[tuple[str, Path]]]:
    """First-fit decreasing: (folder, file) items into as few parts of at most `limit` bytes as it finds."""
    parts: list[list[tuple[str, Path]]] = []
    room: list[int] = []
    for folder, path in sorted(items, key=lambda it: -it[1].stat().st_size):
        size = path.stat().st_size
        n = next((i for i, free in enumerate(room) if free >= size), len(parts))
        if n == len(parts):
            parts.append([])
            room.append(limit)
        parts[n].append((folder, path))
        room[n] -= size
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path)
    parser.add_argument("kit", type=Path)
    parser.add_argument("--limit-mib", type=float, default=50.0)
    parser.add_argument(
        "--trim", nargs="*", default=[], help="DIST=PREFIX,PREFIX: leave these members out of DIST's wheel"
    )
    args = parser.parse_args()
    limit = int(args.limit_mib * MIB)
    trims = {dist: tuple(prefixes.split(",")) for dist, prefixes in (t.split("=", 1) for t in args.trim)}
    staging = args.kit / "staging"
    shutil.rmtree(args.kit, ignore_errors=True)
    staging.mkdir(parents=True)
    items: list[tuple[str, Path]] = []
    for wheel in sorted(args.wheels.glob("*.whl")):
        dist = wheel.name.split("-")[0]
        path, folder = (trimmed_zip(wheel, trims[dist], staging), "zips") if dist in trims else (wheel, "wheels")
        if path.stat().st_size > limit:
            items += [("chunks", piece) for piece in chunks(path, limit, staging)]
        else:
            items.append((folder, path))
    parts = pack(items, limit)
    sizes = [sum(p.stat().st_size for _, p in part) / MIB for part in parts]
    for n, part in enumerate(parts):
        for folder, path in part:
            dest = args.kit / f"p{n}" / folder
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / path.name)
    shutil.rmtree(staging)
    print(
        f"{len(parts)} parts, {sum(sizes):.1f} MiB in {args.kit}: "
        + ", ".join(f"p{n} {s:.1f} MiB" for n, s in enumerate(sizes))
    )


if __name__ == "__main__":
    main()
